/// Positioned I/O on a disk: what the engine reads originals from, writes
/// them to, and keeps the difference storage on.
///
/// Offsets and lengths are bytes. Implementations are safe to call from
/// many threads at once; overlapping concurrent writes land in some order,
/// as on a real disk. `FileBlockDevice` (files and block devices) and
/// `MemoryBlockDevice` (tests, benchmarks) live here; the data plane adds
/// one over libnbd.
public protocol BlockDevice: AnyObject, Sendable {
    /// Capacity in bytes.
    var size: UInt64 { get }
    /// Buffers, offsets and lengths must be multiples of this (O_DIRECT).
    var alignment: Int { get }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlksnapError)
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlksnapError)
    func flush() throws(BlksnapError)
    func discard(at offset: UInt64, length: UInt64) throws(BlksnapError)
}

extension BlockDevice {
    public var alignment: Int { 1 }
    public func discard(at offset: UInt64, length: UInt64) throws(BlksnapError) {}
}
