import BlksnapABI
import Logging
import Synchronization

/// One snapshot (upstream `snapshot.c`): the devices it names, its
/// difference storage and event queue, and after TAKE one diff area and one
/// image per device.
///
/// `isTaken`, `diffAreas` and `images` are guarded by the engine's control
/// lock. Corruption is per snapshot: when any device can no longer store a
/// chunk, every device's image fails from then on and each device gets
/// exactly one corrupted event.
public final class Snapshot: @unchecked Sendable {
    public let id: UUID16
    public let devIds: [DevId]
    let trackers: [Tracker]
    let storage: DiffStorage
    let events: EventQueue
    /// Callers asleep in WAIT_EVENT on this snapshot.
    public var eventWaiters: Int { events.waiters }
    var isTaken = false
    var diffAreas: [DiffArea] = []
    var images: [SnapImage] = []
    private let corrupted = Atomic<Bool>(false)
    private let logger: Logger

    init(id: UUID16, trackers: [Tracker], settings: EngineSettings, logger: Logger, counters: EngineCounters? = nil) {
        self.id = id
        self.events = EventQueue(counters: counters)
        self.trackers = trackers
        self.devIds = trackers.map(\.devId)
        self.logger = logger
        self.storage = DiffStorage(minimum: settings.diffStorageMinimum, events: events, logger: logger)
    }

    public var isCorrupted: Bool { corrupted.load(ordering: .acquiring) }

    /// Marks every device corrupted once, and says so once per device.
    /// Every caller marks all diff areas before it returns (its write then
    /// lands without copy-on-write), not only the first: a later caller
    /// returning while the first is still marking would let an image read
    /// see its write.
    func corrupt(_ error: BlksnapError) {
        for area in diffAreas { area.markCorrupted() }
        guard !corrupted.exchange(true, ordering: .acquiringAndReleasing) else { return }
        logger.error("blksnap-snapshot: snapshot \(id) is corrupted: \(error); originals keep working, images fail with EIO")
        for devId in devIds {
            events.post(.corrupted, data: EventCorrupted(origDevId: devId, errCode: error.errno.rawValue).wire)
        }
    }
}
