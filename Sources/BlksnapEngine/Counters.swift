import BlksnapABI
import BlksnapControlProtocol
import Synchronization

/// What one routed device has done since it was routed, for the daemon's
/// metrics: counted on the I/O path, read whenever a scrape asks.
///
/// Each counter is a relaxed atomic add: no lock, no allocation, no
/// ordering with the I/O itself (a scrape may see a request counted a
/// moment before or after its bytes). The engine stays free of any metrics
/// library; the daemon turns these into Prometheus series at scrape time.
public final class DeviceCounters: Sendable {
    private let readRequests = Atomic<UInt64>(0)
    private let readBytes = Atomic<UInt64>(0)
    private let writeRequests = Atomic<UInt64>(0)
    private let writeBytes = Atomic<UInt64>(0)
    private let discardRequests = Atomic<UInt64>(0)
    private let discardBytes = Atomic<UInt64>(0)
    private let chunksCopied = Atomic<UInt64>(0)

    public init() {}

    /// A plain copy of every counter.
    public struct Values: Sendable, Equatable {
        public var readRequests: UInt64 = 0
        public var readBytes: UInt64 = 0
        public var writeRequests: UInt64 = 0
        public var writeBytes: UInt64 = 0
        public var discardRequests: UInt64 = 0
        public var discardBytes: UInt64 = 0
        /// Chunks copied to the difference storage before a write (or
        /// discard) of the original overwrote them.
        public var chunksCopied: UInt64 = 0
        public init() {}
    }

    @inline(__always) func countRead(_ bytes: Int) {
        readRequests.wrappingAdd(1, ordering: .relaxed)
        readBytes.wrappingAdd(UInt64(bytes), ordering: .relaxed)
    }

    @inline(__always) func countWrite(_ bytes: Int) {
        writeRequests.wrappingAdd(1, ordering: .relaxed)
        writeBytes.wrappingAdd(UInt64(bytes), ordering: .relaxed)
    }

    @inline(__always) func countDiscard(_ bytes: UInt64) {
        discardRequests.wrappingAdd(1, ordering: .relaxed)
        discardBytes.wrappingAdd(bytes, ordering: .relaxed)
    }

    @inline(__always) func countChunkCopied() {
        chunksCopied.wrappingAdd(1, ordering: .relaxed)
    }

    public var values: Values {
        var v = Values()
        v.readRequests = readRequests.load(ordering: .relaxed)
        v.readBytes = readBytes.load(ordering: .relaxed)
        v.writeRequests = writeRequests.load(ordering: .relaxed)
        v.writeBytes = writeBytes.load(ordering: .relaxed)
        v.discardRequests = discardRequests.load(ordering: .relaxed)
        v.discardBytes = discardBytes.load(ordering: .relaxed)
        v.chunksCopied = chunksCopied.load(ordering: .relaxed)
        return v
    }
}

/// Engine-wide counters: snapshot events by kind, and how each tracker's
/// change tracking began (restored from saved state, restored after a
/// crash, or started anew). Whoever restores or starts a tracker's CBT calls
/// `countCbt`; the daemon exports these as
/// `blksnap_cbt_trackers_total{origin=...}`.
public final class EngineCounters: Sendable {
    private let lowFreeSpaceEvents = Atomic<UInt64>(0)
    private let corruptedEvents = Atomic<UInt64>(0)
    private let cbtRestored = Atomic<UInt64>(0)
    private let cbtRestoredAfterCrash = Atomic<UInt64>(0)
    private let cbtStartedAnew = Atomic<UInt64>(0)
    private let snapshotsCreated = Atomic<UInt64>(0)

    public init() {}

    public struct Values: Sendable, Equatable {
        public var lowFreeSpaceEvents: UInt64 = 0
        public var corruptedEvents: UInt64 = 0
        public var snapshotsCreated: UInt64 = 0
        /// Trackers counted per `CbtOrigin`.
        public var cbtRestored: UInt64 = 0
        public var cbtRestoredAfterCrash: UInt64 = 0
        public var cbtStartedAnew: UInt64 = 0
        public init() {}
    }

    func countEvent(_ code: EventCode) {
        switch code {
        case .lowFreeSpace: lowFreeSpaceEvents.wrappingAdd(1, ordering: .relaxed)
        case .corrupted: corruptedEvents.wrappingAdd(1, ordering: .relaxed)
        }
    }

    func countSnapshotCreated() { snapshotsCreated.wrappingAdd(1, ordering: .relaxed) }

    /// One tracker's CBT began this way.
    public func countCbt(_ origin: CbtOrigin) {
        switch origin {
        case .restored: cbtRestored.wrappingAdd(1, ordering: .relaxed)
        case .restoredAfterCrash: cbtRestoredAfterCrash.wrappingAdd(1, ordering: .relaxed)
        case .startedAnew: cbtStartedAnew.wrappingAdd(1, ordering: .relaxed)
        case .none: break
        }
    }

    public var values: Values {
        var v = Values()
        v.lowFreeSpaceEvents = lowFreeSpaceEvents.load(ordering: .relaxed)
        v.corruptedEvents = corruptedEvents.load(ordering: .relaxed)
        v.snapshotsCreated = snapshotsCreated.load(ordering: .relaxed)
        v.cbtRestored = cbtRestored.load(ordering: .relaxed)
        v.cbtRestoredAfterCrash = cbtRestoredAfterCrash.load(ordering: .relaxed)
        v.cbtStartedAnew = cbtStartedAnew.load(ordering: .relaxed)
        return v
    }
}
