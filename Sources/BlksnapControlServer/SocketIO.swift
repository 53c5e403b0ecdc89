import BlksnapEngine
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Blocking whole-buffer reads and writes on a stream socket: the control
/// protocol is one request then one reply, so a thread per connection with
/// plain blocking calls is both the simplest and the fastest loop.
enum SocketIO {
    /// Fills `buffer` or returns false at end of stream or on error.
    static func readFully(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer) -> Bool {
        var done = 0
        while done < buffer.count {
            let n = Glibc.read(fd, buffer.baseAddress! + done, buffer.count - done)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return false }
            done += n
        }
        return true
    }

    /// What one read may take at a time: memory follows the bytes that
    /// arrive, not the count a header announced.
    static let piece = 1 << 20

    /// `count` bytes, grown a piece at a time as they arrive.
    static func readBytes(_ fd: Int32, count: Int) -> [UInt8]? {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(min(count, piece))
        while bytes.count < count {
            let n = min(count - bytes.count, piece)
            let start = bytes.count
            bytes += [UInt8](repeating: 0, count: n)
            let ok = bytes.withUnsafeMutableBytes { readFully(fd, UnsafeMutableRawBufferPointer(rebasing: $0[start...])) }
            guard ok else { return nil }
        }
        return bytes
    }

    static func read<T>(_ fd: Int32, as type: T.Type, zero: T) -> T? {
        var value = zero
        let ok = withUnsafeMutableBytes(of: &value) { readFully(fd, $0) }
        return ok ? value : nil
    }

    /// Replies up to this size go out joined, in one send.
    static let joinedReply = 64 << 10

    /// Writes every byte of every piece, in order. A small reply goes in one
    /// send: the peer then wakes once for it, not once per piece (VERSION
    /// was three sends and three wake-ups of the caller).
    static func writeAll(_ fd: Int32, _ pieces: [[UInt8]]) -> Bool {
        let total = pieces.reduce(0) { $0 + $1.count }
        if pieces.count > 1 && total <= joinedReply {
            var joined: [UInt8] = []
            joined.reserveCapacity(total)
            for piece in pieces { joined += piece }
            return writeAll(fd, [joined])
        }
        for piece in pieces where !piece.isEmpty {
            var done = 0
            while done < piece.count {
                let n = piece.withUnsafeBytes { send(fd, $0.baseAddress! + done, piece.count - done, Int32(MSG_NOSIGNAL)) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { return false }
                done += n
            }
        }
        return true
    }

    static func bytes<T>(of value: T) -> [UInt8] { withUnsafeBytes(of: value) { Array($0) } }
}
