import BlksnapABI
import BlksnapControlProtocol
import BlksnapEngine
@testable import BlksnapNBD
import BlksnapTestSupport
import Testing

@Suite struct DeviceExportsTests {
    /// Each device made is exported under its kernel name with a URI that
    /// names blksnapd's socket, and leaves both the server and the list
    /// when it goes.
    @Test func aDeviceIsExportedWhileItLives() throws {
        let engine = Engine(logger: quietLogger())
        let server = try Server(exports: [], logger: quietLogger())
        let exports = DeviceExports(server: server, socketPath: "/run/blksnap/nbd.sock", engine: engine, logger: quietLogger())
        let original = DevId(major: 7, minor: 64)
        exports.add(name: "loop64", device: MemoryBlockDevice(size: 1 << 20), devId: original, original: nil)
        exports.add(name: "blksnap-image0", device: MemoryBlockDevice(size: 1 << 20), devId: DevId(major: 251, minor: 0),
                    original: original)
        #expect(server.exportNames == ["loop64", "blksnap-image0"])
        #expect(exports.all == [
            .init(name: "loop64", devId: "7:64", uri: "nbd+unix:///loop64?socket=/run/blksnap/nbd.sock"),
            .init(name: "blksnap-image0", devId: "251:0", uri: "nbd+unix:///blksnap-image0?socket=/run/blksnap/nbd.sock"),
        ])
        exports.remove(name: "loop64")
        #expect(server.exportNames == ["blksnap-image0"])
        #expect(exports.all.map(\.name) == ["blksnap-image0"])
    }

    /// A name the server refuses (a second export of it) is not listed.
    @Test func aRefusedExportIsNotListed() throws {
        let engine = Engine(logger: quietLogger())
        let server = try Server(exports: [], logger: quietLogger())
        let exports = DeviceExports(server: server, socketPath: "/s", engine: engine, logger: quietLogger())
        exports.add(name: "nbd3", device: MemoryBlockDevice(size: 4096), devId: DevId(major: 43, minor: 3), original: nil)
        exports.add(name: "nbd3", device: MemoryBlockDevice(size: 4096), devId: DevId(major: 43, minor: 4), original: nil)
        #expect(exports.all.map(\.devId) == ["43:3"])
    }
}
