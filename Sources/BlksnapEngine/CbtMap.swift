import BlksnapABI
import SystemPackage

/// The change-block-tracking map of one device (upstream `cbt_map.c`).
///
/// One byte per tracking block holds the number of the last snapshot during
/// whose life the block was written, so one map answers "what changed since
/// snapshot P" for every earlier P of the same generation: the blocks whose
/// byte is greater than P.
///
/// Two tables, because the map a backup reads must hold still while the
/// device keeps being written: writes mark the *write* map with `active`;
/// TAKE copies it to the *read* map, which READ_CBT_MAP returns, and moves
/// `previous` to `active` and `active` one up. At 256 the numbers start
/// again at 1 with a zeroed write map and a new random generation id, so a
/// backup tool comparing generation ids knows its old map no longer applies.
///
/// Memory: exactly two bytes per tracking block. All fields are guarded by
/// `lock`, taken once per write for a few byte stores.
public final class CbtMap: @unchecked Sendable {
    public let capacity: UInt64           // bytes
    public let blockShift: Int
    public let blockCount: Int
    private let lock = Lock()
    private let writeMap: UnsafeMutableBufferPointer<UInt8>
    private let readMap: UnsafeMutableBufferPointer<UInt8>
    private var _previous: UInt8 = 0
    private var _active: Int = 1
    private var _generationId: UUID16
    private var _isCorrupted = false
    /// The durable shadow of the write map (a crash must not lose a mark):
    /// told of every range after the map marks it and before the write is
    /// acknowledged. Set before the map is reachable by writers.
    var intent: WriteIntent?

    /// Everything a map holds, as saved across a restart (`CbtStore`).
    public struct State: Equatable, Sendable {
        public var generationId: UUID16
        public var previous: UInt8
        public var active: UInt8
        public var read: [UInt8]
        public var write: [UInt8]
    }

    public init(capacity: UInt64, settings: EngineSettings) {
        self.capacity = capacity
        let (shift, count) = EngineSettings.shift(
            capacity: capacity, minimum: settings.trackingBlockMinimumShift,
            maximum: settings.trackingBlockMaximumShift, maximumCount: settings.trackingBlockMaximumCount)
        blockShift = shift
        blockCount = Int(count)
        writeMap = .allocate(capacity: max(blockCount, 1))
        writeMap.initialize(repeating: 0)
        readMap = .allocate(capacity: max(blockCount, 1))
        readMap.initialize(repeating: 0)
        _generationId = UUID16.random()
    }

    /// A map restored from `state`; nil when the state does not fit this
    /// capacity under these settings (another block size or count), as a
    /// map made with other module parameters cannot be compared block by block.
    public convenience init?(capacity: UInt64, settings: EngineSettings, state: State) {
        self.init(capacity: capacity, settings: settings)
        guard state.read.count == blockCount, state.write.count == blockCount,
              (1...255).contains(state.active),
              state.previous == state.active - 1 || (state.active == 1 && state.previous == 255) else { return nil }
        readMap.baseAddress!.update(from: state.read, count: blockCount)
        writeMap.baseAddress!.update(from: state.write, count: blockCount)
        _generationId = state.generationId
        _previous = state.previous
        _active = Int(state.active)
    }

    /// One consistent copy of the map, for saving.
    public func state() -> State {
        lock.withLock {
            State(generationId: _generationId, previous: _previous, active: UInt8(_active),
                  read: Array(readMap[0..<blockCount]), write: Array(writeMap[0..<blockCount]))
        }
    }

    /// After a crash: a range the write-intent record holds counts as
    /// written under the current number, which is what any write since the
    /// last save was marked with (every TAKE saves), so the result is a
    /// superset of the writes the crash interrupted.
    func markWritten(offset: UInt64, length: UInt64) {
        lock.withLock {
            let end = min(offset + length, capacity)
            guard end > offset, let range = blocks(offset: offset, length: end - offset) else { return }
            let active = UInt8(_active)
            for b in range where writeMap[b] < active { writeMap[b] = active }
        }
    }

    deinit {
        writeMap.deallocate()
        readMap.deallocate()
    }

    public var blockSize: UInt32 { UInt32(1) << UInt32(blockShift) }

    /// What TRACKER_COLLECT reports for this map.
    public func info(devId: DevId) -> CbtInfo {
        lock.withLock {
            CbtInfo(devId: devId, blockSize: blockSize, deviceCapacity: capacity,
                    blockCount: UInt32(blockCount), generationId: _generationId, snapNumber: _previous)
        }
    }

    public var generationId: UUID16 { lock.withLock { _generationId } }
    public var snapNumberPrevious: UInt8 { lock.withLock { _previous } }
    public var snapNumberActive: UInt8 { lock.withLock { UInt8(_active) } }
    public var isCorrupted: Bool { lock.withLock { _isCorrupted } }

    /// The tracking blocks a byte range touches, or nil past the map.
    @inline(__always)
    private func blocks(offset: UInt64, length: UInt64) -> ClosedRange<Int>? {
        guard length > 0 else { return nil }
        let (end, overflow) = offset.addingReportingOverflow(length)
        guard !overflow else { return nil }
        let first = offset >> UInt64(blockShift)
        let last = (end - 1) >> UInt64(blockShift)
        guard last < UInt64(blockCount) else { return nil }
        return Int(first)...Int(last)
    }

    /// Marks a write to the original. A byte only ever grows within a
    /// generation, as upstream's `num < snap_number` test keeps it.
    public func set(offset: UInt64, length: UInt64) {
        beginSet(offset: offset, length: length)?.finish()
    }

    /// `set` for a write that copies on write while the intent's flush
    /// runs: the write lands only after `finish` of what this returns.
    func beginSet(offset: UInt64, length: UInt64) -> WriteIntent.Pending? {
        guard length > 0 else { return nil }
        lock.lock()
        guard !_isCorrupted else { lock.unlock(); return nil }
        guard let range = blocks(offset: offset, length: length) else {
            // The engine bounds writes by the device, so this is a bug, and the
            // map can no longer be trusted: READ_CBT_MAP says so with EFAULT.
            _isCorrupted = true
            lock.unlock()
            return nil
        }
        let active = UInt8(_active)
        for b in range where writeMap[b] < active { writeMap[b] = active }
        lock.unlock()
        // After the map, so a save that copies the map before this mark
        // finds the region marked again (`WriteIntent.beginSync`).
        return intent?.begin(offset: offset, length: length)
    }

    /// Marks a block changed in both tables: a write to the snapshot image or
    /// MARK_DIRTY. The read map gets `previous`, so the very backup that
    /// reads this map sees the block as changed.
    public func setBoth(offset: UInt64, length: UInt64) throws(BlksnapError) {
        guard length > 0 else { return }
        try lock.withLock { () throws(BlksnapError) in
            guard !_isCorrupted else { throw BlksnapError(.invalidArgument, "CBT map is corrupted") }
            guard let range = blocks(offset: offset, length: length) else {
                throw BlksnapError(.invalidArgument, "range \(offset)+\(length) bytes is past the CBT map of \(blockCount) blocks")
            }
            let active = UInt8(_active)
            for b in range where writeMap[b] < active { writeMap[b] = active }
            for b in range where readMap[b] < _previous { readMap[b] = _previous }
        }
        intent?.mark(offset: offset, length: length)
    }

    /// Whether a sector range lies within the map (MARK_DIRTY checks first).
    public func contains(sectorOffset: UInt64, sectorCount: UInt64) -> Bool {
        guard sectorCount > 0 else { return true }
        let (end, overflow) = sectorOffset.addingReportingOverflow(sectorCount)
        guard !overflow, end <= UInt64.max >> sectorShift else { return false }
        return blocks(offset: sectorOffset << sectorShift, length: sectorCount << sectorShift) != nil
    }

    /// TAKE: freeze the write map into the read map and move the numbers on.
    public func switchMaps() {
        lock.withLock {
            readMap.baseAddress!.update(from: writeMap.baseAddress!, count: blockCount)
            _previous = UInt8(_active)
            _active += 1
            if _active == 256 {
                _active = 1
                writeMap.update(repeating: 0)
                _generationId = UUID16.random()
            }
        }
    }

    /// READ_CBT_MAP: `min(length, blockCount - offset)` bytes of the read
    /// map, none at or past its end.
    public func read(offset: UInt32, length: UInt32) throws(BlksnapError) -> [UInt8] {
        try lock.withLock { () throws(BlksnapError) -> [UInt8] in
            guard !_isCorrupted else { throw BlksnapError(.badAddress, "CBT map is corrupted") }
            let start = Int(offset)
            guard start < blockCount else { return [] }
            let n = min(Int(length), blockCount - start)
            return Array(readMap[start..<(start + n)])
        }
    }

    /// The two bytes GET_SECTOR_STATE reports for a sector.
    public func sectorState(sector: UInt64) throws(BlksnapError) -> (previous: UInt8, current: UInt8) {
        try lock.withLock { () throws(BlksnapError) -> (UInt8, UInt8) in
            let b = sector >> UInt64(blockShift - Int(sectorShift))
            guard b < UInt64(blockCount) else {
                throw BlksnapError(.invalidArgument, "sector \(sector) is past the CBT map")
            }
            guard !_isCorrupted else { throw BlksnapError(.invalidArgument, "CBT map is corrupted") }
            return (readMap[Int(b)], writeMap[Int(b)])
        }
    }

    /// The read and write tables, for tests and status.
    public func tables() -> (read: [UInt8], write: [UInt8]) {
        lock.withLock { (Array(readMap[0..<blockCount]), Array(writeMap[0..<blockCount])) }
    }
}
