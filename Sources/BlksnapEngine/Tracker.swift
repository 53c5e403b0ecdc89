import BlksnapABI
import BlksnapControlProtocol

/// Change tracking for one routed device (upstream `tracker.c`).
///
/// Created when a snapshot first names the device and kept after that
/// snapshot is destroyed, until TRACKER_REMOVE, so that the next backup can
/// read what changed in between. A recreated tracker starts a new CBT
/// generation.
///
/// `diffArea` is set at TAKE and cleared at DESTROY with the device's gate
/// held exclusive; writes read it with the gate held shared. `snapshot`
/// and `snapshotIsTaken` are guarded by the engine's control lock.
public final class Tracker: @unchecked Sendable {
    public let devId: DevId
    public let cbtMap: CbtMap
    unowned let device: RoutedDevice
    var diffArea: DiffArea?
    weak var snapshot: Snapshot?
    var snapshotIsTaken = false
    /// How this tracker's CBT began; whoever restores saved state sets it.
    public var cbtOrigin: CbtOrigin = .startedAnew

    init(device: RoutedDevice, settings: EngineSettings, restoring map: CbtMap? = nil) {
        self.devId = device.devId
        self.device = device
        self.cbtMap = map ?? CbtMap(capacity: device.size, settings: settings)
    }

    /// Before a write (or discard) to the original lands: CBT first, then the
    /// point-in-time copy of the chunks it touches, while the write-intent
    /// record's flush runs; both are done when this returns.
    @inline(__always)
    func beforeWrite(offset: UInt64, length: UInt64) {
        let pending = cbtMap.beginSet(offset: offset, length: length)
        diffArea?.copyOnWrite(offset: offset, length: length)
        pending?.finish()
    }
}
