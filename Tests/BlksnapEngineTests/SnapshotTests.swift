import BlksnapABI
@testable import BlksnapEngine
import Testing

@Suite struct SnapshotTests {
    @Test func imageKeepsPointInTimeWhileOriginalChanges() throws {
        let rig = Rig(devices: 1)
        let dev = rig.devices[0]
        try dev.writeBytes([UInt8](repeating: 1, count: 65536), at: 0)
        let id = try rig.engine.createSnapshot([dev.devId])
        try rig.engine.appendStorage(id, device: Rig.storageId, ranges: [SectorRange(offset: 0, count: 65536)])
        try rig.engine.takeSnapshot(id)
        try dev.writeBytes([UInt8](repeating: 2, count: 4096), at: 4096)
        let image = rig.engine.snapshot(id)!.images[0]
        #expect(try image.readBytes(at: 4096, count: 4096) == [UInt8](repeating: 1, count: 4096))
        #expect(try dev.readBytes(at: 4096, count: 4096) == [UInt8](repeating: 2, count: 4096))
        #expect(image.devId == DevId(major: 252, minor: 0))
    }

    @Test func imageWritesNeverReachTheOriginal() throws {
        let rig = Rig(devices: 1)
        let dev = rig.devices[0]
        let id = try rig.engine.createSnapshot([dev.devId])
        try rig.engine.appendStorage(id, device: Rig.storageId, ranges: [SectorRange(offset: 0, count: 65536)])
        try rig.engine.takeSnapshot(id)
        let image = rig.engine.snapshot(id)!.images[0]
        try image.writeBytes([UInt8](repeating: 9, count: 512), at: 1024)
        #expect(try image.readBytes(at: 1024, count: 512) == [UInt8](repeating: 9, count: 512))
        #expect(try dev.readBytes(at: 1024, count: 512) == [UInt8](repeating: 0, count: 512))
        let state = try rig.engine.sectorState(image: image.devId, sector: 2)
        #expect(state.chunkState & UInt32(ChunkState.dirty.rawValue) != 0)
        #expect(state.chunkState & UInt32(ChunkState.storeReady.rawValue) != 0)
    }
}
