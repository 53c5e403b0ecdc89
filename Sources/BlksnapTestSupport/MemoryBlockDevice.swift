import BlksnapABI
import BlksnapEngine
import SystemPackage

/// A disk in memory: the reference for tests and the peer for benchmarks.
///
/// One allocation for its whole life, so reads and writes of different
/// ranges never contend.
public final class MemoryBlockDevice: BlockDevice, @unchecked Sendable {
    public let size: UInt64
    private let storage: UnsafeMutableRawBufferPointer

    public init(size: UInt64) {
        self.size = size
        storage = .allocate(byteCount: Int(size), alignment: 4096)
        storage.initializeMemory(as: UInt8.self, repeating: 0)
    }

    deinit { storage.deallocate() }

    private func check(_ offset: UInt64, _ count: Int) throws(BlksnapError) {
        guard offset <= size, UInt64(count) <= size - offset else {
            throw BlksnapError(.invalidArgument, "I/O at \(offset)+\(count) past the end of a \(size)-byte device")
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        try check(offset, buffer.count)
        guard buffer.count > 0 else { return }
        buffer.baseAddress!.copyMemory(from: storage.baseAddress! + Int(offset), byteCount: buffer.count)
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        try check(offset, buffer.count)
        guard buffer.count > 0 else { return }
        (storage.baseAddress! + Int(offset)).copyMemory(from: buffer.baseAddress!, byteCount: buffer.count)
    }

    public func flush() throws(BlksnapError) {}

    public func discard(at offset: UInt64, length: UInt64) throws(BlksnapError) {
        try check(offset, Int(length))
        (storage.baseAddress! + Int(offset)).initializeMemory(as: UInt8.self, repeating: 0, count: Int(length))
    }

    /// A copy of every byte, for comparisons in tests.
    public func snapshotBytes() -> [UInt8] { Array(storage) }
}

extension MemoryBlockDevice: Describable {
    public var displayName: String { "memory" }
}
