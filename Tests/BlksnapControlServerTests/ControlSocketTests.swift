import BlksnapABI
import BlksnapEngine
import CBlksnapABI
import Logging
import Testing
@testable import BlksnapControlServer
import BlksnapTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// A server on a fresh socket, and a raw client speaking blksnap_control.h.
final class Harness {
    let dir: String
    let server: ControlServer
    let engine: Engine
    let fd: Int32

    init(configure: (ControlServer) -> Void = { _ in }) throws {
        var template = Array("/tmp/blksnap-ctl-XXXXXX".utf8CString)
        dir = String(cString: mkdtemp(&template)!)
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        engine = Engine(logger: logger)
        server = ControlServer(path: dir + "/control.sock", control: Control(engine: engine), logger: logger)
        configure(server)
        try server.start()
        fd = Harness.connect(server.path)
        precondition(fd >= 0)
    }

    /// A new connection to `path`, or -1.
    static func connect(_ path: String) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in path.utf8.enumerated() { raw[i] = b }
        }
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else {
            close(fd)
            return -1
        }
        return fd
    }

    /// Whether the server hung up on `fd` (end of stream) within 10 s.
    static func hungUp(_ fd: Int32) -> Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&p, 1, 10_000) == 1 else { return false }
        var byte: UInt8 = 0
        return recv(fd, &byte, 1, 0) == 0
    }

    /// A request header alone, announcing what the caller chooses.
    func header(type: blksnap_control_type, regions: UInt32 = 0, payload: UInt32 = 0) -> [UInt8] {
        var header = blksnap_control_request()
        header.magic = BLKSNAP_CONTROL_MAGIC
        header.type = type.rawValue
        header.region_count = regions
        header.payload_length = payload
        return SocketIO.bytes(of: header)
    }

    deinit {
        close(fd)
        server.stop()
        rmdir(dir)
    }

    struct Region {
        var address: UInt64
        var flow: UInt32
        var bytes: [UInt8] = []
        var length: Int
        init(_ address: UInt64, _ flow: UInt32, _ bytes: [UInt8], _ length: Int) {
            (self.address, self.flow, self.bytes, self.length) = (address, flow, bytes, length)
        }
    }

    struct Reply {
        var result: Int32
        var writes: [CallerWrite]
        var payload: [UInt8]
    }

    func send(type: blksnap_control_type, command: UInt32 = 0, argument: UInt64 = 0,
              regions: [Region] = [], payload: [UInt8] = []) -> Reply? {
        var header = blksnap_control_request()
        header.magic = BLKSNAP_CONTROL_MAGIC
        header.type = type.rawValue
        header.command = command
        header.argument = argument
        header.region_count = UInt32(regions.count)
        header.payload_length = UInt32(payload.count)
        var out = SocketIO.bytes(of: header)
        for region in regions {
            let (address, flow, bytes, length) = (region.address, region.flow, region.bytes, region.length)
            var r = blksnap_control_region()
            r.address = address
            r.flow = flow
            r.length = UInt32(length)
            out += SocketIO.bytes(of: r) + (flow & BLKSNAP_ABI_IN.rawValue != 0 ? bytes : [])
        }
        out += payload
        guard SocketIO.writeAll(fd, [out]),
              let reply = SocketIO.read(fd, as: blksnap_control_reply.self, zero: blksnap_control_reply()),
              reply.magic == BLKSNAP_CONTROL_MAGIC else { return nil }
        var writes: [CallerWrite] = []
        for _ in 0..<reply.write_count {
            guard let w = SocketIO.read(fd, as: blksnap_control_write.self, zero: blksnap_control_write()),
                  let bytes = SocketIO.readBytes(fd, count: Int(w.length)) else { return nil }
            writes.append(CallerWrite(address: w.address, bytes: bytes))
        }
        guard let body = SocketIO.readBytes(fd, count: Int(reply.payload_length)) else { return nil }
        return Reply(result: reply.result, writes: writes, payload: body)
    }
}

@Suite struct ControlSocketTests {
    @Test func socketIsRootOnly() throws {
        let h = try Harness()
        var st = stat()
        #expect(stat(h.server.path, &st) == 0)
        #expect(st.st_mode & 0o777 == 0o600)
        #expect(st.st_mode & S_IFMT == S_IFSOCK)
    }

    @Test func versionComesBackAsAWriteToTheArgument() throws {
        let h = try Harness()
        let reply = try #require(h.send(type: BLKSNAP_CONTROL_IOCTL, command: IoctlCommand.version.number,
                                        argument: 0x7000, regions: [.init(0x7000, BLKSNAP_ABI_OUT.rawValue, [], 8)]))
        #expect(reply.result == 0)
        #expect(reply.writes == [CallerWrite(address: 0x7000, bytes: Version(major: 1, minor: 0, revision: 0, build: 0).wire)])
    }

    @Test func unshippedArgumentGivesENODATA() throws {
        let h = try Harness()
        let reply = try #require(h.send(type: BLKSNAP_CONTROL_IOCTL, command: IoctlCommand.version.number, argument: 0x7000))
        #expect(reply.result == -ENODATA)
        #expect(reply.writes.isEmpty)
    }

    @Test func unknownCommandGivesENOTTY() throws {
        let h = try Harness()
        let reply = try #require(h.send(type: BLKSNAP_CONTROL_IOCTL, command: 0x4008_560c, argument: 0x7000))
        #expect(reply.result == -ENOTTY)
    }

    @Test func createWithShippedArrayReachesTheEngine() throws {
        let h = try Harness()
        _ = try h.engine.route(DevId(major: 7, minor: 0), backing: MemoryBlockDevice(size: 1 << 20))
        let devs = DevId(major: 7, minor: 0).wire
        let arg = SnapshotCreate(count: 1, devIdArray: 0x9000).wire
        let reply = try #require(h.send(
            type: BLKSNAP_CONTROL_IOCTL, command: IoctlCommand.snapshotCreate.number, argument: 0x8000,
            regions: [.init(0x8000, BLKSNAP_ABI_IN.rawValue | BLKSNAP_ABI_OUT.rawValue, arg, arg.count),
                      .init(0x9000, BLKSNAP_ABI_IN.rawValue, devs, devs.count)]))
        #expect(reply.result == 0)
        let written = try #require(reply.writes.first)
        #expect(written.address == 0x8000)
        #expect(SnapshotCreate(wire: written.bytes).id == h.engine.collectSnapshots().first)
    }

    @Test func outputRegionTooSmallGivesENODATA() throws {
        let h = try Harness()
        // VERSION's 8 bytes do not fit a 4-byte output region.
        let reply = try #require(h.send(type: BLKSNAP_CONTROL_IOCTL, command: IoctlCommand.version.number,
                                        argument: 0x7000, regions: [.init(0x7000, BLKSNAP_ABI_OUT.rawValue, [], 4)]))
        #expect(reply.result == -ENODATA)
    }

    @Test func statusIsJSONOfTheEngine() throws {
        let h = try Harness()
        _ = try h.engine.route(DevId(major: 7, minor: 3), backing: MemoryBlockDevice(size: 1 << 20))
        let reply = try #require(h.send(type: BLKSNAP_CONTROL_STATUS))
        #expect(reply.result == 0)
        let text = String(decoding: reply.payload, as: UTF8.self)
        #expect(text.contains("\"devId\":\"7:3\""))
    }

    @Test func deviceRequestsWithoutADataPlaneAreRefused() throws {
        let h = try Harness()
        let reply = try #require(h.send(type: BLKSNAP_CONTROL_ATTACH, payload: Array("{}".utf8)))
        #expect(reply.result == -EOPNOTSUPP)
    }

    @Test func badMagicClosesTheConnection() throws {
        let h = try Harness()
        #expect(SocketIO.writeAll(h.fd, [[UInt8](repeating: 0, count: 32)]))
        var byte: UInt8 = 0
        #expect(recv(h.fd, &byte, 1, 0) == 0)
    }

    /// A stranger is answered EACCES at its header and hung up on: the
    /// 200 MiB it announces is never read, so it costs blksnapd nothing.
    @Test func aStrangerIsRefusedBeforeItsPayloadIsRead() throws {
        let h = try Harness { $0.admits = { _, _ in false } }
        #expect(SocketIO.writeAll(h.fd, [h.header(type: BLKSNAP_CONTROL_ATTACH, payload: 200 << 20)]))
        let reply = try #require(SocketIO.read(h.fd, as: blksnap_control_reply.self, zero: blksnap_control_reply()))
        #expect(reply.magic == BLKSNAP_CONTROL_MAGIC)
        #expect(reply.result == -EACCES)
        #expect(Harness.hungUp(h.fd))
    }

    @Test func aStrangersIoctlIsRefusedBeforeItsRegionsAreRead() throws {
        let h = try Harness { $0.admits = { _, _ in false } }
        #expect(SocketIO.writeAll(h.fd, [h.header(type: BLKSNAP_CONTROL_IOCTL, regions: 3)]))
        let reply = try #require(SocketIO.read(h.fd, as: blksnap_control_reply.self, zero: blksnap_control_reply()))
        #expect(reply.result == -EACCES)
        #expect(Harness.hungUp(h.fd))
    }

    /// ATTACH and DETACH carry a little JSON, STATUS nothing: a header
    /// announcing more is hung up on without reading it.
    static let overCaps: [(UInt32, UInt32)] = [(BLKSNAP_CONTROL_ATTACH.rawValue, (64 << 10) + 1),
                                               (BLKSNAP_CONTROL_DETACH.rawValue, 1 << 20),
                                               (BLKSNAP_CONTROL_STATUS.rawValue, 1)]

    @Test(arguments: overCaps)
    func aPayloadOverItsTypesCapIsHungUpOn(type: UInt32, length: UInt32) throws {
        let h = try Harness()
        #expect(SocketIO.writeAll(h.fd, [h.header(type: blksnap_control_type(rawValue: type), payload: length)]))
        #expect(Harness.hungUp(h.fd))
    }

    @Test func aPayloadUnderItsCapIsRead() throws {
        let h = try Harness()
        let json = Array(#"{"backing": ""#.utf8) + [UInt8](repeating: 0x61, count: 60 << 10) + Array(#""}"#.utf8)
        let reply = try #require(h.send(type: BLKSNAP_CONTROL_ATTACH, payload: json))
        #expect(reply.result == -EOPNOTSUPP)
    }

    /// Bytes are taken as they come, a piece at a time; what a header
    /// announced but never came is no error of the reader's but the end.
    @Test func readBytesAssemblesPiecesAndStopsAtEndOfStream() throws {
        var pair: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0)
        defer { close(pair[0]) }
        var sent = [UInt8](repeating: 0x5a, count: 3 * SocketIO.piece + 5)
        for i in stride(from: 0, to: sent.count, by: 4093) { sent[i] = UInt8(truncatingIfNeeded: i >> 12) }
        let end = pair[1], pieces = [sent, [1, 2, 3]]
        startThread {
            _ = SocketIO.writeAll(end, pieces)
            close(end)
        }
        let got = SocketIO.readBytes(pair[0], count: sent.count)
        #expect(got == sent)
        #expect(SocketIO.readBytes(pair[0], count: 256 << 20) == nil)
    }

    @Test func connectionsOverTheCapAreClosedAndTheRestServed() throws {
        let h = try Harness { $0.maxConnections = 3 }
        let second = Harness.connect(h.server.path), third = Harness.connect(h.server.path)
        defer { close(second); close(third) }
        #expect(h.send(type: BLKSNAP_CONTROL_STATUS) != nil)
        let fourth = Harness.connect(h.server.path)
        defer { close(fourth) }
        #expect(Harness.hungUp(fourth))
        #expect(h.send(type: BLKSNAP_CONTROL_STATUS)?.result == 0)
    }
}
