import CBlksnapABI
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// A blocking client of blksnapd's control socket, for blksnapctl and
/// tests: one request, then its reply, on one connection.
public final class ControlClient {
    /// What went wrong, in words for the operator.
    public struct Failure: Error, CustomStringConvertible, Sendable {
        public var description: String
        /// The errno blksnapd answered with, when it answered.
        public var result: Int32?
        public init(_ description: String, result: Int32? = nil) { (self.description, self.result) = (description, result) }
    }

    let fd: Int32

    public init(path: String) throws(Failure) {
        do {
            fd = try UnixSocket.connect(path: path)
        } catch {
            throw Failure("cannot reach blksnapd at \(path): \(error.errno) (is it running? start it with tools/run-daemon or systemctl start blksnapd)")
        }
    }

    deinit { close(fd) }

    /// Sends one request and returns blksnapd's result and payload. A reply
    /// announcing more than BLKSNAP_CONTROL_MAX_BYTES is refused unread.
    public func request(_ type: blksnap_control_type, payload: [UInt8] = []) throws(Failure) -> (result: Int32, payload: [UInt8]) {
        guard let out = ControlFrame.request(type: type, payload: payload) else {
            throw Failure("a \(payload.count)-byte request is over the control socket's \(BLKSNAP_CONTROL_MAX_BYTES)")
        }
        guard out.withUnsafeBytes({ send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }) == out.count else {
            throw Failure("blksnapd closed the connection")
        }
        var reply = blksnap_control_reply()
        guard withUnsafeMutableBytes(of: &reply, { readFully($0) }), reply.magic == BLKSNAP_CONTROL_MAGIC else {
            throw Failure("blksnapd sent no reply")
        }
        guard reply.payload_length <= BLKSNAP_CONTROL_MAX_BYTES else {
            throw Failure("blksnapd announced a \(reply.payload_length)-byte reply; not reading it")
        }
        var body = [UInt8](repeating: 0, count: Int(reply.payload_length))
        guard body.withUnsafeMutableBytes({ readFully($0) }) else { throw Failure("blksnapd's reply was cut short") }
        return (reply.result, body)
    }

    /// STATUS, decoded.
    public func status() throws(Failure) -> DaemonStatus {
        let payload = try succeeded("status", request(BLKSNAP_CONTROL_STATUS))
        do { return try JSONDecoder().decode(DaemonStatus.self, from: Data(payload)) } catch {
            throw Failure("blksnapd's status does not read: \(error)")
        }
    }

    public func attach(_ request: AttachRequest) throws(Failure) -> AttachReply {
        let payload = try succeeded("attach", self.request(BLKSNAP_CONTROL_ATTACH, payload: Self.encode(request)))
        do { return try JSONDecoder().decode(AttachReply.self, from: Data(payload)) } catch {
            throw Failure("blksnapd's attach reply does not read: \(error)")
        }
    }

    public func detach(_ request: DetachRequest) throws(Failure) {
        _ = try succeeded("detach", self.request(BLKSNAP_CONTROL_DETACH, payload: Self.encode(request)))
    }

    /// The payload of a successful reply; a refusal says blksnapd's why,
    /// else the errno's text.
    func succeeded(_ what: String, _ reply: (result: Int32, payload: [UInt8])) throws(Failure) -> [UInt8] {
        guard reply.result < 0 else { return reply.payload }
        let message = (try? JSONDecoder().decode(Refusal.self, from: Data(reply.payload)))?.error
        throw Failure("\(what) failed: \(message ?? String(cString: strerror(-reply.result)))", result: reply.result)
    }

    static func encode<T: Encodable>(_ value: T) throws(Failure) -> [UInt8] {
        do { return Array(try JSONEncoder().encode(value)) } catch { throw Failure("cannot encode the request: \(error)") }
    }

    private func readFully(_ buffer: UnsafeMutableRawBufferPointer) -> Bool {
        var done = 0
        while done < buffer.count {
            let n = read(fd, buffer.baseAddress! + done, buffer.count - done)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return false }
            done += n
        }
        return true
    }
}
