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
