import BlksnapABI
@testable import BlksnapEngine
import BlksnapTestSupport
import Logging
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// What a test says the backing is; changed to play a replaced or
/// modified backing between two engines.
final class IdentityBox: @unchecked Sendable {
    var identity: BackingIdentity
    init(_ identity: BackingIdentity) { self.identity = identity }
}

/// One in-memory backing routed with a `CbtStore` in a temporary
/// directory, across as many engines (blksnapd runs) as a test makes.
final class PersistRig {
    let directory: String
    let backing: MemoryBlockDevice
    let identity: IdentityBox
    let devId = DevId(major: 7, minor: 0)
    let storage = MemoryBlockDevice(size: 64 << 20)
    var engine: Engine!
    var device: RoutedDevice!
    var store: CbtStore!

    init(size: UInt64 = 3 << 20) {
        var template = Array("/tmp/blksnap-cbt-XXXXXX".utf8CString)
        directory = String(cString: mkdtemp(&template)!)
        backing = MemoryBlockDevice(size: size)
        identity = IdentityBox(BackingIdentity(kind: .file, label: "/disks/a.img", size: size, device: 1, inode: 2, mtimeNs: 3))
        start()
    }

    deinit {
        for f in ["dev.cbt", "dev.intent", "dev.cbt.new"] { unlink(directory + "/" + f) }
        rmdir(directory)
    }

    var statePath: String { directory + "/dev.cbt" }
    var intentPath: String { directory + "/dev.intent" }

    /// A blksnapd starting: a new engine routes the same backing.
    func start() {
        let host = FakeHost()
        host.disks[Rig.storageId] = storage
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        engine = Engine(settings: Rig.smallSettings, host: host, logger: logger)
        let box = identity
        store = CbtStore(directory: directory, key: "dev", syncIntervalSeconds: 60) { box.identity }
        device = try! engine.route(devId, backing: backing, store: store)
    }

    /// SIGTERM: snapshots destroyed, devices unrouted (the map saved clean).
    func stop() {
        engine.destroyAll()
        try! engine.unroute(devId)
        (engine, device, store) = (nil, nil, nil)
    }

    /// kill -9: nothing more runs; what is on disk is what there is.
    func crash() {
        store.writeIntent?.close()
        (engine, device, store) = (nil, nil, nil)
    }

    func write(_ offset: UInt64, _ length: Int) throws {
        try device.writeBytes([UInt8](repeating: 0xA5, count: length), at: offset)
    }

    /// A snapshot taken and destroyed: the numbers move on by one.
    @discardableResult
    func take(keep: Bool = false) throws -> UUID16 {
        let id = try engine.createSnapshot([devId])
        try engine.appendStorage(id, device: Rig.storageId, ranges: [SectorRange(offset: 0, count: 8192)])
        try engine.takeSnapshot(id)
        if !keep { try engine.destroySnapshot(id) }
        return id
    }

    var info: CbtInfo? { engine.collectTrackers().first }
    var tables: (read: [UInt8], write: [UInt8])? { engine.tracker(devId)?.cbtMap.tables() }
}

@Suite struct CbtStoreTests {
    @Test func cleanStopRestoresEverything() throws {
        let rig = PersistRig()
        #expect(rig.device.cbtOutcome == .none)
        try rig.take()
        try rig.write(0, 4096)
        try rig.take()
        try rig.write(1 << 20, 8192)
        let before = try #require(rig.info)
        let tables = try #require(rig.tables)
        rig.stop()
        rig.start()
        #expect(rig.device.cbtOutcome == .restored)
        let after = try #require(rig.info)
        #expect(after.generationId == before.generationId)
        #expect(after.snapNumber == before.snapNumber)
        #expect(rig.tables! == tables)
        // The next backup reads every block written since snapshot 1.
        let id = try rig.take(keep: true)
        let map = try rig.engine.readCbtMap(rig.devId, offset: 0, length: UInt32(tables.write.count))
        #expect(map[0] == 2 && map[256] == 3 && map[257] == 3)
        #expect(map.enumerated().allSatisfy { i, v in [0, 256, 257].contains(i) || v == 0 })
        try rig.engine.destroySnapshot(id)
    }

    @Test func crashCountsMarkedRegionsAsWritten() throws {
        let rig = PersistRig()
        try rig.take()
        try rig.write(4096, 4096)                     // region 0, after the last save
        try rig.write((2 << 20) + 12288, 512)         // region 2
        let before = try #require(rig.info)
        let truth = try #require(rig.tables).write
        rig.crash()
        rig.start()
        #expect(rig.device.cbtOutcome == .restoredAfterCrash(regions: 2))
        let after = try #require(rig.info)
        #expect(after.generationId == before.generationId)
        #expect(after.snapNumber == before.snapNumber)
        let restored = try #require(rig.tables).write
        #expect(zip(restored, truth).allSatisfy { $0 >= $1 })
        // Region 1 was not written since the save: it stays as it was.
        #expect(restored[256..<512].allSatisfy { $0 == 0 })
        #expect(restored[0..<256].allSatisfy { $0 == 2 })
    }

    @Test func aSaveClearsTheIntentRecord() throws {
        let rig = PersistRig()
        try rig.take()
        try rig.write(0, 4096)
        #expect(rig.store.writeIntent?.markedCount == 1)
        rig.engine.saveCbt()
        #expect(rig.store.writeIntent?.markedCount == 0)
        let marked = try WriteIntent.markedRegions(path: rig.intentPath, regionShift: 20, capacity: 3 << 20)
        #expect(marked.isEmpty)
        rig.crash()
        rig.start()
        #expect(rig.device.cbtOutcome == .restoredAfterCrash(regions: 0))
        #expect(rig.tables!.write[0] == 2 && rig.tables!.write[1] == 0)
    }

    @Test func marksMadeDuringASaveSurviveIt() throws {
        let rig = PersistRig()
        try rig.take()
        let intent = try #require(rig.store.writeIntent)
        intent.beginSync()                            // a save copies the map ...
        try rig.write(1 << 20, 4096)                  // ... a write lands meanwhile ...
        rig.crash()                                   // ... and blksnapd dies before it clears the record
        rig.start()
        #expect(rig.tables!.write[256] == 2)
    }

    @Test func trackerRemoveForgetsTheState() throws {
        let rig = PersistRig()
        try rig.take()
        try rig.engine.removeTracker(rig.devId)
        #expect(access(rig.statePath, F_OK) != 0 && access(rig.intentPath, F_OK) != 0)
        rig.stop()
        rig.start()
        #expect(rig.device.cbtOutcome == .none)
        #expect(rig.info == nil)
    }

    /// Every way a saved state cannot be trusted: a new generation, the
    /// files gone, and why.
    @Test(arguments: ["truncated", "corrupted", "foreign", "empty", "resized", "replaced", "modified", "no intent",
                      "other parameters"])
    func untrustedStateStartsANewGeneration(_ fault: String) throws {
        let rig = PersistRig()
        try rig.take()
        try rig.write(0, 4096)
        let generation = try #require(rig.info).generationId
        if fault == "no intent" { rig.crash() } else { rig.stop() }
        var bytes = [UInt8](try DurableFile.read(rig.statePath, atMost: 1 << 20))
        switch fault {
        case "truncated": bytes.removeLast(bytes.count / 2)
        case "corrupted": bytes[bytes.count / 2] ^= 0x10
        case "foreign": bytes = Array("this is somebody else's file\n".utf8)
        case "empty": bytes = []
        case "resized": rig.identity.identity.size += 4096
        case "replaced": rig.identity.identity.inode += 1
        case "modified": rig.identity.identity.mtimeNs += 1
        case "no intent": unlink(rig.intentPath)
        default: break
        }
        try DurableFile.replace(rig.statePath, with: bytes)
        if fault == "other parameters" {
            var settings = Rig.smallSettings
            settings.trackingBlockMinimumShift = 13
            let box = rig.identity
            let host = FakeHost()
            host.disks[Rig.storageId] = rig.storage
            var logger = Logger(label: "test")
            logger.logLevel = .critical
            let engine = Engine(settings: settings, host: host, logger: logger)
            rig.store = CbtStore(directory: rig.directory, key: "dev", syncIntervalSeconds: 60) { box.identity }
            rig.device = try engine.route(rig.devId, backing: rig.backing, store: rig.store)
            rig.engine = engine
        } else {
            rig.start()
        }
        guard case .startedAnew(let why) = rig.device.cbtOutcome else {
            Issue.record("\(fault): \(rig.device.cbtOutcome)")
            return
        }
        let expected = ["truncated": "checksum", "corrupted": "checksum", "foreign": "not a CBT state", "empty": "truncated",
                        "resized": "bytes", "replaced": "inode", "modified": "modified", "no intent": "write-intent",
                        "other parameters": "tracking parameters"][fault]!
        #expect(why.contains(expected), "\(fault): \(why)")
        #expect(rig.info == nil)
        #expect(access(rig.statePath, F_OK) != 0)
        try rig.take()
        #expect(rig.info!.generationId != generation)
    }

    @Test func aFileBackingWrittenAfterACrashIsNotTrusted() throws {
        let rig = PersistRig()
        try rig.take()
        rig.crash()
        rig.identity.identity.mtimeNs = Int64.max / 2        // long after blksnapd could have written it
        rig.start()
        guard case .startedAnew(let why) = rig.device.cbtOutcome else {
            Issue.record("\(rig.device.cbtOutcome)")
            return
        }
        #expect(why.contains("modified after"))
    }

    @Test func intentRecordIsCheckedAgainstTheGeometry() throws {
        let rig = PersistRig()
        try rig.take()
        #expect(throws: BlksnapError.self) {
            try WriteIntent.markedRegions(path: rig.intentPath, regionShift: 20, capacity: 5 << 20)
        }
        #expect(try WriteIntent.markedRegions(path: rig.intentPath, regionShift: 20, capacity: 3 << 20) == [])
    }
}
