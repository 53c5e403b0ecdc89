@testable import BlksnapNBD
import Testing

@Suite struct ChangedBlocksNameTests {
    @Test(arguments: [("blksnap:changed-since:0", 0), ("blksnap:changed-since:7", 7), ("blksnap:changed-since:255", 255)])
    func wellFormedNamesParse(name: String, n: Int) {
        #expect(ChangedBlocksContext.parse(name) == UInt8(n))
        #expect(MetaContext(name: name) == .changedSince(UInt8(n)))
    }

    @Test(arguments: ["blksnap:changed-since:", "blksnap:changed-since:256", "blksnap:changed-since:007",
                      "blksnap:changed-since:+7", "blksnap:changed-since:-1", "blksnap:changed-since:1 ",
                      "blksnap:changed-since:1000", "blksnap:cbt/1", "base:allocation:1"])
    func malformedNamesDoNot(name: String) {
        #expect(ChangedBlocksContext.parse(name) == nil)
        #expect(MetaContext(name: name) == nil)
    }

    @Test func nameRoundTrips() {
        #expect(MetaContext.changedSince(42).name == "blksnap:changed-since:42")
        #expect(MetaContext(name: "base:allocation") == .baseAllocation)
    }
}

@Suite struct ChangedBlocksExtentTests {
    // Blocks of 4 KiB.
    let map = CbtReadMap(bytes: [0, 3, 3, 1, 2, 0, 0, 5], blockShift: 12, snapNumber: 5)

    @Test func adjacentBlocksWithEqualFlagsMerge() {
        #expect(ChangedBlocksContext.extents(map: map, since: 1, offset: 0, length: 32768, maxExtents: 100) == [
            Extent(length: 4096, flags: 0), Extent(length: 8192, flags: 1), Extent(length: 4096, flags: 0),
            Extent(length: 4096, flags: 1), Extent(length: 8192, flags: 0), Extent(length: 4096, flags: 1),
        ])
    }

    @Test func sinceZeroIsEverythingWrittenSinceTrackingBegan() {
        #expect(ChangedBlocksContext.extents(map: map, since: 0, offset: 4096, length: 16384, maxExtents: 100) == [
            Extent(length: 16384, flags: 1),
        ])
    }

    @Test func sinceTheLatestSnapshotIsNothing() {
        #expect(ChangedBlocksContext.extents(map: map, since: 5, offset: 0, length: 32768, maxExtents: 100) == [
            Extent(length: 32768, flags: 0),
        ])
    }

    @Test func unalignedRequestIsClippedToItsOwnRange() {
        #expect(ChangedBlocksContext.extents(map: map, since: 1, offset: 4000, length: 200, maxExtents: 100) == [
            Extent(length: 96, flags: 0), Extent(length: 104, flags: 1),
        ])
    }

    @Test func reqOneGivesOnlyTheFirstExtent() {
        #expect(ChangedBlocksContext.extents(map: map, since: 1, offset: 0, length: 32768, maxExtents: 1) == [
            Extent(length: 4096, flags: 0),
        ])
    }

    @Test func blocksPastTheMapCountAsChanged() {
        #expect(ChangedBlocksContext.extents(map: map, since: 5, offset: 28672, length: 8192, maxExtents: 100) == [
            Extent(length: 4096, flags: 0), Extent(length: 4096, flags: 1),
        ])
    }

    @Test func longAnswersStopAtTheExtentLimit() {
        let alternating = CbtReadMap(bytes: (0..<1000).map { UInt8($0 % 2) }, blockShift: 9, snapNumber: 1)
        let extents = ChangedBlocksContext.extents(map: alternating, since: 0, offset: 0, length: 1000 * 512, maxExtents: 10)
        #expect(extents.count == 10)
        #expect(extents.reduce(0) { $0 + $1.length } == 10 * 512)
    }
}
