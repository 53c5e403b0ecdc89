import BlksnapABI
import BlksnapEngine
@testable import BlksnapNBD
import BlksnapTestSupport
import Glibc
import Testing

/// blksnap-nbd-serve's --snapshot device: each take starts a new point in
/// time under the same image export, and the change map counts on.
@Suite struct RollingSnapshotTests {
    let engine = Engine()
    let backing = MemoryBlockDevice(size: 1 << 20)
    let original: RoutedDevice
    let disk: RollingSnapshot

    init() throws {
        original = try engine.route(DevId(major: 250, minor: 0), backing: backing)
        disk = try RollingSnapshot(engine: engine, name: "disk", devId: DevId(major: 250, minor: 0),
                                   storageId: DevId(major: 250, minor: 1000), size: original.size)
    }

    func fill(_ byte: UInt8, at offset: UInt64) throws {
        let bytes = [UInt8](repeating: byte, count: 4096)
        try bytes.withUnsafeBytes { try original.write($0, at: offset) }
    }

    func image(at offset: UInt64) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 4096)
        try bytes.withUnsafeMutableBytes { try disk.image.read(into: $0, at: offset) }
        return bytes
    }

    @Test func theImageReadsTheLatestSnapshotAcrossTakes() throws {
        defer { engine.destroyAll() }
        try fill(0xA1, at: 0)
        let first = try disk.take()
        try fill(0xB2, at: 0)
        #expect(try image(at: 0) == [UInt8](repeating: 0xA1, count: 4096))
        let second = try disk.take()
        #expect(second == first &+ 1)
        #expect(try image(at: 0) == [UInt8](repeating: 0xB2, count: 4096))
        try fill(0xC3, at: 0)
        #expect(try image(at: 0) == [UInt8](repeating: 0xB2, count: 4096))
        // One snapshot at a time: the previous one was destroyed.
        #expect(engine.collectSnapshots().count == 1)
    }

    @Test func theImageIsReadOnlyAndFailsBeforeTheFirstTake() throws {
        defer { engine.destroyAll() }
        var bytes = [UInt8](repeating: 0, count: 512)
        #expect(throws: BlksnapError.self) { try bytes.withUnsafeMutableBytes { try disk.image.read(into: $0, at: 0) } }
        _ = try disk.take()
        #expect(disk.image.size == original.size)
        let refused = bytes.withUnsafeBytes { b -> BlksnapError? in
            do throws(BlksnapError) { try disk.image.write(b, at: 0) } catch { return error }
            return nil
        }
        #expect(refused?.errno == .readOnlyFileSystem)
    }
}
