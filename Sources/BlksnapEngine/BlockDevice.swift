/// Positioned I/O on a disk: what the engine reads originals from, writes
/// them to, and keeps the difference storage on.
///
/// Offsets and lengths are bytes. Implementations are safe to call from
/// many threads at once; overlapping concurrent writes land in some order,
/// as on a real disk. `FileBlockDevice` (files and block devices) lives
/// here, `MemoryBlockDevice` in the test support (tests, benchmarks,
/// fuzzing); the data plane adds one over libnbd.
public protocol BlockDevice: AnyObject, Sendable {
    /// Capacity in bytes.
    var size: UInt64 { get }
    /// Buffers, offsets and lengths must be multiples of this (O_DIRECT).
    var alignment: Int { get }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlksnapError)
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlksnapError)
    func flush() throws(BlksnapError)
    func discard(at offset: UInt64, length: UInt64) throws(BlksnapError)
    /// The open file whose bytes at the returned offset are exactly what
    /// `read` would return for `count` bytes at `offset`, or nil. A
    /// frontend may then have the kernel splice them to its client
    /// instead of copying them through a buffer of ours.
    func fileRange(at offset: UInt64, count: Int) -> (descriptor: Int32, offset: UInt64)?
    /// Writes `count` bytes of the open file `source`, from `sourceOffset`,
    /// here at `offset`, moved by the kernel without passing through a
    /// buffer of ours (splice), as `write` would write them. False where
    /// this device cannot: then the caller writes the bytes itself (what
    /// was moved already, if anything, was the same bytes).
    func write(fromFile source: Int32, at sourceOffset: UInt64, count: Int, to offset: UInt64) throws(BlksnapError) -> Bool
}

extension BlockDevice {
    public var alignment: Int { 1 }
    public func discard(at offset: UInt64, length: UInt64) throws(BlksnapError) {}
    public func fileRange(at offset: UInt64, count: Int) -> (descriptor: Int32, offset: UInt64)? { nil }
    public func write(fromFile source: Int32, at sourceOffset: UInt64, count: Int,
                      to offset: UInt64) throws(BlksnapError) -> Bool { false }

    /// Writes real zeros over a range, a MiB at a time: for a discard that
    /// must read back as zeros where the store cannot promise it, and for
    /// NBD_CMD_WRITE_ZEROES with NO_HOLE.
    public func writeZeroes(at offset: UInt64, length: UInt64) throws(BlksnapError) {
        guard length > 0 else { return }
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(min(length, 1 << 20)),
                                                           alignment: max(alignment, 4096))
        defer { zeros.deallocate() }
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        var done: UInt64 = 0
        while done < length {
            let n = Int(min(UInt64(zeros.count), length - done))
            try write(UnsafeRawBufferPointer(rebasing: zeros[0..<n]), at: offset + done)
            done += UInt64(n)
        }
    }
}
