import BlksnapABI
import BlksnapControlProtocol
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// What a backing store is, as far as blksnapd can tell, to decide whether
/// a saved CBT map still describes it: a file by its device, inode, size and
/// mtime; a block device by its number and size (nothing tells whether it
/// was written while blksnapd was down); an NBD export by its URI and size
/// (likewise).
public struct BackingIdentity: Equatable, Sendable {
    public enum Kind: UInt8, Sendable { case file = 1, blockDevice = 2, uri = 3, other = 4 }
    public var kind: Kind
    public var label: String
    public var size: UInt64
    /// st_dev of a file, st_rdev of a block device.
    public var device: UInt64
    public var inode: UInt64
    /// Files only: the last modification, in nanoseconds since the epoch.
    public var mtimeNs: Int64

    public init(kind: Kind, label: String, size: UInt64, device: UInt64 = 0, inode: UInt64 = 0, mtimeNs: Int64 = 0) {
        (self.kind, self.label, self.size, self.device, self.inode, self.mtimeNs) = (kind, label, size, device, inode, mtimeNs)
    }
}

/// The CBT map of one routed device kept across blksnapd's restarts,
/// reboots and crashes: a state file (identity of the backing, generation
/// id, snapshot numbers, both tables, a CRC-32C) rewritten whole with fsync
/// and rename, and a `WriteIntent` record beside it.
///
/// The state is saved when tracking starts, at every TAKE (so the numbers
/// on disk are always the ones writes are being marked with), periodically,
/// and at a clean stop, which marks it clean. Restoring a clean state gives
/// the map exactly; restoring after a crash adds every region the intent
/// record marks, a superset. Whatever cannot be trusted (missing, short,
/// foreign or corrupt file, another backing, another size, a file modified
/// while blksnapd was down, other tracking-block parameters) is removed and
/// tracking starts a new generation, with the reason logged: a map that
/// could miss a write is never restored.
///
/// `lock` serializes saves of this device; the intent record has its own.
public final class CbtStore: @unchecked Sendable {
    public let statePath: String
    public let intentPath: String
    /// How often blksnapd saves; after a crash a file backing modified
    /// later than the last save plus this (and 5 s) was modified while
    /// blksnapd was down.
    public let syncIntervalNs: Int64
    let identify: @Sendable () -> BackingIdentity
    private let lock = Lock()
    private var intent: WriteIntent?

    static let magic: [UInt8] = Array("BSWCBT01".utf8)

    /// How a device's tracking began, for status and the log.
    public enum Outcome: Equatable, Sendable, CustomStringConvertible {
        /// No saved state: tracking starts at the first snapshot.
        case none
        case restored
        case restoredAfterCrash(regions: Int)
        case startedAnew(why: String)

        public var description: String {
            switch self {
            case .none: "none saved"
            case .restored: "restored"
            case .restoredAfterCrash(let n): "restored after a crash" + (n > 0 ? " (\(n) regions counted as written)" : "")
            case .startedAnew(let why): "new generation: \(why)"
            }
        }

        /// The status and metrics name of this outcome.
        public var origin: CbtOrigin {
            switch self {
            case .none: .none
            case .restored: .restored
            case .restoredAfterCrash: .restoredAfterCrash
            case .startedAnew: .startedAnew
            }
        }
    }

    /// `key` names the files in `directory` (`KEY.cbt`, `KEY.intent`).
    public init(directory: String, key: String, syncIntervalSeconds: Int64 = 60,
                identify: @escaping @Sendable () -> BackingIdentity) {
        statePath = directory + "/" + key + ".cbt"
        intentPath = directory + "/" + key + ".intent"
        syncIntervalNs = syncIntervalSeconds * 1_000_000_000
        self.identify = identify
    }

    /// The intent record in use, for tests and benchmarks.
    public var writeIntent: WriteIntent? { lock.withLock { intent } }

    // MARK: restore

    /// The map saved for this backing, or why there is none to trust. A
    /// restored map is saved again and gets a fresh intent record before
    /// it is returned, so the device may be written at once.
    func restore(capacity: UInt64, settings: EngineSettings) -> (CbtMap?, Outcome) {
        var st = stat()
        guard stat(statePath, &st) == 0 else {
            try? DurableFile.remove(intentPath)
            return (nil, .none)
        }
        do throws(BlksnapError) {
            let (map, clean) = try load(capacity: capacity, settings: settings)
            var regions = 0
            if !clean {
                let shift = WriteIntent.regionShift(blockShift: map.blockShift)
                let marked: [Int]
                do throws(BlksnapError) {
                    marked = try WriteIntent.markedRegions(path: intentPath, regionShift: shift, capacity: capacity)
                } catch {
                    throw BlksnapError(error.errno, "blksnapd stopped without saving, and its write-intent record is unusable: \(error.message)")
                }
                for r in marked { map.markWritten(offset: UInt64(r) << UInt64(shift), length: 1 << UInt64(shift)) }
                regions = marked.count
            }
            try start(map)
            return (map, clean ? .restored : .restoredAfterCrash(regions: regions))
        } catch {
            forget()
            return (nil, .startedAnew(why: error.message))
        }
    }

    /// Reads and checks the state file against the backing as it is now.
    private func load(capacity: UInt64, settings: EngineSettings) throws(BlksnapError) -> (CbtMap, clean: Bool) {
        let (shift, count) = EngineSettings.shift(
            capacity: capacity, minimum: settings.trackingBlockMinimumShift,
            maximum: settings.trackingBlockMaximumShift, maximumCount: settings.trackingBlockMaximumCount)
        let bytes = try DurableFile.read(statePath, atMost: 65536 + 2 * Int(count) + 1)
        func bad(_ why: String) -> BlksnapError { BlksnapError(.invalidArgument, "\(statePath) \(why)") }
        guard bytes.count >= Self.magic.count + 4 else { throw bad("is truncated (\(bytes.count) bytes)") }
        guard Array(bytes[0..<Self.magic.count]) == Self.magic else { throw bad("is not a CBT state of blksnap-swift") }
        let body = bytes[0..<(bytes.count - 4)]
        var tail = ByteReader(Array(bytes[(bytes.count - 4)...]))
        guard (try? tail.integer(UInt32.self)) == CRC32C.checksum(body) else {
            throw bad("fails its checksum (truncated or corrupted)")
        }
        var r = ByteReader(Array(body))
        let saved: BackingIdentity, clean: Bool, savedAtNs: Int64, intervalNs: Int64
        let savedShift: UInt32, savedCount: UInt64, generation: UUID16, previous: UInt8, active: UInt8
        do throws(ByteReader.Short) {
            _ = try r.take(Self.magic.count)
            let kind = BackingIdentity.Kind(rawValue: try r.integer(UInt8.self)) ?? .other
            saved = BackingIdentity(kind: kind, label: try r.string(atMost: 4096), size: try r.integer(), device: try r.integer(),
                                    inode: try r.integer(), mtimeNs: try r.integer())
            clean = try r.integer(UInt8.self) == 1
            savedAtNs = try r.integer()
            intervalNs = try r.integer()
            savedShift = try r.integer()
            savedCount = try r.integer()
            generation = UUID16(array: Array(try r.take(16)))
            previous = try r.integer()
            active = try r.integer()
        } catch {
            throw bad("is truncated")
        }
        if let why = mismatch(saved, identify(), clean: clean, savedAtNs: savedAtNs, intervalNs: intervalNs) { throw bad(why) }
        guard savedShift == shift, savedCount == count else {
            throw bad("has \(savedCount) tracking blocks of 2^\(savedShift) bytes, and the tracking parameters now give \(count) of 2^\(shift)")
        }
        guard r.bytes.count - r.offset == 2 * Int(count) else { throw bad("does not hold two tables of \(count) blocks") }
        let read = Array(r.bytes[r.offset..<(r.offset + Int(count))])
        let write = Array(r.bytes[(r.offset + Int(count))...])
        guard let map = CbtMap(capacity: capacity, settings: settings,
                               state: .init(generationId: generation, previous: previous, active: active, read: read, write: write))
        else { throw bad("holds snapshot numbers \(previous) and \(active), which no map has") }
        return (map, clean)
    }

    /// Why a saved identity no longer describes the backing, or nil.
    func mismatch(_ saved: BackingIdentity, _ now: BackingIdentity, clean: Bool,
                  savedAtNs: Int64, intervalNs: Int64) -> String? {
        guard saved.label == now.label, saved.kind == now.kind else {
            return "was saved for \(saved.label), not \(now.label)"
        }
        guard saved.size == now.size else { return "was saved when \(now.label) held \(saved.size) bytes; it holds \(now.size) now" }
        guard saved.device == now.device, saved.inode == now.inode else {
            return "was saved for another \(now.kind == .file ? "file" : "device") at \(now.label) (device or inode differs)"
        }
        guard now.kind == .file else { return nil }
        if clean {
            guard saved.mtimeNs == now.mtimeNs else { return "was saved at a clean stop, and \(now.label) was modified since" }
        } else {
            // blksnapd itself wrote the file until it died, at most one sync
            // interval after its last save.
            // Saturating: the numbers come from a file.
            let (sum, o1) = savedAtNs.addingReportingOverflow(max(intervalNs, 0))
            let (latest, o2) = sum.addingReportingOverflow(5_000_000_000)
            guard !o1, !o2, now.mtimeNs <= latest else {
                return "was saved before blksnapd died, and \(now.label) was modified after blksnapd could have written it"
            }
        }
        return nil
    }

    // MARK: save

    /// A map this store starts to keep (a new tracker, or one restored):
    /// the state is saved first, then a fresh intent record is made, so a
    /// crash between them leaves the old record's marks with the new state.
    func start(_ map: CbtMap) throws(BlksnapError) {
        try lock.withLock { () throws(BlksnapError) in
            intent?.close()
            intent = nil
            try write(map.state(), capacity: map.capacity, blockShift: map.blockShift, clean: false)
            let record = try WriteIntent.create(path: intentPath, regionShift: WriteIntent.regionShift(blockShift: map.blockShift),
                                                capacity: map.capacity)
            map.intent = record
            intent = record
        }
    }

    /// Saves `map`. `clean`: no write reaches the map any more (the device
    /// is no longer routed), so the record is closed.
    func save(_ map: CbtMap, clean: Bool) throws(BlksnapError) {
        try lock.withLock { () throws(BlksnapError) in
            guard let intent else { return }
            if !clean && intent.isBroken {
                // A mark did not reach the disk: a crash could not be recovered
                // from, so no state may wait for one. A clean stop saves again.
                try? DurableFile.remove(statePath)
                throw BlksnapError(.ioError, "the write-intent record \(intentPath) cannot be written; CBT of this device will not survive a crash")
            }
            intent.beginSync()
            do throws(BlksnapError) {
                try write(map.state(), capacity: map.capacity, blockShift: map.blockShift, clean: clean)
            } catch {
                try? DurableFile.remove(statePath)
                throw error
            }
            try intent.finishSync()
            if clean {
                map.intent = nil
                intent.close()
                self.intent = nil
            }
        }
    }

    private func write(_ state: CbtMap.State, capacity: UInt64, blockShift: Int, clean: Bool) throws(BlksnapError) {
        let id = identify()
        var w = ByteWriter()
        w.append(Self.magic)
        w.append(id.kind.rawValue)
        w.append(id.label)
        w.append(id.size)
        w.append(id.device)
        w.append(id.inode)
        w.append(id.mtimeNs)
        w.append(UInt8(clean ? 1 : 0))
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        w.append(Int64(now.tv_sec) * 1_000_000_000 + Int64(now.tv_nsec))
        w.append(syncIntervalNs)
        w.append(UInt32(blockShift))
        w.append(UInt64(state.read.count))
        w.append(state.generationId.array)
        w.append(state.previous)
        w.append(state.active)
        w.append(state.read)
        w.append(state.write)
        w.append(CRC32C.checksum(w.bytes))
        try DurableFile.replace(statePath, with: w.bytes)
    }

    /// TRACKER_REMOVE, or a state that cannot be trusted: nothing is kept.
    func forget() {
        lock.withLock {
            intent?.close()
            intent = nil
        }
        try? DurableFile.remove(statePath)
        try? DurableFile.remove(intentPath)
    }
}
