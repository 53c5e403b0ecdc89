import BlksnapABI
import BlksnapEngine
import CBlksnapABI
import Logging
import Testing
@testable import BlksnapShimServer
#if canImport(Glibc)
import Glibc
#endif

/// A server on a fresh socket, and a raw client speaking blksnap_control.h.
final class Harness {
    let dir: String
    let server: ControlServer
    let engine: Engine
    let fd: Int32

    init() throws {
        var template = Array("/tmp/blksnap-ctl-XXXXXX".utf8CString)
        dir = String(cString: mkdtemp(&template)!)
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        engine = Engine(logger: logger)
        server = ControlServer(path: dir + "/control.sock", control: Control(engine: engine), logger: logger)
        try server.start()
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let path = server.path
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in path.utf8.enumerated() { raw[i] = b }
        }
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        precondition(rc == 0)
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
}
