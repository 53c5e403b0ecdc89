import XCTest
@testable import BlksnapBackup

final class ManifestTests: XCTestCase {
    func testRoundTrip() throws {
        var m = manifest(3, parent: 2, devices: [("/dev/loop64", 1 << 30, "gen-a", 7), ("/dev/loop65", 1 << 29, "gen-b", 7)])
        m.fallbackReason = nil
        let back = try Manifest.decode(try m.encoded())
        XCTAssertEqual(back, m)
        XCTAssertEqual(back.device(named: "loop65")?.sizeBytes, 1 << 29)
        XCTAssertEqual(back.bytesCopied, 2)
    }

    func testInconsistentManifestsAreRefused() throws {
        var m = manifest(2, parent: 2)
        XCTAssertThrowsError(try Manifest.decode(try m.encoded()))
        m = manifest(2, parent: nil)
        m.kind = .incremental
        XCTAssertThrowsError(try Manifest.decode(try m.encoded()))
        m = manifest(2, parent: 1)
        m.devices[0].file = "../0001/loop64.qcow2"
        XCTAssertThrowsError(try Manifest.decode(try m.encoded()))
        m = manifest(2, parent: 1)
        m.format = 99
        XCTAssertThrowsError(try Manifest.decode(try m.encoded()))
    }

    func testFileNamesOfDevices() {
        XCTAssertEqual(Repository.fileName(forDevice: "/dev/loop64"), "loop64.qcow2")
        XCTAssertEqual(Repository.fileName(forDevice: "/dev/mapper/vg-root"), "mapper-vg-root.qcow2")
        XCTAssertEqual(Repository.fileName(forDevice: "/dev/.x"), "disk.x.qcow2")
        XCTAssertEqual(Repository.fileName(forDevice: "/srv/disks/data"), "data.qcow2")
    }

    func testUtcText() {
        XCTAssertEqual(Manifest.utcText(0), "1970-01-01T00:00:00Z")
        XCTAssertEqual(Manifest.utcText(1_700_000_000), "2023-11-14T22:13:20Z")
        XCTAssertEqual(Manifest.utcText(951_782_400), "2000-02-29T00:00:00Z")
    }

    func testRepositoryListsOnlyBackupsWithAManifest() throws {
        let root = "/tmp/bkp-repo-test-\(getpid())"
        defer { try? FileSystem.removeTree(root) }
        let repo = try Repository(path: root, create: true)
        try FileSystem.makeDirectories(repo.directory(1))
        try repo.commit(manifest(1, parent: nil))
        try FileSystem.makeDirectories(repo.directory(2))  // a run that died before its manifest
        try FileSystem.makeDirectories(repo.directory(3))
        try FileSystem.writeAtomically(repo.directory(3) + "/manifest.json", Array("{".utf8))
        let listing = repo.backups()
        XCTAssertEqual(listing.good.map(\.number), [1])
        XCTAssertEqual(listing.incomplete, [2])
        XCTAssertEqual(listing.damaged.map(\.0), [3])
        try repo.remove(2)
        XCTAssertEqual(repo.numberedDirectories(), [1, 3])
    }

    func testJSONQuoting() {
        XCTAssertEqual(JSONText.quote("a\"b\\c\n\u{1}"), #""a\"b\\c\n\u0001""#)
    }
}
