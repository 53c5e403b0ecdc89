import XCTest
@testable import BlksnapBackup

final class ChangedExtentsTests: XCTestCase {
    func testBlocksAboveThePreviousSnapNumberAreChangedAndMerged() {
        // Snap numbers of 8 blocks of 64 KiB; the previous backup took snapshot 2.
        let map: [UInt8] = [0, 3, 3, 2, 4, 1, 5, 5]
        let got = ChangedExtents.since(2, map: map, blockSize: 65536, capacity: 8 * 65536)
        XCTAssertEqual(got, [ByteExtent(offset: 65536, length: 2 * 65536),
                             ByteExtent(offset: 4 * 65536, length: 65536),
                             ByteExtent(offset: 6 * 65536, length: 2 * 65536)])
    }

    func testTheLastBlockIsCutAtTheDeviceEnd() {
        let got = ChangedExtents.since(0, map: [1, 1], blockSize: 65536, capacity: 65536 + 4096)
        XCTAssertEqual(got, [ByteExtent(offset: 0, length: 65536 + 4096)])
    }

    func testSinceTheLatestSnapshotNothingChanged() {
        XCTAssertEqual(ChangedExtents.since(5, map: [5, 4, 0, 5], blockSize: 4096, capacity: 4 * 4096), [])
    }

    func testSinceZeroEverythingWrittenCounts() {
        XCTAssertEqual(ChangedExtents.since(0, map: [0, 1, 0], blockSize: 4096, capacity: 3 * 4096),
                       [ByteExtent(offset: 4096, length: 4096)])
    }

    func testPiecesAreAlignedToThePieceSize() {
        let pieces = ChangedExtents.pieces(of: [ByteExtent(offset: 3 << 20, length: 6 << 20)], piece: 4 << 20)
        XCTAssertEqual(pieces, [ByteExtent(offset: 3 << 20, length: 1 << 20),
                                ByteExtent(offset: 4 << 20, length: 4 << 20),
                                ByteExtent(offset: 8 << 20, length: 1 << 20)])
        XCTAssertEqual(ChangedExtents.total(pieces), 6 << 20)
    }
}
