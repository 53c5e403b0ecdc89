import BlksnapEngine
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The connection's byte stream, as the handshake and the transmission
/// phase see it: whole-buffer receives and whole-message sends.
///
/// A socket in the server; bytes in memory in the tests, so every phase of
/// the protocol runs without a socket (the swift-nio `NIOEmbedded` idea).
/// `send` may be called from several worker threads, but never at once:
/// the connection holds its write lock around it.
protocol ByteStream: AnyObject, Sendable {
    /// Fills `buffer`; false at end of stream or on error.
    func receive(into buffer: UnsafeMutableRawBufferPointer) -> Bool
    /// Sends the parts in order, all or nothing; false if the peer is gone.
    func send(_ parts: [UnsafeRawBufferPointer]) -> Bool
    /// Ends both directions, waking a thread blocked in `receive`.
    func shutdown()
    /// The socket, for data the kernel moves to it itself (splice), or
    /// nil where the stream is no descriptor.
    var descriptor: Int32? { get }
}

extension ByteStream {
    var descriptor: Int32? { nil }

    func receive(count: Int) -> [UInt8]? {
        var bytes = [UInt8](repeating: 0, count: count)
        let ok = bytes.withUnsafeMutableBytes { receive(into: $0) }
        return ok ? bytes : nil
    }

    func send(_ bytes: [UInt8]) -> Bool {
        bytes.withUnsafeBytes { send([$0]) }
    }

    func send(_ header: [UInt8], _ data: UnsafeRawBufferPointer) -> Bool {
        header.withUnsafeBytes { send([$0, data]) }
    }

    /// Reads and drops `count` bytes: the payload of a refused WRITE.
    func skip(_ count: Int) -> Bool {
        var left = count
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: min(count, 1 << 20), alignment: 16)
        defer { scratch.deallocate() }
        while left > 0 {
            let n = min(left, scratch.count)
            guard receive(into: UnsafeMutableRawBufferPointer(rebasing: scratch[0..<n])) else { return false }
            left -= n
        }
        return true
    }
}

/// A connected stream socket with blocking calls: one reader thread
/// receives (through `ReadAhead`), workers send under the connection's
/// write lock.
final class SocketStream: ByteStream, @unchecked Sendable {
    let fd: Int32
    private let lock = Lock()
    private var closed = false
    /// The reader thread's alone.
    private var readAhead = ReadAhead()
    /// Set by `shutdown`: requests read ahead are then not handed out, as
    /// none would be read from a shut socket.
    private let isShut = Atomic<Bool>(false)

    init(fd: Int32) { self.fd = fd }

    var descriptor: Int32? { fd }

    func receive(into buffer: UnsafeMutableRawBufferPointer) -> Bool {
        guard !isShut.load(ordering: .relaxed) else { return false }
        let fd = self.fd
        return readAhead.receive(into: buffer) { memory, count, wait in
            while true {
                let n = recv(fd, memory, count, wait ? Int32(MSG_WAITALL) : 0)
                if n < 0 && errno == EINTR { continue }
                return n
            }
        }
    }

    func send(_ parts: [UnsafeRawBufferPointer]) -> Bool {
        var iov = parts.filter { $0.count > 0 }.map {
            iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress!), iov_len: $0.count)
        }
        var first = 0
        while first < iov.count {
            let n = iov.withUnsafeMutableBufferPointer { p -> Int in
                var msg = msghdr()
                msg.msg_iov = p.baseAddress! + first
                msg.msg_iovlen = p.count - first
                // MSG_NOSIGNAL: a client that went away must not kill the
                // server with SIGPIPE.
                return sendmsg(fd, &msg, Int32(MSG_NOSIGNAL))
            }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return false }
            var sent = n
            while first < iov.count && sent >= iov[first].iov_len {
                sent -= iov[first].iov_len
                first += 1
            }
            if sent > 0 {
                iov[first].iov_base += sent
                iov[first].iov_len -= sent
            }
        }
        return true
    }

    /// Safe from any thread until `close`, never after: the descriptor
    /// number may belong to someone else by then.
    func shutdown() {
        isShut.store(true, ordering: .relaxed)
        lock.withLock {
            if !closed { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }
        }
    }

    func close() {
        lock.withLock {
            if !closed {
                closed = true
                _ = Glibc.close(fd)
            }
        }
    }
}
