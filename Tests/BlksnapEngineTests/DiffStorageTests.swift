import BlksnapABI
@testable import BlksnapEngine
import BlksnapTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

@Suite struct DiffStorageTests {
    private func storage(minimum: UInt64 = 1024) -> (DiffStorage, EventQueue) {
        let q = EventQueue()
        return (DiffStorage(minimum: minimum, events: q, logger: .init(label: "t")), q)
    }

    @Test func createAsksForTheMinimumAtOnce() throws {
        let (s, q) = storage(minimum: 262_144)
        let e = try q.wait(timeoutMs: 0)
        #expect(e.code == .lowFreeSpace)
        #expect(EventLowFreeSpace(wire: Array(e.data.prefix(8))).requestedSectors == 262_144)
        #expect(s.requestedSectors == 262_144)
    }

    @Test func chunksAreCutSequentiallyAndShortTailsSkipped() throws {
        let (s, _) = storage()
        let disk = MemoryBlockDevice(size: 1 << 20)
        try s.append(device: disk, deviceId: DevId(major: 8, minor: 0), ranges: [SectorRange(offset: 10, count: 100), SectorRange(offset: 500, count: 64)])
        #expect(s.allocate(sectors: 64)?.offset == 10 * 512)
        // 36 sectors left in the first range: too few, so the next range is used.
        #expect(s.allocate(sectors: 64)?.offset == 500 * 512)
        #expect(s.allocate(sectors: 1) == nil)
        #expect(s.filledSectors == 164)
    }

    @Test func halfMinimumLeftAsksOnceUntilCapacityCatchesUp() throws {
        let (s, q) = storage(minimum: 1024)
        _ = try q.wait(timeoutMs: 0)
        let disk = MemoryBlockDevice(size: 4 << 20)
        try s.append(device: disk, deviceId: DevId(major: 8, minor: 0), ranges: [SectorRange(offset: 0, count: 1024)])
        _ = s.allocate(sectors: 256)    // 768 left: more than half
        #expect(q.pending.isEmpty)
        _ = s.allocate(sectors: 256)    // 512 left: half, ask
        #expect(q.pending.count == 1)
        #expect(s.requestedSectors == 2048)
        _ = s.allocate(sectors: 256)
        #expect(q.pending.count == 1)  // not again until appended
        try s.append(device: disk, deviceId: DevId(major: 8, minor: 0), ranges: [SectorRange(offset: 1024, count: 1024)])
        _ = s.allocate(sectors: 256)    // fills the first range: 2048 - 1024 left
        _ = s.allocate(sectors: 256)    // 768 left: no event
        #expect(q.pending.count == 1)
        _ = s.allocate(sectors: 256)    // 512 left: ask again
        #expect(q.pending.count == 2)
        #expect(s.requestedSectors == 3072)
    }

    @Test func rangesPastTheirDeviceAreRefused() {
        let (s, _) = storage()
        let disk = MemoryBlockDevice(size: 1 << 20)
        #expect(throws: BlksnapError.self) { try s.append(device: disk, deviceId: DevId(major: 8, minor: 0), ranges: [SectorRange(offset: 2040, count: 9)]) }
        #expect(s.capacitySectors == 0)
    }
}
