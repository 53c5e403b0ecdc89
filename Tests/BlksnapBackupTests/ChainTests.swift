import XCTest
@testable import BlksnapBackup

func manifest(_ n: Int, parent: Int?, devices: [(String, UInt64, String, UInt8)] = [("/dev/loop64", 1 << 30, "gen-a", 1)]) -> Manifest {
    Manifest(number: n, kind: parent == nil ? .full : .incremental, parent: parent, takenAt: 1_700_000_000 + Int64(n),
             seconds: 1, snapshotId: "s\(n)", fallbackReason: nil,
             devices: devices.map { name, size, gen, snap in
                 Manifest.Device(name: name, file: Repository.fileName(forDevice: name), devId: "7:64", sizeBytes: size,
                                 generationId: gen, snapNumber: snap, blockSize: 65536, bytesCopied: 1, bytesScanned: 1,
                                 sha256: String(repeating: "0", count: 64))
             })
}

final class ChainTests: XCTestCase {
    func testResolveWalksParentsToTheFull() throws {
        let backups = [manifest(1, parent: nil), manifest(2, parent: 1), manifest(3, parent: 2), manifest(4, parent: nil), manifest(5, parent: 4)]
        XCTAssertEqual(try Chain.resolve(backups, number: 3).map(\.number), [1, 2, 3])
        XCTAssertEqual(try Chain.resolve(backups, number: 5).map(\.number), [4, 5])
        XCTAssertEqual(try Chain.resolve(backups, number: 1).map(\.number), [1])
    }

    func testResolveFailsOnAMissingLink() {
        XCTAssertThrowsError(try Chain.resolve([manifest(1, parent: nil), manifest(3, parent: 2)], number: 3)) { e in
            XCTAssertEqual((e as? BackupError)?.errno, .noSuchFileOrDirectory)
        }
        XCTAssertThrowsError(try Chain.resolve([manifest(1, parent: nil)], number: 7))
    }

    func testIncrementalOnTheSameGenerationAndSize() {
        let prev = manifest(2, parent: 1, devices: [("/dev/loop64", 1 << 30, "gen-a", 4)])
        let d = Chain.decide(previous: prev, devices: [.init(name: "/dev/loop64", sizeBytes: 1 << 30, generationId: "gen-a")],
                             wantIncremental: true)
        XCTAssertEqual(d, .incremental(parent: 2, since: ["/dev/loop64": 4]))
    }

    func testNewGenerationFallsBackToFull() {
        let prev = manifest(1, parent: nil)
        let d = Chain.decide(previous: prev, devices: [.init(name: "/dev/loop64", sizeBytes: 1 << 30, generationId: "gen-b")],
                             wantIncremental: true)
        guard case .full(let reason?) = d else { return XCTFail("\(d)") }
        XCTAssertTrue(reason.contains("new CBT generation"), reason)
    }

    func testResizedDeviceFallsBackToFull() {
        let prev = manifest(1, parent: nil)
        let d = Chain.decide(previous: prev, devices: [.init(name: "/dev/loop64", sizeBytes: 2 << 30, generationId: "gen-a")],
                             wantIncremental: true)
        guard case .full(let reason?) = d else { return XCTFail("\(d)") }
        XCTAssertTrue(reason.contains("changed size"), reason)
    }

    func testOtherDevicesOrNoPreviousFallBackToFull() {
        let prev = manifest(1, parent: nil)
        guard case .full(_?) = Chain.decide(previous: prev, devices: [.init(name: "/dev/loop65", sizeBytes: 1 << 30, generationId: "gen-a")],
                                            wantIncremental: true) else { return XCTFail() }
        guard case .full(_?) = Chain.decide(previous: prev, devices: [.init(name: "/dev/loop64", sizeBytes: 1 << 30, generationId: "gen-a"),
                                                                       .init(name: "/dev/loop65", sizeBytes: 1 << 30, generationId: "gen-c")],
                                            wantIncremental: true) else { return XCTFail() }
        guard case .full(_?) = Chain.decide(previous: nil, devices: [], wantIncremental: true) else { return XCTFail() }
        XCTAssertEqual(Chain.decide(previous: prev, devices: [], wantIncremental: false), .full(reason: nil))
    }

    func testPruneMergesTheOldestIntoItsChild() {
        let backups = [manifest(1, parent: nil), manifest(2, parent: 1), manifest(3, parent: 2), manifest(4, parent: 3)]
        XCTAssertEqual(Chain.prunePlan(backups, keep: 2), [.merge(from: 1, into: 2), .merge(from: 2, into: 3)])
        XCTAssertEqual(Chain.prunePlan(backups, keep: 4), [])
        XCTAssertEqual(Chain.prunePlan(backups, keep: 0), [])
    }

    func testPruneDropsAFullNothingDependsOn() {
        let backups = [manifest(1, parent: nil), manifest(2, parent: 1), manifest(3, parent: nil), manifest(4, parent: 3)]
        XCTAssertEqual(Chain.prunePlan(backups, keep: 2), [.merge(from: 1, into: 2), .drop(2)])
        XCTAssertEqual(Chain.prunePlan(backups, keep: 1), [.merge(from: 1, into: 2), .drop(2), .merge(from: 3, into: 4)])
    }
}
