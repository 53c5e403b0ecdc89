import BlksnapABI
import BlksnapDevices
import BlksnapEngine
import FoundationEssentials
import Testing

@Suite struct DeviceMapperTableTests {
    @Test func anLvmTableParses() throws {
        let text = """
            0 409600 linear 7:0 2048
            409600 204800 striped 2 128 7:1 0 7:2 0

            """
        let table = try #require(DeviceMapper.parse(table: text))
        #expect(table.map(\.type) == ["linear", "striped"])
        #expect(table[1].arguments == "2 128 7:1 0 7:2 0")
        #expect(DeviceMapper.sectors(table) == 614400)
        #expect(table.map(\.line).joined(separator: "\n") + "\n" == text)
    }

    /// A gap, an overlap, a zero length or words where numbers go is not a
    /// table we could copy faithfully.
    @Test(arguments: ["", "0 100 linear 7:0 0\n200 100 linear 7:0 100", "0 100 linear 7:0 0\n50 100 linear 7:0 0",
                      "0 0 linear 7:0 0", "x 100 linear 7:0 0", "0 100", "10 100 linear 7:0 0",
                      "0 18446744073709551615 linear 7:0 0\n18446744073709551615 1 linear 7:0 0"])
    func malformedTablesAreNil(text: String) {
        #expect(DeviceMapper.parse(table: text) == nil)
    }

    @Test func onlyMappingTargetsAreCopied() {
        #expect(DeviceMapper.supportedTargets == ["linear", "striped"])
    }
}

@Suite struct LiveRouteRefusalTests {
    @Test func aMakerThatIsNotKernelNbdIsRefusedWithWhy() throws {
        let scratch = Scratch()
        let (dataPlane, engine) = plane(FakeMaker(kind: "FUSE+loop"), scratch)
        try dataPlane.start(engine: engine)
        #expect {
            try dataPlane.attachLive("/dev/null")
        } throws: {
            let e = $0 as? BlksnapError
            return e?.errno == .operationNotSupportedByDevice && e!.message.contains("modprobe nbd")
        }
    }

    @Test func aFileIsNoDeviceMapperDevice() throws {
        let scratch = Scratch()
        let (dataPlane, engine) = plane(FakeMaker(kind: "kernel NBD"), scratch)
        try dataPlane.start(engine: engine)
        #expect {
            try dataPlane.attachLive(scratch.file("a.img", size: 4096))
        } throws: { ($0 as? BlksnapError)?.errno == .invalidArgument }
        #expect(engine.routedDevices.isEmpty)
    }

    @Test func detachLiveOfAPlainDeviceIsENXIO() throws {
        let scratch = Scratch()
        let (dataPlane, engine) = plane(FakeMaker(kind: "kernel NBD"), scratch)
        try dataPlane.start(engine: engine)
        let attached = try dataPlane.attach(backing: scratch.file("a.img", size: 1 << 20))
        let devId = try #require(dataPlane.resolve(attached.devId))
        #expect {
            try dataPlane.detachLive(devId)
        } throws: { ($0 as? BlksnapError)?.errno == .noSuchAddressOrDevice }
        try dataPlane.detach(devId)
    }

    @Test func aSavedLiveRouteReadsBack() throws {
        let scratch = Scratch()
        var device = routedDevice(fake7, kind: "kernel NBD", backing: "/dev/mapper/blksnap-base-vg-lv", size: 1 << 30)
        device.live = SavedDevices.Live(name: "vg-lv", devId: DevId(major: 253, minor: 3), tableFile: "/run/blksnap/live/vg-lv.table")
        let list = SavedDevices(routed: [device])
        try list.store(to: scratch.list)
        #expect(try SavedDevices.load(from: scratch.list) == list)
        #expect(device.live!.restoreHint.contains("dmsetup load vg-lv /run/blksnap/live/vg-lv.table"))
    }

    /// After a crash, a live route is served again under the volume's own
    /// number, which is what the tools and the volume's table name.
    @Test func aLiveRouteIsReclaimedUnderTheVolumesNumber() throws {
        let scratch = Scratch()
        let backing = scratch.file("base.img", size: 1 << 20)
        var device = routedDevice(fake7, kind: "fake", backing: backing, size: 1 << 20)
        let volume = DevId(major: 253, minor: 3)
        device.live = SavedDevices.Live(name: "vg-lv", devId: volume, tableFile: scratch.path + "/vg-lv.table")
        let maker = FakeMaker()
        let (_, engine) = try restart(after: SavedDevices(routed: [device]), maker, scratch)
        #expect(engine.routedDevices.map(\.devId) == [volume])
        #expect(maker.reclaimed.map(\.0) == [fake7])
        #expect(try SavedDevices.load(from: scratch.list).routed.first?.live == device.live)
    }
}
