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

    /// The hole the module leaves open: two snapshots given the same
    /// storage sectors would each store chunks over the other's. Devices X
    /// ('C') and Y ('D'), one snapshot each, both offered the same storage:
    /// the second offer is refused, and X's image keeps its 'C's after both
    /// devices are overwritten.
    @Test func storageHeldByAnotherSnapshotIsRefused() throws {
        let rig = Rig(devices: 2)
        let (x, y) = (rig.devices[0], rig.devices[1])
        try x.writeBytes([UInt8](repeating: 0x43, count: 1 << 20), at: 0)
        try y.writeBytes([UInt8](repeating: 0x44, count: 1 << 20), at: 0)
        let sx = try rig.engine.createSnapshot([x.devId])
        let sy = try rig.engine.createSnapshot([y.devId])
        try rig.engine.appendStorage(sx, device: Rig.storageId, ranges: [SectorRange(offset: 0, count: 65536)])
        #expect {
            try rig.engine.appendStorage(sy, device: Rig.storageId, ranges: [SectorRange(offset: 0, count: 65536)])
        } throws: { ($0 as? BlksnapError)?.errno == .resourceBusy }
        #expect {
            try rig.engine.appendStorage(sy, device: Rig.storageId, ranges: [SectorRange(offset: 65535, count: 2)])
        } throws: { ($0 as? BlksnapError)?.errno == .resourceBusy }
        try rig.engine.appendStorage(sy, device: Rig.storageId, ranges: [SectorRange(offset: 65536, count: 65536)])
        try rig.engine.takeSnapshot(sx)
        try rig.engine.takeSnapshot(sy)
        try x.writeBytes([UInt8](repeating: 0x45, count: 1 << 20), at: 0)
        try y.writeBytes([UInt8](repeating: 0x46, count: 1 << 20), at: 0)
        let ix = rig.engine.snapshot(sx)!.images[0], iy = rig.engine.snapshot(sy)!.images[0]
        #expect(try ix.readBytes(at: 0, count: 1 << 20) == [UInt8](repeating: 0x43, count: 1 << 20))
        #expect(try iy.readBytes(at: 0, count: 1 << 20) == [UInt8](repeating: 0x44, count: 1 << 20))
    }

    @Test func storageGivenTwiceToOneSnapshotIsRefused() throws {
        let rig = Rig(devices: 1)
        let id = try rig.engine.createSnapshot([rig.devices[0].devId])
        try rig.engine.appendStorage(id, device: Rig.storageId, ranges: [SectorRange(offset: 100, count: 50)])
        #expect {
            try rig.engine.appendStorage(id, device: Rig.storageId, ranges: [SectorRange(offset: 149, count: 1)])
        } throws: { ($0 as? BlksnapError)?.errno == .resourceBusy }
        #expect {
            try rig.engine.appendStorage(id, device: Rig.storageId,
                                         ranges: [SectorRange(offset: 0, count: 10), SectorRange(offset: 5, count: 10)])
        } throws: { ($0 as? BlksnapError)?.errno == .resourceBusy }
        // Touching is not overlapping; a refused request appended nothing.
        try rig.engine.appendStorage(id, device: Rig.storageId,
                                     ranges: [SectorRange(offset: 0, count: 10), SectorRange(offset: 150, count: 10)])
        #expect(rig.engine.snapshot(id)!.storage.capacitySectors == 70)
    }

    @Test func storageIsFreeAgainAfterDestroy() throws {
        let rig = Rig(devices: 2)
        let a = try rig.engine.createSnapshot([rig.devices[0].devId])
        try rig.engine.appendStorage(a, device: Rig.storageId, ranges: [SectorRange(offset: 0, count: 64)])
        try rig.engine.destroySnapshot(a)
        let b = try rig.engine.createSnapshot([rig.devices[1].devId])
        try rig.engine.appendStorage(b, device: Rig.storageId, ranges: [SectorRange(offset: 0, count: 64)])
        #expect(rig.engine.snapshot(b)!.storage.capacitySectors == 64)
    }
}
