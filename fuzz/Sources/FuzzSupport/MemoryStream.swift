import BlksnapEngine
@testable import BlksnapNBD

/// A client's side of a connection in memory: `receive` hands out the
/// input then reports end of stream; `send` collects what the server says.
public final class MemoryStream: ByteStream, @unchecked Sendable {
    private let lock = Lock()
    private let input: [UInt8]
    private var position = 0
    private var output: [UInt8] = []
    private var isShut = false

    public init(_ input: [UInt8]) { self.input = input }

    public func receive(into buffer: UnsafeMutableRawBufferPointer) -> Bool {
        lock.withLock {
            guard !isShut, input.count - position >= buffer.count else { return false }
            buffer.copyBytes(from: input[position..<(position + buffer.count)])
            position += buffer.count
            return true
        }
    }

    public func send(_ parts: [UnsafeRawBufferPointer]) -> Bool {
        lock.withLock {
            for p in parts { output += p }
            return !isShut
        }
    }

    public func shutdown() { lock.withLock { isShut = true } }

    public var written: [UInt8] { lock.withLock { output } }
}
