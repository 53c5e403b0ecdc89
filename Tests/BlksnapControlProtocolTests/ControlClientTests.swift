import BlksnapControlProtocol
import CBlksnapABI
import FoundationEssentials
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The client against a stand-in blksnapd on a real socket: it answers one
/// request with the reply given, and keeps what it was sent.
final class OneReplyServer: @unchecked Sendable {
    let path: String
    let listener: Int32
    private(set) var received: [UInt8] = []
    private var thread = pthread_t()

    init(reply: [[UInt8]]) throws {
        var template = Array("/tmp/blksnap-client.XXXXXX".utf8CString)
        path = String(cString: mkdtemp(&template)!) + "/control.sock"
        listener = try UnixSocket.listen(path: path)
        let box = Unmanaged.passRetained(Job(server: self, reply: reply))
        pthread_create(&thread, nil, { raw in
            let job = Unmanaged<Job>.fromOpaque(raw!).takeRetainedValue()
            job.server.answer(job.reply)
            return nil
        }, box.toOpaque())
    }

    final class Job {
        let server: OneReplyServer
        let reply: [[UInt8]]
        init(server: OneReplyServer, reply: [[UInt8]]) { (self.server, self.reply) = (server, reply) }
    }

    private func answer(_ reply: [[UInt8]]) {
        let c = accept(listener, nil, nil)
        guard c >= 0 else { return }
        var header = [UInt8](repeating: 0, count: MemoryLayout<blksnap_control_request>.size)
        _ = recv(c, &header, header.count, Int32(MSG_WAITALL))
        let length = header.withUnsafeBytes { $0.load(fromByteOffset: 24, as: UInt32.self) }
        var payload = [UInt8](repeating: 0, count: Int(min(length, 1 << 16)))
        if !payload.isEmpty { _ = recv(c, &payload, payload.count, Int32(MSG_WAITALL)) }
        received = header + payload
        for piece in reply where !piece.isEmpty { _ = send(c, piece, piece.count, Int32(MSG_NOSIGNAL)) }
        close(c)
    }

    /// Waits for the answer to be sent, then removes the socket.
    func finish() {
        pthread_join(thread, nil)
        close(listener)
        unlink(path)
        rmdir(String(path.dropLast("/control.sock".count)))
    }
}

@Suite struct ControlClientTests {
    @Test func anAttachIsOneFramedRequestAndItsReplyDecoded() throws {
        let made = AttachReply(node: "/dev/loop64", devId: "7:64", backing: "/d", sizeBytes: 1 << 20)
        let server = try OneReplyServer(reply: ControlFrame.reply(result: 0, payload: Array(try JSONEncoder().encode(made))))
        let reply = try ControlClient(path: server.path).attach(AttachRequest(backing: "/d", size: 1 << 20))
        server.finish()
        #expect(reply == made)
        let header = server.received.prefix(MemoryLayout<blksnap_control_request>.size)
        #expect(header.withUnsafeBytes { $0.load(as: UInt32.self) } == BLKSNAP_CONTROL_MAGIC)
        #expect(header.withUnsafeBytes { $0.load(fromByteOffset: 4, as: UInt32.self) } == BLKSNAP_CONTROL_ATTACH.rawValue)
        let sent = try JSONDecoder().decode(AttachRequest.self, from: Data(server.received.dropFirst(header.count)))
        #expect(sent == AttachRequest(backing: "/d", size: 1 << 20))
    }

    @Test func aRefusalSaysBlksnapdsWhyAndCarriesTheErrno() throws {
        let why = Array(try JSONEncoder().encode(Refusal(error: "/dev/loop64 is in a snapshot")))
        let server = try OneReplyServer(reply: ControlFrame.reply(result: -EBUSY, payload: why))
        defer { server.finish() }
        do {
            try ControlClient(path: server.path).detach(DetachRequest(device: "/dev/loop64"))
            Issue.record("a refusal passed")
        } catch {
            #expect(error.result == -EBUSY)
            #expect(error.description == "detach failed: /dev/loop64 is in a snapshot")
        }
    }

    /// A reply that announces more than the protocol allows is not read,
    /// and nothing of its announced size is allocated.
    @Test func anOversizedReplyIsRefusedUnread() throws {
        var header = blksnap_control_reply()
        header.magic = BLKSNAP_CONTROL_MAGIC
        header.payload_length = BLKSNAP_CONTROL_MAX_BYTES + 1
        let server = try OneReplyServer(reply: [ControlFrame.bytes(of: header)])
        defer { server.finish() }
        do {
            _ = try ControlClient(path: server.path).request(BLKSNAP_CONTROL_STATUS)
            Issue.record("an oversized reply was read")
        } catch {
            #expect(error.description.contains("announced a \(BLKSNAP_CONTROL_MAX_BYTES + 1)-byte reply"))
        }
    }

    @Test func aCutShortReplyIsAnError() throws {
        let pieces = ControlFrame.reply(result: 0, payload: Array("{\"devices\":[]}".utf8))
        let server = try OneReplyServer(reply: [pieces[0], Array(pieces[1].prefix(3))])
        defer { server.finish() }
        #expect(throws: ControlClient.Failure.self) { _ = try ControlClient(path: server.path).status() }
    }

    @Test func noDaemonIsSaidSo() {
        do {
            _ = try ControlClient(path: "/nonexistent-blksnap-dir/control.sock")
            Issue.record("reached nothing")
        } catch {
            #expect(error.description.hasPrefix("cannot reach blksnapd at /nonexistent-blksnap-dir/control.sock"))
        }
    }

    @Test func aReplyFrameIsHeaderThenWritesThenPayload() {
        let pieces = ControlFrame.reply(result: 7, writes: [.init(address: 0x1000, bytes: [1, 2, 3])], payload: [9])
        #expect(pieces.map(\.count) == [16, 16, 3, 1])
        #expect(pieces[0].withUnsafeBytes { $0.load(fromByteOffset: 4, as: Int32.self) } == 7)
        #expect(pieces[0].withUnsafeBytes { $0.load(fromByteOffset: 8, as: UInt32.self) } == 1)
        #expect(pieces[1].withUnsafeBytes { $0.load(as: UInt64.self) } == 0x1000)
        #expect(pieces[1].withUnsafeBytes { $0.load(fromByteOffset: 8, as: UInt32.self) } == 3)
    }
}
