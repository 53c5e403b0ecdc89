/// The engine's part of what `blksnapctl status` shows: every routed
/// device, tracker, snapshot and image, as plain values taken under the
/// engine's lock. blksnapd completes it into a `DaemonStatus`.
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
        /// Kernel NBD: connections serving it of those made ("2/4").
        public var connections: String? = nil
        public init(devId: String, sizeBytes: UInt64, backing: String, tracked: Bool, cbt: String? = nil,
                    node: String? = nil, name: String? = nil, connections: String? = nil) {
            (self.devId, self.sizeBytes, self.backing, self.tracked) = (devId, sizeBytes, backing, tracked)
            (self.cbt, self.node, self.name, self.connections) = (cbt, node, name, connections)
        }
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
        public init(devId: String, blockSize: UInt32, blockCount: UInt32, capacityBytes: UInt64, generationId: String,
                    snapNumber: UInt8, snapshot: String?, cbtOrigin: CbtOrigin = .startedAnew) {
            (self.devId, self.blockSize, self.blockCount, self.capacityBytes) = (devId, blockSize, blockCount, capacityBytes)
            (self.generationId, self.snapNumber, self.snapshot, self.cbtOrigin) = (generationId, snapNumber, snapshot, cbtOrigin)
        }
    }
    public struct Image: Codable, Sendable, Equatable {
        public var originalDevId: String
        public var imageDevId: String
        public var storedChunks: Int
        public var corrupted: Bool
        /// Filled in by blksnapd: /dev/blksnap-image<minor> (not always image0).
        public var node: String? = nil
        public init(originalDevId: String, imageDevId: String, storedChunks: Int, corrupted: Bool, node: String? = nil) {
            (self.originalDevId, self.imageDevId, self.storedChunks, self.corrupted) = (originalDevId, imageDevId, storedChunks, corrupted)
            self.node = node
        }
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
        public init(id: String, taken: Bool, corrupted: Bool, devices: [String], storageCapacitySectors: UInt64,
                    storageFilledSectors: UInt64, storageRequestedSectors: UInt64, images: [Image]) {
            (self.id, self.taken, self.corrupted, self.devices) = (id, taken, corrupted, devices)
            (self.storageCapacitySectors, self.storageFilledSectors) = (storageCapacitySectors, storageFilledSectors)
            (self.storageRequestedSectors, self.images) = (storageRequestedSectors, images)
        }
    }
    public var devices: [Device]
    public var trackers: [TrackerInfo]
    public var snapshots: [SnapshotInfo]

    public init(devices: [Device], trackers: [TrackerInfo], snapshots: [SnapshotInfo]) {
        (self.devices, self.trackers, self.snapshots) = (devices, trackers, snapshots)
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
