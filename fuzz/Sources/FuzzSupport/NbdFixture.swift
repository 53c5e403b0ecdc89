import BlksnapABI
import BlksnapEngine
@testable import BlksnapNBD

/// What the NBD harnesses serve: a routed device in a taken snapshot with
/// a few blocks written since (so copy-on-write and changed blocks are
/// live), its snapshot image read-only, and a plain disk with a
/// description. A fresh engine per input, as for the dispatcher.
public struct NbdFixture {
    public let engine: Engine
    public let device: Export
    public let image: Export
    public let plain: Export

    public init() {
        engine = makeFuzzEngine()
        let devId = fuzzRoutedIds[0]
        let id = try! engine.createSnapshot([devId])
        try! engine.appendStorage(id, device: FuzzHost.storage,
                                  ranges: [SectorRange(offset: 0, count: fuzzDeviceSize / 512)])
        try! engine.takeSnapshot(id)
        let routed = engine.routedDevice(devId)!
        for offset in stride(from: UInt64(0), to: 64 << 10, by: 16 << 10) {
            [UInt8](repeating: 0x5A, count: 4096).withUnsafeBytes { try! routed.write($0, at: offset) }
        }
        device = Export(name: "disk", description: "a routed device", device: routed,
                        changes: Export.cbtSource(engine: engine, devId: devId))
        image = Export(name: "disk@snapshot", device: engine.images(of: id)[0], readOnly: true)
        plain = Export(name: "plain", description: "a plain disk", device: fuzzDisks[4], discardZeroes: true)
    }

    public var exports: [Export] { [device, image, plain] }
}
