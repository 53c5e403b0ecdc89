import BlksnapABI
import Logging
import SystemPackage

/// The blksnap engine: routed devices, their trackers, and the snapshots
/// (upstream `main.c` with the registries of `tracker.c` and `snapshot.c`).
///
/// Every control operation takes `lock`, as the module's snapshots_lock and
/// tracker list lock; no I/O path ever takes it, and WAIT_EVENT releases it
/// before it sleeps. Device gates are taken after `lock`, in device order.
public final class Engine: @unchecked Sendable {
    public let settings: EngineSettings
    public let logger: Logger
    let host: any HostDevices
    let hooks: any SnapshotHooks
    let lock = Lock()
    var devices: [DevId: RoutedDevice] = [:]
    var trackers: [DevId: Tracker] = [:]
    var trackerOrder: [DevId] = []
    var snapshots: [Snapshot] = []
    private var logConfig: LogConfig?
    /// Where SETLOG sends the log; the daemon logs into it too.
    public let logFile: LogFile
    /// Events by kind, snapshots created, CBT origins: for metrics.
    public let counters = EngineCounters()

    /// What SETLOG last asked for; the daemon tees its log there.
    public struct LogConfig: Sendable, Equatable {
        public var level: UInt32
        public var path: String
        public var tzMinutesWest: Int32
    }

    public init(settings: EngineSettings = EngineSettings(),
                host: any HostDevices = SysfsHostDevices(),
                hooks: any SnapshotHooks = VirtualImages(),
                logger: Logger = Logger(label: "blksnap"),
                logFile: LogFile = LogFile()) {
        self.logFile = logFile
        self.settings = settings
        self.host = host
        self.hooks = hooks
        self.logger = logger
    }

    // MARK: routed devices

    /// Makes `backing` a routed device numbered `devId`: from now on the
    /// engine sees every write to it. The frontends call this when they
    /// attach a device.
    ///
    /// With a `store`, the CBT map saved for this backing is restored (a
    /// tracker exists at once, with its generation and snapshot number), or
    /// the reason it cannot be trusted is logged and tracking starts anew.
    @discardableResult
    public func route(_ devId: DevId, backing: any BlockDevice, store: CbtStore? = nil) throws(BlksnapError) -> RoutedDevice {
        try lock.withLock { () throws(BlksnapError) -> RoutedDevice in
            guard devices[devId] == nil else {
                throw BlksnapError(.resourceBusy, "device \(devId) is routed already")
            }
            let device = RoutedDevice(devId: devId, backing: backing, store: store)
            devices[devId] = device
            logger.info("blksnap: routing device \(devId) (\(backing.size) bytes)")
            if let store {
                let (map, outcome) = store.restore(capacity: device.size, settings: settings)
                device.cbtOutcome = outcome
                if let map {
                    let t = Tracker(device: device, settings: settings, restoring: map)
                    t.cbtOrigin = outcome.origin
                    counters.countCbt(t.cbtOrigin)
                    device.tracker = t
                    trackers[devId] = t
                    trackerOrder.append(devId)
                    logger.notice("blksnap-tracker: device \(devId): CBT \(outcome), generation \(map.generationId), snapshot number \(map.snapNumberPrevious)")
                } else if case .startedAnew = outcome {
                    logger.warning("blksnap-tracker: device \(devId): CBT not restored, the next tracker starts a new generation: \(outcome)")
                }
            }
            return device
        }
    }

    /// Saves every kept CBT map (blksnapd does this periodically, so after
    /// a crash only what was written since needs the intent record).
    public func saveCbt() {
        let list = lock.withLock { trackerOrder.compactMap { trackers[$0] } }
        for t in list { saveCbt(t, clean: false) }
    }

    private func saveCbt(_ t: Tracker, clean: Bool) {
        guard let store = t.device.store else { return }
        do throws(BlksnapError) {
            try store.save(t.cbtMap, clean: clean)
        } catch {
            logger.error("blksnap-tracker: cannot save the CBT of \(t.devId): \(error)")
        }
    }

    /// Stops routing a device: refused while a snapshot names it. Its
    /// tracker goes with it, its CBT map saved (`saveCbt: false` leaves
    /// the saved state as it is: a device that never served a write).
    public func unroute(_ devId: DevId, saveCbt save: Bool = true) throws(BlksnapError) {
        try lock.withLock { () throws(BlksnapError) in
            guard let device = devices[devId] else {
                throw BlksnapError(.noSuchAddressOrDevice, "device \(devId) is not routed")
            }
            if let tracker = trackers[devId], tracker.snapshot != nil {
                throw BlksnapError(.resourceBusy, "device \(devId) is in a snapshot; destroy it first")
            }
            let tracker = trackers[devId]
            if tracker != nil { detachTracker(devId) }
            devices[devId] = nil
            try device.flush()
            // No write reaches the map any more: the state saved now is exact.
            if let tracker, save { saveCbt(tracker, clean: true) }
            logger.info("blksnap: device \(devId) is no longer routed")
        }
    }

    public func routedDevice(_ devId: DevId) -> RoutedDevice? { lock.withLock { devices[devId] } }
    public var routedDevices: [RoutedDevice] { lock.withLock { devices.values.sorted { $0.devId < $1.devId } } }

    /// ENXIO for a number with no device behind it.
    private func requireDevice(_ devId: DevId) throws(BlksnapError) {
        guard devices[devId] != nil || host.exists(devId) else {
            throw BlksnapError(.noSuchAddressOrDevice, "no block device \(devId)")
        }
    }

    private func notRoutedError(_ devId: DevId) -> BlksnapError {
        let name = host.path(of: devId) ?? "device \(devId)"
        let why = "\(name) (\(devId)) is not routed through blksnap-swift, so its writes cannot be seen; "
            + "attach its backing store with `blksnapctl attach \(name)` and use the device that prints"
        logger.error("blksnap: \(why)")
        return BlksnapError(.operationNotSupportedByDevice, why)
    }

    // MARK: trackers

    private func detachTracker(_ devId: DevId) {
        guard let tracker = trackers.removeValue(forKey: devId) else { return }
        trackerOrder.removeAll { $0 == devId }
        tracker.device.gate.lockExclusive()
        tracker.device.tracker = nil
        tracker.device.gate.unlock()
    }

    /// TRACKER_REMOVE.
    public func removeTracker(_ devId: DevId) throws(BlksnapError) {
        try lock.withLock { () throws(BlksnapError) in
            guard devices[devId] != nil || host.exists(devId) else {
                throw BlksnapError(.noSuchFileOrDirectory, "no block device \(devId)")
            }
            guard let tracker = trackers[devId] else {
                throw BlksnapError(.noData, "device \(devId) is not tracked")
            }
            // The module only refuses a taken snapshot and leaves an untaken
            // one holding a tracker that no longer sees writes; we refuse both.
            guard tracker.snapshot == nil else {
                throw BlksnapError(.resourceBusy, "device \(devId) is in snapshot \(tracker.snapshot!.id)")
            }
            detachTracker(devId)
            tracker.device.store?.forget()
            logger.info("blksnap-tracker: device \(devId) is no longer tracked")
        }
    }

    /// TRACKER_COLLECT, in the order trackers were created.
    public func collectTrackers() -> [CbtInfo] {
        lock.withLock { trackerOrder.map { trackers[$0]!.cbtMap.info(devId: $0) } }
    }

    public func tracker(_ devId: DevId) -> Tracker? { lock.withLock { trackers[devId] } }

    /// TRACKER_READ_CBT_MAP.
    public func readCbtMap(_ devId: DevId, offset: UInt32, length: UInt32) throws(BlksnapError) -> [UInt8] {
        let map = try lock.withLock { () throws(BlksnapError) -> CbtMap in
            try requireDevice(devId)
            guard let tracker = trackers[devId] else {
                throw BlksnapError(.noData, "device \(devId) is not tracked")
            }
            guard tracker.snapshotIsTaken else {
                throw BlksnapError(.notPermitted, "device \(devId) is not in a taken snapshot")
            }
            return tracker.cbtMap
        }
        return try map.read(offset: offset, length: length)
    }

    /// TRACKER_MARK_DIRTY_BLOCKS, on an original or on an image.
    public func markDirty(_ devId: DevId, ranges: [SectorRange]) throws(BlksnapError) {
        let map = try lock.withLock { () throws(BlksnapError) -> CbtMap in
            if let image = imageLocked(devId) { return image.cbtMap }
            try requireDevice(devId)
            guard let tracker = trackers[devId] else {
                throw BlksnapError(.operationNotSupportedByDevice, "device \(devId) is not tracked")
            }
            return tracker.cbtMap
        }
        for r in ranges where !map.contains(sectorOffset: r.offset, sectorCount: r.count) {
            throw BlksnapError(.invalidArgument, "range \(r.offset)+\(r.count) is past device \(devId)")
        }
        for r in ranges where r.count > 0 {
            try map.setBoth(offset: r.offset << sectorShift, length: r.count << sectorShift)
        }
    }

    // MARK: snapshots

    private func snapshotLocked(_ id: UUID16) -> Snapshot? { snapshots.first { $0.id == id } }

    private func imageLocked(_ devId: DevId) -> SnapImage? {
        for s in snapshots { if let i = s.images.first(where: { $0.devId == devId }) { return i } }
        return nil
    }

    public func image(_ devId: DevId) -> SnapImage? { lock.withLock { imageLocked(devId) } }

    /// SNAPSHOT_CREATE. Everything is checked before anything changes, so a
    /// refused CREATE leaves no tracker behind.
    public func createSnapshot(_ devIds: [DevId]) throws(BlksnapError) -> UUID16 {
        try lock.withLock { () throws(BlksnapError) -> UUID16 in
            guard Set(devIds).count == devIds.count else {
                throw BlksnapError(.invalidArgument, "a device is listed twice")
            }
            for d in devIds {
                try requireDevice(d)
                guard devices[d] != nil else { throw notRoutedError(d) }
                if let owner = trackers[d]?.snapshot {
                    throw BlksnapError(.resourceBusy, "device \(d) is already in snapshot \(owner.id)")
                }
            }
            let list = devIds.map { d -> Tracker in
                if let t = trackers[d] { return t }
                let device = devices[d]!
                let t = Tracker(device: device, settings: settings)
                do throws(BlksnapError) {
                    try device.store?.start(t.cbtMap)
                } catch {
                    device.store?.forget()
                    logger.error("blksnap-tracker: the CBT of \(d) will not outlive blksnapd: \(error)")
                }
                device.gate.lockExclusive()
                device.tracker = t
                device.gate.unlock()
                trackers[d] = t
                trackerOrder.append(d)
                counters.countCbt(t.cbtOrigin)
                logger.info("blksnap-tracker: tracking device \(d), \(t.cbtMap.blockCount) blocks of \(t.cbtMap.blockSize) bytes")
                return t
            }
            let snapshot = Snapshot(id: UUID16.random(), trackers: list, settings: settings, logger: logger,
                                    counters: counters)
            counters.countSnapshotCreated()
            for t in list { t.snapshot = snapshot }
            snapshots.append(snapshot)
            logger.info("blksnap-snapshot: created \(snapshot.id) with \(devIds.count) device(s)")
            return snapshot.id
        }
    }

    /// SNAPSHOT_DESTROY: images go, storage is released, trackers stay.
    public func destroySnapshot(_ id: UUID16) throws(BlksnapError) {
        try lock.withLock { () throws(BlksnapError) in
            guard let index = snapshots.firstIndex(where: { $0.id == id }) else {
                throw BlksnapError(.operationNotSupportedByDevice, "no snapshot \(id)")
            }
            let snapshot = snapshots.remove(at: index)
            for image in snapshot.images {
                image.close()
                hooks.withdraw(image)
            }
            for t in snapshot.trackers.sorted(by: { $0.devId < $1.devId }) {
                t.device.gate.lockExclusive()
                t.diffArea = nil
                t.device.gate.unlock()
                t.snapshot = nil
                t.snapshotIsTaken = false
            }
            snapshot.events.close()
            logger.info("blksnap-snapshot: destroyed \(id)")
        }
    }

    private func resolveStorage(_ devId: DevId) throws(BlksnapError) -> any BlockDevice {
        // A routed device's storage ranges go to its backing store: beneath
        // tracking, so storing a chunk never copies or marks anything.
        if let routed = devices[devId] {
            if let file = routed.backing as? FileBlockDevice,
               let storage = try? FileBlockDevice(path: file.path, directWritesWhenAligned: true, syncWrites: true) {
                return storage
            }
            return routed.backing
        }
        guard host.exists(devId) else { throw BlksnapError(.noSuchAddressOrDevice, "no block device \(devId)") }
        return try host.open(devId)
    }

    /// SNAPSHOT_APPEND_STORAGE. A range some live snapshot already holds
    /// is refused (EBUSY): two snapshots storing chunks in the same sectors
    /// would overwrite each other's copies, a hole the module leaves open.
    /// The check and the append happen under the engine lock, so two
    /// appends cannot both pass it.
    public func appendStorage(_ id: UUID16, device devId: DevId, ranges: [SectorRange]) throws(BlksnapError) {
        try lock.withLock { () throws(BlksnapError) in
            guard let snapshot = snapshotLocked(id) else { throw BlksnapError(.noSuchProcess, "no snapshot \(id)") }
            guard !ranges.isEmpty else { return }
            let device = try resolveStorage(devId)
            try DiffStorage.check(ranges, within: device)
            for (i, r) in ranges.enumerated() where r.count > 0 {
                let end = r.offset + r.count
                if let twin = ranges[..<i].first(where: { $0.count > 0 && $0.offset < end && r.offset < $0.offset + $0.count }) {
                    throw storageBusy(r, devId, "range \(twin.offset)+\(twin.count) of the same request")
                }
                for other in snapshots {
                    if let held = other.storage.held(overlapping: r, on: devId) {
                        let holder = other.id == id ? "this snapshot" : "snapshot \(other.id)"
                        throw storageBusy(r, devId, "\(holder) (range \(held.offset)+\(held.count))")
                    }
                }
            }
            try snapshot.storage.append(device: device, deviceId: devId, ranges: ranges)
        }
        let total = ranges.reduce(0) { $0 + $1.count }
        logger.info("blksnap-diff-storage: snapshot \(id) gets \(total) sectors in \(ranges.count) range(s) on \(devId)")
    }

    private func storageBusy(_ r: SectorRange, _ devId: DevId, _ holder: String) -> BlksnapError {
        let error = BlksnapError(.resourceBusy,
                                 "storage range \(r.offset)+\(r.count) on \(devId) is already held by \(holder)")
        logger.error("blksnap-diff-storage: \(error.message)")
        return error
    }

    /// SNAPSHOT_TAKE: atomic across the snapshot's devices. Writes are held
    /// at every device's gate while the maps switch and the diff areas
    /// start, so each image is one instant of all devices.
    public func takeSnapshot(_ id: UUID16) throws(BlksnapError) {
        try lock.withLock { () throws(BlksnapError) in
            guard let snapshot = snapshotLocked(id) else { throw BlksnapError(.noSuchProcess, "no snapshot \(id)") }
            guard !snapshot.isTaken else { throw BlksnapError(.alreadyInProcess, "snapshot \(id) is taken already") }
            guard !snapshot.trackers.isEmpty else {
                throw BlksnapError(.operationNotSupportedByDevice, "snapshot \(id) has no devices")
            }
            guard snapshot.storage.capacitySectors > 0 else {
                throw BlksnapError(.badAddress, "snapshot \(id) has no difference storage; append some first")
            }
            let ordered = snapshot.trackers.sorted { $0.devId < $1.devId }
            let thaw = try hooks.quiesce(ordered.map(\.device))
            defer { thaw() }
            for t in ordered { t.device.gate.lockExclusive() }
            var areas: [DiffArea] = []
            for t in snapshot.trackers {
                t.cbtMap.switchMaps()
                let area = DiffArea(devId: t.devId, original: t.device.backing, storage: snapshot.storage,
                                    settings: settings, counters: t.device.counters) { [weak snapshot] error in
                    snapshot?.corrupt(error)
                }
                t.diffArea = area
                t.snapshotIsTaken = true
                areas.append(area)
            }
            snapshot.diffAreas = areas
            snapshot.isTaken = true
            for t in ordered { t.device.gate.unlock() }
            // The new numbers reach the disk before TAKE returns, so a crash
            // never restores numbers older than those writes are marked with.
            for t in ordered { saveCbt(t, clean: false) }

            for (t, area) in zip(snapshot.trackers, areas) {
                let image = SnapImage(diffArea: area, cbtMap: t.cbtMap)
                do throws(BlksnapError) {
                    image.devId = try hooks.publish(image)
                } catch {
                    logger.error("blksnap-snapimage: cannot publish the image of \(t.devId): \(error)")
                    throw error
                }
                snapshot.images.append(image)
                logger.info("blksnap-snapimage: image \(image.devId) of \(t.devId)")
            }
            logger.info("blksnap-snapshot: took \(id)")
        }
    }

    /// SNAPSHOT_COLLECT.
    public func collectSnapshots() -> [UUID16] { lock.withLock { snapshots.map(\.id) } }

    public func snapshot(_ id: UUID16) -> Snapshot? { lock.withLock { snapshotLocked(id) } }

    /// The images of a taken snapshot, in the order of its devices.
    public func images(of id: UUID16) -> [SnapImage] { lock.withLock { snapshotLocked(id)?.images ?? [] } }

    /// SNAPSHOT_COLLECT_IMAGES: ESRCH for an unknown id; ENODEV, with the
    /// device count, before TAKE.
    public func collectImages(_ id: UUID16) throws(BlksnapError) -> (count: Int, images: [ImageInfo]?) {
        try lock.withLock { () throws(BlksnapError) -> (Int, [ImageInfo]?) in
            guard let s = snapshotLocked(id) else { throw BlksnapError(.noSuchProcess, "no snapshot \(id)") }
            guard s.isTaken else { return (s.trackers.count, nil) }
            return (s.trackers.count, s.images.map { ImageInfo(origDevId: $0.originalDevId, imageDevId: $0.devId) })
        }
    }

    /// SNAPSHOT_WAIT_EVENT: the engine lock is released before sleeping.
    public func waitEvent(_ id: UUID16, timeoutMs: UInt32) throws(BlksnapError) -> SnapshotEvent {
        guard let s = snapshot(id) else { throw BlksnapError(.noSuchProcess, "no snapshot \(id)") }
        return try s.events.wait(timeoutMs: timeoutMs)
    }

    /// GET_SECTOR_STATE.
    public func sectorState(image devId: DevId, sector: UInt64) throws(BlksnapError) -> SectorState {
        guard let image = image(devId) else {
            throw BlksnapError(.operationNotSupportedByDevice, "no snapshot image \(devId)")
        }
        return try image.sectorState(sector: sector)
    }

    /// SETLOG: nil turns logging to a file off. The file is opened at
    /// once, so a path that cannot be written is refused with its errno.
    public func setLog(_ config: LogConfig?) throws(BlksnapError) {
        try logFile.configure(path: config?.path, level: config?.level ?? 0, tzMinutesWest: config?.tzMinutesWest ?? 0)
        lock.withLock { logConfig = config }
        if let config {
            logger.info("blksnap: logging to \(config.path) at level \(config.level)")
        } else {
            logger.info("blksnap: logging to a file is off")
        }
    }

    public var currentLogConfig: LogConfig? { lock.withLock { logConfig } }

    /// Destroys every snapshot (shutdown); originals and trackers stay intact.
    public func destroyAll() {
        for id in collectSnapshots() { try? destroySnapshot(id) }
    }
}
