import BlksnapABI

/// What `blksnapctl status` shows: every routed device, tracker, snapshot
/// and image, as plain values taken under the engine's lock.
public struct EngineStatus: Codable, Sendable, Equatable {
    public struct Device: Codable, Sendable, Equatable {
        public var devId: String
        public var sizeBytes: UInt64
        public var backing: String
        public var tracked: Bool
        /// How its CBT began: restored, restored after a crash, new (why), none saved.
        public var cbt: String? = nil
        /// Filled in by blksnapd: the node, and the name given with attach --name.
        public var node: String? = nil
        public var name: String? = nil
    }
    public struct TrackerInfo: Codable, Sendable, Equatable {
        public var devId: String
        public var blockSize: UInt32
        public var blockCount: UInt32
        public var capacityBytes: UInt64
        public var generationId: String
        public var snapNumber: UInt8
        public var snapshot: String?
        public var cbtOrigin: CbtOrigin = .startedAnew
    }
    public struct Image: Codable, Sendable, Equatable {
        public var originalDevId: String
        public var imageDevId: String
        public var storedChunks: Int
        public var corrupted: Bool
        /// Filled in by blksnapd: /dev/blksnap-image<minor> (not always image0).
        public var node: String? = nil
    }
    public struct SnapshotInfo: Codable, Sendable, Equatable {
        public var id: String
        public var taken: Bool
        public var corrupted: Bool
        public var devices: [String]
        public var storageCapacitySectors: UInt64
        public var storageFilledSectors: UInt64
        public var storageRequestedSectors: UInt64
        public var images: [Image]
    }
    /// What blksnapd exports over NBD: one per routed device and image.
    public struct ExportInfo: Codable, Sendable, Equatable {
        public var name: String
        public var devId: String
        public var uri: String
        public init(name: String, devId: String, uri: String) {
            (self.name, self.devId, self.uri) = (name, devId, uri)
        }
    }
    public var devices: [Device]
    public var trackers: [TrackerInfo]
    public var snapshots: [SnapshotInfo]
    public var exports: [ExportInfo] = []
    /// Devices declared in blksnapd's configuration, routed or not.
    public var declared: [DeclaredDevice] = []

    public init(devices: [Device], trackers: [TrackerInfo], snapshots: [SnapshotInfo], exports: [ExportInfo] = [],
                declared: [DeclaredDevice] = []) {
        (self.devices, self.trackers, self.snapshots, self.exports) = (devices, trackers, snapshots, exports)
        self.declared = declared
    }

    // Fields added later decode with their defaults, so a blksnapctl reads
    // the status of an older blksnapd.
    private enum CodingKeys: String, CodingKey { case devices, trackers, snapshots, exports, declared }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        devices = try c.decode([Device].self, forKey: .devices)
        trackers = try c.decode([TrackerInfo].self, forKey: .trackers)
        snapshots = try c.decode([SnapshotInfo].self, forKey: .snapshots)
        exports = try c.decodeIfPresent([ExportInfo].self, forKey: .exports) ?? []
        declared = try c.decodeIfPresent([DeclaredDevice].self, forKey: .declared) ?? []
    }
}

/// How a tracker's change tracking began, which tells a backup tool whether
/// an incremental backup is possible: `restored` (saved at a clean stop),
/// `restoredAfterCrash` (from the write-intent record: a superset of the
/// blocks written), `startedAnew` (a new generation), `none` (no tracker).
public enum CbtOrigin: String, Codable, Sendable, CaseIterable {
    case none
    case restored
    case restoredAfterCrash = "restored-after-crash"
    case startedAnew = "started-anew"
}

/// One device of blksnapd's configuration, as `blksnapctl status` shows it.
public struct DeclaredDevice: Codable, Sendable, Equatable {
    /// Routed; missing (its backing is not there); refused (there, but not
    /// routed: changed size, held elsewhere, ...; `reason` says); detached
    /// (routed at start, detached since).
    public enum State: String, Codable, Sendable, CaseIterable {
        case routed, missing, refused, detached
    }
    public var name: String
    public var backing: String
    public var state: State
    /// Why it is missing or refused; nil when routed.
    public var reason: String?
    /// The routed device's node (/dev/loop64) and major:minor, when routed.
    public var node: String?
    public var devId: String?
    /// The stable link, /dev/disk/by-blksnap/NAME, when routed.
    public var link: String?
    public var cbtOrigin: CbtOrigin

    public init(name: String, backing: String, state: State, reason: String? = nil, node: String? = nil,
                devId: String? = nil, link: String? = nil, cbtOrigin: CbtOrigin = .none) {
        (self.name, self.backing, self.state, self.reason) = (name, backing, state, reason)
        (self.node, self.devId, self.link, self.cbtOrigin) = (node, devId, link, cbtOrigin)
    }
}

/// Something that can say what a backing store is, for status.
public protocol Describable {
    var displayName: String { get }
}

extension Engine {
    /// One consistent picture, taken under the control lock.
    public func status() -> EngineStatus {
        lock.withLock {
            let trackerInfos = trackerOrder.map { devId -> EngineStatus.TrackerInfo in
                let t = trackers[devId]!
                let info = t.cbtMap.info(devId: devId)
                return .init(devId: devId.description, blockSize: info.blockSize, blockCount: info.blockCount,
                             capacityBytes: info.deviceCapacity, generationId: info.generationId.description,
                             snapNumber: info.snapNumber, snapshot: t.snapshot?.id.description, cbtOrigin: t.cbtOrigin)
            }
            let snapshotInfos = snapshots.map { s in
                EngineStatus.SnapshotInfo(
                    id: s.id.description, taken: s.isTaken, corrupted: s.isCorrupted, devices: s.devIds.map(\.description),
                    storageCapacitySectors: s.storage.capacitySectors, storageFilledSectors: s.storage.filledSectors,
                    storageRequestedSectors: s.storage.requestedSectors,
                    images: s.images.map {
                        .init(originalDevId: $0.originalDevId.description, imageDevId: $0.devId.description,
                              storedChunks: $0.diffArea.storedChunks, corrupted: $0.isCorrupted)
                    })
            }
            let deviceInfos = devices.values.sorted { $0.devId < $1.devId }.map { d in
                EngineStatus.Device(devId: d.devId.description, sizeBytes: d.size,
                                    backing: (d.backing as? Describable)?.displayName ?? "\(type(of: d.backing))",
                                    tracked: trackers[d.devId] != nil,
                                    cbt: d.store == nil ? nil : d.cbtOutcome.description)
            }
            return EngineStatus(devices: deviceInfos, trackers: trackerInfos, snapshots: snapshotInfos)
        }
    }
}

extension FileBlockDevice: Describable {
    public var displayName: String { path }
}

extension MemoryBlockDevice: Describable {
    public var displayName: String { "memory" }
}
