import BlksnapABI
import Logging

/// Where one stored chunk lives: a byte offset on a storage device.
public struct DiffRegion: @unchecked Sendable {
    public let device: any BlockDevice
    public let offset: UInt64
}

/// The difference storage of one snapshot (upstream `diff_storage.c`): an
/// ordered list of sector ranges on block devices, appendable before and
/// after TAKE, from which chunks are cut one after another.
///
/// A range's tail too small for the chunk being stored is left unused, as
/// upstream does. Free-space accounting follows the module so that tools
/// see the same events: CREATE asks for `diffStorageMinimum` sectors at
/// once; when what was requested minus what is filled falls to half of the
/// minimum, one more event asks for another minimum, and no further one
/// comes until appends bring the capacity up to what was requested.
///
/// Ranges may lie on a device the engine routes: the engine hands us that
/// device's backing store, so chunk writes go beneath tracking (no COW, no
/// CBT), as upstream's `test_diff_storage` requires.
public final class DiffStorage: @unchecked Sendable {
    private struct Range {
        let device: any BlockDevice
        /// The device the tools named; overlap is judged by it.
        let deviceId: DevId
        let firstSector: UInt64
        let sectorCount: UInt64
        var used: UInt64 = 0
    }

    private let lock = Lock()
    private var ranges: [Range] = []
    private var current = 0
    private var _capacity: UInt64 = 0      // sectors
    private var _filled: UInt64 = 0        // sectors, counting skipped tails
    private var _requested: UInt64 = 0     // sectors
    private var lowSpaceFlag = false
    private let minimum: UInt64
    private let events: EventQueue
    private let logger: Logger

    public init(minimum: UInt64, events: EventQueue, logger: Logger) {
        self.minimum = minimum
        self.events = events
        self.logger = logger
        requestMore()
    }

    private func requestMore() {
        // Called with no lock held: the queue has its own.
        lock.withLock { _requested += minimum }
        logger.debug("blksnap-diff-storage: requesting \(minimum) more sectors")
        events.post(.lowFreeSpace, data: EventLowFreeSpace(requestedSectors: minimum).wire)
    }

    public var capacitySectors: UInt64 { lock.withLock { _capacity } }
    public var filledSectors: UInt64 { lock.withLock { _filled } }
    public var requestedSectors: UInt64 { lock.withLock { _requested } }

    /// The first range of `deviceId` this storage holds that overlaps
    /// `range`, if any.
    func held(overlapping range: SectorRange, on deviceId: DevId) -> SectorRange? {
        lock.withLock {
            ranges.first {
                $0.deviceId == deviceId && range.count > 0 && $0.sectorCount > 0
                    && $0.firstSector < range.offset &+ range.count && range.offset < $0.firstSector + $0.sectorCount
            }.map { SectorRange(offset: $0.firstSector, count: $0.sectorCount) }
        }
    }

    /// SNAPSHOT_APPEND_STORAGE: ranges must lie within `device`, numbered
    /// `deviceId`. Overlap with other snapshots is the engine's to check.
    public func append(device: any BlockDevice, deviceId: DevId, ranges new: [SectorRange]) throws(BlksnapError) {
        try Self.check(new, within: device)
        lock.withLock {
            for r in new where r.count > 0 {
                ranges.append(Range(device: device, deviceId: deviceId, firstSector: r.offset, sectorCount: r.count))
                _capacity += r.count
            }
            if lowSpaceFlag && _capacity >= _requested { lowSpaceFlag = false }
        }
    }

    /// EINVAL unless every range lies within `device`.
    static func check(_ ranges: [SectorRange], within device: any BlockDevice) throws(BlksnapError) {
        let deviceSectors = device.size >> sectorShift
        for r in ranges {
            let (end, overflow) = r.offset.addingReportingOverflow(r.count)
            guard !overflow, end <= deviceSectors else {
                throw BlksnapError(.invalidArgument,
                                   "storage range \(r.offset)+\(r.count) is past the end of its \(deviceSectors)-sector device")
            }
        }
    }

    /// Cuts `sectors` from the storage, or nil when it is exhausted.
    public func allocate(sectors: UInt64) -> DiffRegion? {
        var region: DiffRegion?
        var low = false
        lock.withLock {
            while current < ranges.count {
                let available = ranges[current].sectorCount - ranges[current].used
                if available >= sectors {
                    let r = ranges[current]
                    region = DiffRegion(device: r.device, offset: (r.firstSector + r.used) << sectorShift)
                    ranges[current].used += sectors
                    _filled += sectors
                    break
                }
                _filled += available
                ranges[current].used = ranges[current].sectorCount
                current += 1
            }
            let left = Int64(bitPattern: _requested &- _filled)
            let halfMinimum = Int64((minimum >> 1) & ~7)
            if region != nil, left <= halfMinimum, !lowSpaceFlag {
                lowSpaceFlag = true
                low = true
            }
        }
        if low { requestMore() }
        return region
    }
}
