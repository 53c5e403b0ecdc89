import BlksnapABI
import BlksnapControlProtocol
import BlksnapDevices
import BlksnapEngine
import FoundationEssentials
import Logging
import Testing

/// A maker that records what the data plane asks of it; `reclaims` says
/// whether its devices can outlive their server (kernel NBD) or not
/// (FUSE+loop).
final class FakeMaker: DeviceMaker, @unchecked Sendable {
    let kind: String
    let reclaims: Bool
    private(set) var next = 100
    private(set) var bound: [Int: String] = [:]
    private(set) var reclaimed: [(MadeDevice, String)] = []
    private(set) var abandoned: [(MadeDevice, String)] = []

    init(kind: String = "fake", reclaims: Bool = true) {
        (self.kind, self.reclaims) = (kind, reclaims)
    }

    func start() throws(BlksnapError) {}
    func stop() {}
    func reserve(image: Bool) throws(BlksnapError) -> MadeDevice {
        next += 1
        return MadeDevice(name: "fake\(next)", node: "/dev/fake\(next)", devId: DevId(major: 250, minor: UInt32(next)), index: next)
    }
    func bind(_ made: MadeDevice, to device: any BlockDevice, backend: String) throws(BlksnapError) {
        bound[made.index] = backend
    }
    func unbind(_ made: MadeDevice) { bound[made.index] = nil }
    func release(_ made: MadeDevice) {}
    func reclaim(_ made: MadeDevice, as device: any BlockDevice, backend: String) throws(BlksnapError) {
        guard reclaims else { throw BlksnapError(.notSupported, "cannot outlive its server") }
        reclaimed.append((made, backend))
        bound[made.index] = backend
    }
    func abandon(_ made: MadeDevice, backend: String) { abandoned.append((made, backend)) }
    /// How many devices were reclaimed and abandoned when resume came.
    private(set) var resumedAfter: [Int]?
    func resume() { resumedAfter = [reclaimed.count, abandoned.count] }
    /// What the maker says serves each device now (nil: the kind has no connections).
    var serving: Int?
    func servingConnections(_ made: MadeDevice) -> Int? { serving }
    /// Devices left in the kernel at a stop (only where `reclaims`).
    private(set) var left: [MadeDevice] = []
    func leave(_ made: MadeDevice) -> Bool {
        guard reclaims else { return false }
        left.append(made)
        return true
    }
}

/// A scratch directory with a state list and backing files.
struct Scratch: ~Copyable {
    let path: String
    init() {
        path = FileManager.default.temporaryDirectory.appendingPathComponent("blksnap-devices-\(UUID().uuidString)").path
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
    var list: String { path + "/devices.json" }

    func file(_ name: String, size: Int) -> String {
        let p = path + "/" + name
        #expect(FileManager.default.createFile(atPath: p, contents: Data(count: size)))
        return p
    }
}

func plane(_ maker: FakeMaker, _ scratch: borrowing Scratch) -> (DataPlane, Engine) {
    var logger = Logger(label: "test")
    logger.logLevel = .critical
    let plane = DataPlane(maker: maker, logger: logger, listPath: scratch.list)
    return (plane, Engine(hooks: plane, logger: logger))
}

/// What a blksnapd that died left: `saved` in the list, then a new plane
/// started on it.
func restart(after saved: SavedDevices, _ maker: FakeMaker, _ scratch: borrowing Scratch) throws -> (DataPlane, Engine) {
    try saved.store(to: scratch.list)
    let (dataPlane, engine) = plane(maker, scratch)
    try dataPlane.start(engine: engine)
    return (dataPlane, engine)
}

let fake7 = MadeDevice(name: "fake7", node: "/dev/fake7", devId: DevId(major: 250, minor: 7), index: 7)

func routedDevice(_ made: MadeDevice, kind: String, backing: String, size: UInt64) -> SavedDevices.Device {
    SavedDevices.Device(kind: kind, made: made, backend: "blksnap-swift routes \(backing)", backing: backing, sizeBytes: size)
}

@Suite struct SavedDevicesTests {
    @Test func aMissingListIsEmpty() throws {
        let scratch = Scratch()
        #expect(try SavedDevices.load(from: scratch.list).isEmpty)
    }

    @Test func aListReadsBackAsWritten() throws {
        let scratch = Scratch()
        let made = MadeDevice(name: "nbd15", node: "/dev/nbd15", devId: DevId(major: 43, minor: 15), index: 15)
        let list = SavedDevices(routed: [routedDevice(made, kind: "kernel NBD", backing: "/srv/a.img", size: 1 << 20)],
                                images: [.init(kind: "kernel NBD", made: made, backend: "b", nodes: ["/dev/blksnap-image0"])])
        try list.store(to: scratch.list)
        #expect(try SavedDevices.load(from: scratch.list) == list)
        try SavedDevices().store(to: scratch.list)
        #expect(!FileManager.default.fileExists(atPath: scratch.list))
    }

    @Test func aDeviceKeepsItsConnectionCountAndAnOlderListMeansOne() throws {
        let scratch = Scratch()
        let made = MadeDevice(name: "nbd15", node: "/dev/nbd15", devId: DevId(major: 43, minor: 15), index: 15,
                              connections: 3)
        try SavedDevices(routed: [routedDevice(made, kind: "kernel NBD", backing: "/srv/a.img", size: 1 << 20)])
            .store(to: scratch.list)
        #expect(try SavedDevices.load(from: scratch.list).routed.map(\.made) == [made])
        // A list written before devices had more than one connection.
        let older = #"{"routed": [{"kind": "kernel NBD", "name": "nbd15", "node": "/dev/nbd15", "major": 43, "minor": 15, "index": 15, "backend": "b", "backing": "/srv/a.img", "sizeBytes": 1048576}], "images": []}"#
        #expect(FileManager.default.createFile(atPath: scratch.list, contents: Data(older.utf8)))
        #expect(try SavedDevices.load(from: scratch.list).routed.map(\.made.connections) == [1])
        // One connection is written as none, so such a list stays as it was.
        let one = SavedDevices.Device(kind: "kernel NBD", made: fake7, backend: "b")
        #expect(one.connections == nil)
    }

    @Test(arguments: [-1, 1 << 32, Int.max])
    func aDeviceNumberNoDeviceCanHaveIsAnErrorNotATrap(index: Int) throws {
        let scratch = Scratch()
        let made = MadeDevice(name: "nbd15", node: "/dev/nbd15", devId: DevId(major: 43, minor: 15), index: index)
        try SavedDevices(routed: [routedDevice(made, kind: "fake", backing: "/srv/a.img", size: 1 << 20)])
            .store(to: scratch.list)
        let error = #expect(throws: BlksnapError.self) { try SavedDevices.load(from: scratch.list) }
        #expect(error?.errno == .invalidArgument)
        #expect(error?.description.contains("device number \(index)") == true)
        // blksnapd refuses to start on it rather than reaching the kernel.
        let maker = FakeMaker()
        let (dataPlane, engine) = plane(maker, scratch)
        #expect(throws: BlksnapError.self) { try dataPlane.start(engine: engine) }
        #expect(maker.reclaimed.isEmpty && maker.abandoned.isEmpty)
    }

    @Test func anUnreadableListIsAnErrorNotAnEmptyList() throws {
        let scratch = Scratch()
        #expect(FileManager.default.createFile(atPath: scratch.list, contents: Data("{ not json".utf8)))
        #expect(throws: BlksnapError.self) { try SavedDevices.load(from: scratch.list) }
        let maker = FakeMaker()
        let (dataPlane, engine) = plane(maker, scratch)
        #expect(throws: BlksnapError.self) { try dataPlane.start(engine: engine) }
    }
}

@Suite struct RecoveryTests {
    @Test func attachAndDetachKeepTheListAndACleanStopRemovesIt() throws {
        let scratch = Scratch()
        let maker = FakeMaker()
        let (dataPlane, engine) = plane(maker, scratch)
        try dataPlane.start(engine: engine)
        let backing = scratch.file("a.img", size: 1 << 20)
        let attached = try dataPlane.attach(backing: backing)
        let list = try SavedDevices.load(from: scratch.list)
        #expect(list.routed.map(\.node) == [attached.node])
        #expect(list.routed.first?.backing == backing)
        #expect(list.routed.first?.sizeBytes == 1 << 20)
        #expect(list.routed.first?.backend == maker.bound[101])
        dataPlane.stop()
        #expect(!FileManager.default.fileExists(atPath: scratch.list))
    }

    @Test func aRoutedDeviceIsReclaimedWithItsConnectionsAndKeepsThemInTheList() throws {
        let scratch = Scratch()
        let backing = scratch.file("a.img", size: 1 << 20)
        var made = fake7
        made.connections = 4
        let saved = routedDevice(made, kind: "fake", backing: backing, size: 1 << 20)
        let maker = FakeMaker()
        _ = try restart(after: SavedDevices(routed: [saved]), maker, scratch)
        #expect(maker.reclaimed.map(\.0.connections) == [4])
        #expect(try SavedDevices.load(from: scratch.list).routed.map(\.connections) == [4])
    }

    @Test func statusSaysHowManyOfADevicesConnectionsServeIt() throws {
        let scratch = Scratch()
        let backing = scratch.file("a.img", size: 1 << 20)
        var made = fake7
        made.connections = 4
        let maker = FakeMaker()
        maker.serving = 3
        let (dataPlane, engine) = try restart(after: SavedDevices(routed: [routedDevice(made, kind: "fake", backing: backing, size: 1 << 20)]),
                                              maker, scratch)
        var status = DaemonStatus(engine: engine.status())
        DeviceRequests.describe(&status, dataPlane, engine)
        #expect(status.devices.map(\.connections) == ["3/4"])
        // A kind without connections shows none.
        maker.serving = nil
        status = DaemonStatus(engine: engine.status())
        DeviceRequests.describe(&status, dataPlane, engine)
        #expect(status.devices.map(\.connections) == [nil])
        dataPlane.stop()
    }

    @Test(arguments: [true, false])
    func aCleanStopLeavesADeviceInUseToTheNextBlksnapdWhereItsKindCan(reclaims: Bool) throws {
        let scratch = Scratch()
        let maker = FakeMaker(reclaims: reclaims)
        let (dataPlane, engine) = plane(maker, scratch)
        try dataPlane.start(engine: engine)
        let busy = try dataPlane.attach(backing: scratch.file("busy.img", size: 1 << 20))
        let idle = try dataPlane.attach(backing: scratch.file("idle.img", size: 1 << 20))
        dataPlane.inUse = { devId, _ in devId.description == busy.devId ? "mounted on /mnt" : nil }
        dataPlane.stop()
        // The engine lets go of both (saving their CBT); only a device in
        // use on a kind that outlives blksnapd stays bound, and listed for
        // the next blksnapd.
        #expect(engine.routedDevices.isEmpty)
        #expect(maker.left.map(\.node) == (reclaims ? [busy.node] : []))
        #expect(maker.bound.count == (reclaims ? 1 : 0))
        let list = try SavedDevices.load(from: scratch.list)
        #expect(list.routed.map(\.node) == (reclaims ? [busy.node] : []))
        #expect(!list.routed.contains { $0.node == idle.node })
        if reclaims {
            // The next blksnapd serves it again under its number.
            let next = FakeMaker()
            let (plane2, engine2) = try restart(after: list, next, scratch)
            #expect(next.reclaimed.map(\.0.node) == [busy.node])
            #expect(engine2.routedDevices.map(\.devId.description) == [busy.devId])
            plane2.stop()
        }
    }

    @Test func aRoutedDeviceIsServedAgainUnderItsNumber() throws {
        let scratch = Scratch()
        let backing = scratch.file("a.img", size: 1 << 20)
        let made = fake7
        let saved = routedDevice(made, kind: "fake", backing: backing, size: 1 << 20)
        let maker = FakeMaker()
        let (dataPlane, engine) = try restart(after: SavedDevices(routed: [saved]), maker, scratch)
        #expect(maker.reclaimed.map(\.0) == [made])
        #expect(maker.reclaimed.map(\.1) == [saved.backend])
        #expect(maker.abandoned.isEmpty)
        #expect(engine.routedDevice(made.devId) != nil)
        #expect(try SavedDevices.load(from: scratch.list).routed == [saved])
        // The device is the plane's again: detach undoes it.
        try dataPlane.detach(made.devId)
        #expect(engine.routedDevice(made.devId) == nil)
    }

    /// A FUSE maker holds the kernel's requests back until every file is
    /// served again: resume comes last.
    @Test func theMakerResumesOnceEveryDeviceIsReclaimedOrAbandoned() throws {
        let scratch = Scratch()
        let backing = scratch.file("a.img", size: 1 << 20)
        let image = MadeDevice(name: "fake0", node: "/dev/fake0", devId: DevId(major: 250, minor: 0), index: 0)
        let saved = SavedDevices(routed: [routedDevice(fake7, kind: "fake", backing: backing, size: 1 << 20)],
                                 images: [.init(kind: "fake", made: image, backend: "image", nodes: [])])
        let maker = FakeMaker()
        _ = try restart(after: saved, maker, scratch)
        #expect(maker.resumedAfter == [1, 1])
    }

    @Test func imagesAreUndoneSinceTheirSnapshotsDied() throws {
        let scratch = Scratch()
        let node = scratch.file("blksnap-image0", size: 0)
        let made = MadeDevice(name: "fake0", node: "/dev/fake0", devId: DevId(major: 250, minor: 0), index: 0)
        let maker = FakeMaker()
        _ = try restart(after: SavedDevices(images: [.init(kind: "fake", made: made, backend: "image", nodes: [node])]), maker, scratch)
        #expect(maker.abandoned.map(\.0) == [made])
        #expect(maker.abandoned.map(\.1) == ["image"])
        #expect(!FileManager.default.fileExists(atPath: node))
        #expect(!FileManager.default.fileExists(atPath: scratch.list))
    }

    @Test func aBackingThatChangedSizeIsNotServedAgain() throws {
        let scratch = Scratch()
        let backing = scratch.file("a.img", size: 2 << 20)
        let made = fake7
        let maker = FakeMaker()
        let (_, engine) = try restart(after: SavedDevices(routed: [routedDevice(made, kind: "fake", backing: backing, size: 1 << 20)]), maker, scratch)
        #expect(maker.reclaimed.isEmpty)
        #expect(maker.abandoned.map(\.0) == [made])
        #expect(engine.routedDevice(made.devId) == nil)
        #expect(!FileManager.default.fileExists(atPath: scratch.list))
    }

    @Test func aMakerWhoseDevicesDieWithTheServerAbandonsThem() throws {
        let scratch = Scratch()
        let backing = scratch.file("a.img", size: 1 << 20)
        let made = fake7
        let maker = FakeMaker(reclaims: false)
        let (_, engine) = try restart(after: SavedDevices(routed: [routedDevice(made, kind: "fake", backing: backing, size: 1 << 20)]), maker, scratch)
        #expect(maker.abandoned.map(\.0) == [made])
        // Unrouted again, so a new attach of the same backing can take the number.
        #expect(engine.routedDevice(made.devId) == nil)
        #expect(!FileManager.default.fileExists(atPath: scratch.list))
    }

    @Test func devicesOfAnotherKindAreLeftAloneAndKept() throws {
        let scratch = Scratch()
        let backing = scratch.file("a.img", size: 1 << 20)
        let made = MadeDevice(name: "nbd15", node: "/dev/nbd15", devId: DevId(major: 43, minor: 15), index: 15)
        let other = routedDevice(made, kind: "kernel NBD", backing: backing, size: 1 << 20)
        let maker = FakeMaker()
        let (dataPlane, engine) = try restart(after: SavedDevices(routed: [other]), maker, scratch)
        #expect(maker.reclaimed.isEmpty && maker.abandoned.isEmpty)
        #expect(engine.routedDevice(made.devId) == nil)
        // Still listed beside this plane's own devices, for a blksnapd of that kind.
        let attached = try dataPlane.attach(backing: scratch.file("b.img", size: 1 << 20))
        #expect(try SavedDevices.load(from: scratch.list).routed.map(\.node) == ["/dev/nbd15", attached.node])
    }
}
