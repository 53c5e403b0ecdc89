import BlksnapABI
@testable import BlksnapEngine
import Testing
#if canImport(Glibc)
import Glibc
#endif

@Suite struct CbtMapTests {
    private func map(capacity: UInt64 = 1 << 20) -> CbtMap {
        var s = EngineSettings()
        s.trackingBlockMinimumShift = 12
        return CbtMap(capacity: capacity, settings: s)
    }

    @Test func blockSizeDoublesUntilTheCountFits() {
        let s = EngineSettings()
        let tib = CbtMap(capacity: 1 << 40, settings: s)
        #expect(tib.blockSize == 512 << 10)
        #expect(tib.blockCount == 1 << 21)
        let small = CbtMap(capacity: 100 << 20, settings: s)
        #expect(small.blockSize == 64 << 10)
        #expect(small.blockCount == 1600)
        let odd = CbtMap(capacity: (64 << 10) + 512, settings: s)
        #expect(odd.blockCount == 2)
    }

    @Test func writesMarkTheWriteMapWithActive() throws {
        let m = map()
        m.set(offset: 4096 * 3 + 100, length: 4096)
        let t = m.tables()
        #expect(t.write[3] == 1 && t.write[4] == 1 && t.write[2] == 0 && t.write[5] == 0)
        #expect(t.read.allSatisfy { $0 == 0 })
    }

    @Test func takeFreezesTheReadMapAndMovesTheNumbersOn() throws {
        let m = map()
        m.set(offset: 0, length: 1)
        m.switchMaps()
        #expect(m.snapNumberPrevious == 1 && m.snapNumberActive == 2)
        m.set(offset: 4096, length: 1)
        let t = m.tables()
        #expect(t.read[0] == 1 && t.read[1] == 0)
        #expect(t.write[0] == 1 && t.write[1] == 2)
        #expect(try m.read(offset: 0, length: 2) == [1, 0])
    }

    @Test func wrapAt256StartsANewGeneration() {
        let m = map()
        let first = m.generationId
        m.set(offset: 0, length: 1)
        for _ in 0..<254 { m.switchMaps() }
        #expect(m.snapNumberActive == 255 && m.generationId == first)
        m.switchMaps()
        #expect(m.snapNumberPrevious == 255)
        #expect(m.snapNumberActive == 1)
        #expect(m.generationId != first)
        #expect(m.tables().write.allSatisfy { $0 == 0 })
        #expect(m.tables().read[0] == 1)
    }

    @Test func setBothMarksReadMapWithPrevious() throws {
        let m = map()
        m.switchMaps()
        m.switchMaps()
        try m.setBoth(offset: 8192, length: 512)
        let t = m.tables()
        #expect(t.write[2] == 3 && t.read[2] == 2)
    }

    @Test func readPastTheEndGivesNothingAndClampsLength() throws {
        let m = map(capacity: 10 * 4096)
        m.switchMaps()
        #expect(try m.read(offset: 8, length: 100).count == 2)
        #expect(try m.read(offset: 10, length: 1).isEmpty)
        #expect(try m.read(offset: 11, length: 1).isEmpty)
    }

    @Test func rangesPastTheMapAreRefused() {
        let m = map(capacity: 10 * 4096)
        #expect(m.contains(sectorOffset: 0, sectorCount: 80))
        #expect(!m.contains(sectorOffset: 0, sectorCount: 81))
        #expect(!m.contains(sectorOffset: UInt64.max, sectorCount: 2))
        #expect(throws: BlksnapError.self) { try m.setBoth(offset: 40960, length: 1) }
    }

    @Test func oneTebibyteFitsItsMapsInUnder24MiB() {
        let s = EngineSettings()
        let m = CbtMap(capacity: 1 << 40, settings: s)
        let (_, chunks) = EngineSettings.shift(capacity: 1 << 40, minimum: s.chunkMinimumShift,
                                               maximum: s.chunkMaximumShift, maximumCount: s.chunkMaximumCount)
        let bytes = 2 * m.blockCount + Int(chunks)
        #expect(bytes < 24 << 20)
    }
}

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

@Suite struct EventQueueTests {
    @Test func nothingQueuedTimesOutWithENOENT() {
        let q = EventQueue()
        let start = monotonicNanoseconds()
        #expect { try q.wait(timeoutMs: 30) } throws: { ($0 as? BlksnapError)?.errno == .noSuchFileOrDirectory }
        #expect(monotonicNanoseconds() - start >= 25_000_000)
    }

    @Test func eventsComeOutInOrderWithBootTimeLabels() throws {
        let q = EventQueue()
        q.post(.lowFreeSpace, data: [1])
        q.post(.corrupted, data: [2])
        let a = try q.wait(timeoutMs: 0)
        let b = try q.wait(timeoutMs: 0)
        #expect(a.code == .lowFreeSpace && b.code == .corrupted)
        #expect(a.timeLabel > 0 && b.timeLabel >= a.timeLabel)
    }

    @Test func closingWakesWaitersWithESRCH() {
        let q = EventQueue()
        startThread { usleep(20_000); q.close() }
        #expect { try q.wait(timeoutMs: 5000) } throws: { ($0 as? BlksnapError)?.errno == .noSuchProcess }
    }
}
