import BlksnapABI
@testable import BlksnapDevices
import BlksnapEngine
import FoundationEssentials
import Logging
import Testing
#if canImport(Glibc)
import Glibc
#endif

@Suite struct DeclaredDevicesTests {
    func write(_ text: String, _ name: String, in dir: String) {
        #expect(FileManager.default.createFile(atPath: dir + "/" + name, contents: Data(text.utf8)))
    }

    @Test func aFileReadsAsDeclared() throws {
        let scratch = Scratch()
        write("""
            # comment
            vm1   /srv/vm1.img   size=10G

            \tdata\t/dev/sdb
            remote nbd+unix:///disk?socket=/run/qsd.sock size=1048576
            """, "devices.conf", in: scratch.path)
        write("zz /srv/zz.img\n", "later.conf", in: scratch.path)
        write("ignored /x\n", "notes.txt", in: scratch.path)
        let declared = try DeclaredDevices.load(directory: scratch.path)
        #expect(declared.devices.map(\.name) == ["vm1", "data", "remote", "zz"])
        #expect(declared.devices[0].sizeBytes == 10 << 30)
        #expect(declared.devices[1].sizeBytes == nil && declared.devices[1].line == 4)
        #expect(declared.devices[2].backing == "nbd+unix:///disk?socket=/run/qsd.sock")
        #expect(declared.devices[3].file == scratch.path + "/later.conf")
    }

    @Test func aMissingDirectoryDeclaresNothing() throws {
        #expect(try DeclaredDevices.load(directory: "/nonexistent/blksnap").devices.isEmpty)
    }

    /// Each broken file is refused with its name and line.
    @Test(arguments: [
        ("vm1 /a.img\nvm2\n", "devices.conf:2:", "NAME BACKING"),
        ("vm1 a.img\n", "devices.conf:1:", "absolute path"),
        ("vm/1 /a.img\n", "devices.conf:1:", "not a device name"),
        ("vm1 /a.img size=ten\n", "devices.conf:1:", "not a size"),
        ("vm1 /a.img sise=10G\n", "devices.conf:1:", "unknown or repeated option"),
        ("vm1 /a.img\n\nvm1 /b.img\n", "devices.conf:3:", "declared already at line 1"),
        ("lv nbd://host/x live\n", "devices.conf:1:", "live routes a device-mapper device"),
        ("lv /dev/vg/lv live live\n", "devices.conf:1:", "unknown or repeated option live"),
        ("lv /dev/vg/lv lively\n", "devices.conf:1:", "only size=BYTES and live"),
    ])
    func brokenFilesAreRefused(text: String, place: String, why: String) throws {
        let scratch = Scratch()
        write(text, "devices.conf", in: scratch.path)
        do {
            _ = try DeclaredDevices.load(directory: scratch.path)
            Issue.record("accepted: \(text)")
        } catch {
            #expect(error.message.contains(scratch.path + "/" + place), "\(error.message)")
            #expect(error.message.contains(why), "\(error.message)")
        }
    }

    @Test func aNameDeclaredInTwoFilesIsRefused() throws {
        let scratch = Scratch()
        write("vm1 /a.img\n", "a.conf", in: scratch.path)
        write("# x\nvm1 /b.img\n", "b.conf", in: scratch.path)
        #expect {
            try DeclaredDevices.load(directory: scratch.path)
        } throws: { error in
            (error as? BlksnapError)?.message.contains("b.conf:2: the name vm1 is declared already at \(scratch.path)/a.conf:1") == true
        }
    }

    /// `live` marks a device-mapper device routed in place; what
    /// attach --live --persist writes reads back the same.
    @Test func aLiveDeclarationReadsAndWritesBack() throws {
        let scratch = Scratch()
        write("lv /dev/vg0/data live\nroot /dev/mapper/vg0-root size=1G live\nplain /dev/sdb\n", "a.conf", in: scratch.path)
        let declared = try DeclaredDevices.load(directory: scratch.path)
        #expect(declared.devices.map(\.live) == [true, true, false])
        #expect(declared.devices[1].sizeBytes == 1 << 30)
        let dir = scratch.path + "/etc"
        try DeclaredDevices.declare(.init(name: "data", backing: "/dev/vg0/data", live: true), in: dir)
        let text = String(decoding: try DurableFile.read(dir + "/" + DeclaredDevices.fileName, atMost: 4096), as: UTF8.self)
        #expect(text.hasSuffix("\ndata /dev/vg0/data live\n"))
        #expect(try DeclaredDevices.load(directory: dir).devices == [.init(name: "data", backing: "/dev/vg0/data", live: true,
                                                                             file: dir + "/devices.conf", line: 2)])
    }

    @Test func declareAndForgetEditTheFiles() throws {
        let scratch = Scratch()
        let dir = scratch.path + "/etc"
        try DeclaredDevices.declare(.init(name: "vm1", backing: "/a.img", sizeBytes: 4096), in: dir)
        try DeclaredDevices.declare(.init(name: "vm2", backing: "/b.img"), in: dir)
        #expect(throws: BlksnapError.self) { try DeclaredDevices.declare(.init(name: "vm1", backing: "/c.img"), in: dir) }
        #expect(throws: BlksnapError.self) { try DeclaredDevices.declare(.init(name: "vm3", backing: "/c d.img"), in: dir) }
        var declared = try DeclaredDevices.load(directory: dir)
        #expect(declared.devices.map(\.name) == ["vm1", "vm2"])
        #expect(declared.devices[0].sizeBytes == 4096)
        #expect(try DeclaredDevices.forget("vm1", in: dir))
        #expect(try !DeclaredDevices.forget("vm1", in: dir))
        declared = try DeclaredDevices.load(directory: dir)
        #expect(declared.devices.map(\.name) == ["vm2"])
    }
}

@Suite struct DeclaredRoutingTests {
    /// A missing backing and one that changed size are skipped with their
    /// state; every other device is still routed, named and linked.
    @Test func everyGoodDeviceIsRoutedAndTheRestSaySo() throws {
        let scratch = Scratch()
        let dev = scratch.path + "/dev"
        let maker = FakeMaker()
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        let dataPlane = DataPlane(maker: maker, logger: logger, cbtDirectory: scratch.path + "/cbt", devDirectory: dev)
        let engine = Engine(hooks: dataPlane, logger: logger)
        try dataPlane.start(engine: engine)
        let a = scratch.file("a.img", size: 1 << 20)
        let b = scratch.file("b.img", size: 2 << 20)
        let declared = DeclaredDevices(devices: [
            .init(name: "first", backing: a, sizeBytes: 1 << 20),
            .init(name: "gone", backing: scratch.path + "/missing.img"),
            .init(name: "resized", backing: b, sizeBytes: 1 << 20),
            .init(name: "last", backing: b),
        ])
        let states = dataPlane.route(declared: declared)
        #expect(states.map(\.state) == ["routed", "missing", "refused", "routed"])
        #expect(states[1].why?.contains("missing.img") == true)
        #expect(states[2].why?.contains("2097152 bytes, not the declared 1048576") == true)
        for (i, name) in [(0, "first"), (3, "last")] {
            let devId = try #require(states[i].devId)
            #expect(dataPlane.name(of: devId) == name)
            #expect(dataPlane.resolve(name) == devId)
            var target = [CChar](repeating: 0, count: 256)
            let n = readlink(dev + "/disk/by-blksnap/" + name, &target, 255)
            #expect(n > 0 && String(cString: Array(target[0..<n]) + [0]) == dataPlane.nodes[devId.description])
            #expect(access(dev + "/block/\(devId.major):\(devId.minor)", F_OK) == 0 || errno == ENOENT)
        }
        // A name is one device's only.
        #expect(throws: BlksnapError.self) { _ = try dataPlane.attach(backing: scratch.file("c.img", size: 1 << 20), name: "first") }
        try dataPlane.detach(try #require(states[0].devId))
        #expect(access(dev + "/disk/by-blksnap/first", F_OK) != 0)
        #expect(dataPlane.declaredStates.map(\.state) == ["detached", "missing", "refused", "routed"])
        dataPlane.stop()
        #expect(access(dev + "/disk/by-blksnap/last", F_OK) != 0)
    }

    /// A live declaration is routed with attach --live, so where that
    /// cannot be (no kernel NBD) it is refused with why; one whose volume
    /// is not there is missing.
    @Test func aLiveDeclarationIsRoutedLiveOrSaysWhyNot() throws {
        let scratch = Scratch()
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        let dataPlane = DataPlane(maker: FakeMaker(kind: "FUSE+loop"), logger: logger, devDirectory: scratch.path + "/dev")
        let engine = Engine(hooks: dataPlane, logger: logger)
        try dataPlane.start(engine: engine)
        let states = dataPlane.route(declared: DeclaredDevices(devices: [
            .init(name: "lv", backing: "/dev/null", live: true),
            .init(name: "gone", backing: scratch.path + "/no-such-volume", live: true),
        ]))
        #expect(states.map(\.state) == ["refused", "missing"])
        #expect(states[0].why?.contains("live routing needs kernel NBD devices") == true, "\(states[0].why ?? "")")
        dataPlane.stop()
        withExtendedLifetime(engine) {}
    }

    /// The CBT of a file backing comes back when it is attached again,
    /// and not when the file was modified in between.
    @Test func aReattachedFileGetsItsTrackingBack() throws {
        let scratch = Scratch()
        let maker = FakeMaker()
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        let dataPlane = DataPlane(maker: maker, logger: logger, cbtDirectory: scratch.path + "/cbt")
        let engine = Engine(hooks: dataPlane, logger: logger)
        try dataPlane.start(engine: engine)
        let a = scratch.file("a.img", size: 1 << 20)
        var devId = try #require(dataPlane.resolve(try dataPlane.attach(backing: a).devId))
        _ = try engine.createSnapshot([devId])
        let generation = try #require(engine.collectTrackers().first).generationId
        engine.destroyAll()
        try dataPlane.detach(devId)
        devId = try #require(dataPlane.resolve(try dataPlane.attach(backing: a).devId))
        #expect(engine.collectTrackers().first?.generationId == generation)
        #expect(engine.routedDevice(devId)?.cbtOutcome == .restored)
        try dataPlane.detach(devId)
        // Written while not routed: its mtime tells.
        let fd = open(a, O_WRONLY)
        #expect(pwrite(fd, "x", 1, 0) == 1)
        var times = [timespec(tv_sec: 0, tv_nsec: (1 << 30) - 2), timespec(tv_sec: 2_000_000_000, tv_nsec: 0)]
        futimens(fd, &times)
        close(fd)
        devId = try #require(dataPlane.resolve(try dataPlane.attach(backing: a).devId))
        #expect(engine.collectTrackers().isEmpty)
        guard case .startedAnew(let why) = engine.routedDevice(devId)?.cbtOutcome else {
            Issue.record("restored a file modified while it was not routed")
            return
        }
        #expect(why.contains("modified"))
        dataPlane.stop()
    }
}
