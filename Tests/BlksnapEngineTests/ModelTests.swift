import BlksnapABI
@testable import BlksnapEngine
import BlksnapTestSupport
import SystemPackage
import Testing
#if canImport(Glibc)
import Glibc
#endif

// A model-based randomized test of the engine.
//
// A plain in-memory reference model (byte arrays, one map pair per tracker,
// one storage allocator per snapshot) is run side by side with the engine
// over thousands of random operations from fixed seeds. After every
// operation the engine must agree with the model: data read back from
// originals and images, both CBT tables of every tracker, the events queued,
// the errno of every refused call, and what the collect calls report.
//
// With faults (profile "faulty"), every disk beneath the engine (the three
// backing stores and the storage disk) is a FaultyBlockDevice whose seeded
// injector fails, cuts short or delays calls; the seed of each step's faults
// comes from the run's seed and the step itself, so a shrunk list meets the
// same faults in the steps it keeps. The model reads the injector's log
// after each step and says what the step must then have done: a failed
// original write is an error for its writer, its range holds per byte
// either the old or the new data (the backing store, read beneath the
// faults, is then the truth) and its CBT blocks are marked; a failed copy
// to the difference storage corrupts the snapshot (one corrupted event per
// device, with the fault's errno) while the original write goes on; an
// image read that meets a fault fails with the fault's errno; a flush
// fault fails the flush, or TAKE before anything changes. Every fault in
// the log must be accounted for by the model.
//
// On a failure the operation list is shrunk (delta debugging, each attempt a
// fresh run from scratch) and the seed and shortest failing list are printed,
// ready to paste into `ModelRun.replay(seed:ops:)`.

// MARK: - the geometry of the rig

private enum Geo {
    static let blockShift = 12                 // Rig.smallSettings: 4 KiB tracking blocks
    static let chunkShift = 14                 // and 16 KiB chunks
    static let chunkSize = 1 << chunkShift
    /// Three routed devices: one round size, one with a short last chunk,
    /// one with a short last tracking block and chunk.
    static let sizes = [1 << 20, (3 << 20) + (20 << 10), (4 << 20) - 1536]
    static let devIds = (0..<3).map { DevId(major: 7, minor: UInt32($0)) }
    /// Device "index" 3 exists on the host but is not routed; 4 does not exist.
    static let unroutedId = DevId(major: 9, minor: 0)
    static let missingId = DevId(major: 7, minor: 99)
    static let bogusImageId = DevId(major: 252, minor: 200)
    static let storageBytes = 16 << 20
    static let storageSectors = UInt64(storageBytes >> 9)
    static let minimum: UInt64 = Rig.smallSettings.diffStorageMinimum
    static let poolSize = 256 << 10
    static let unknownId = UUID16(array: [0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])

    static func devId(_ index: Int) -> DevId {
        switch index {
        case 0..<3: return devIds[index]
        case 3: return unroutedId
        default: return missingId
        }
    }
    static func blockCount(_ dev: Int) -> Int { (sizes[dev] + (1 << blockShift) - 1) >> blockShift }
    static func chunkCount(_ dev: Int) -> Int { (sizes[dev] + chunkSize - 1) >> chunkShift }
    /// Sectors one stored chunk takes: the last chunk may be short, padded to a sector.
    static func chunkSectors(_ dev: Int, _ chunk: Int) -> UInt64 {
        let n = min(chunkSize, sizes[dev] - (chunk << chunkShift))
        return UInt64((n + 511) & ~511) >> 9
    }
}

private enum Errno_ {
    static let EPERM: Int32 = 1, ENOENT: Int32 = 2, ESRCH: Int32 = 3, EIO: Int32 = 5, ENXIO: Int32 = 6
    static let EFAULT: Int32 = 14, EBUSY: Int32 = 16, ENODEV: Int32 = 19, EINVAL: Int32 = 22
    static let ENOSPC: Int32 = 28, ENODATA: Int32 = 61, EALREADY: Int32 = 114
    static func name(_ e: Int32) -> String {
        let names: [Int32: String] = [0: "OK", 1: "EPERM", 2: "ENOENT", 3: "ESRCH", 5: "EIO", 6: "ENXIO", 14: "EFAULT",
                                      16: "EBUSY", 19: "ENODEV", 22: "EINVAL", 28: "ENOSPC", 61: "ENODATA", 114: "EALREADY"]
        return names[e] ?? "errno \(e)"
    }
}

// MARK: - operations, as values

/// One step of a run. Snapshots, images and storage positions are named
/// relative to the state when the step runs, so any sub-list of a run is
/// itself a valid run (what shrinking needs):
/// - `snap` >= 0: the live snapshot at `snap % live.count` (creation order),
///   or an unknown id when none is live; < 0: a destroyed (or unknown) id;
/// - `image`: the taken image at `image % count` over all live snapshots;
/// - offsets and lengths are clamped to the device they land on;
/// - `data`: where in the seed's random byte pool the written bytes start;
/// - append pieces are placed on the storage disk by the run itself (first
///   fit, with the piece's gap of 0-7 sectors in front, so ranges are often
///   not 4 KiB aligned), never over a range any live snapshot holds; a range
///   is only reused once the snapshot it was appended to is destroyed, which
///   also checks that DESTROY really lets go of it.
private enum ModelOp: Equatable, Sendable, CustomStringConvertible {
    case write(dev: Int, offset: Int, length: Int, data: Int)
    case discard(dev: Int, offset: Int, length: Int)
    case imageRead(image: Int, offset: Int, length: Int)
    case imageWrite(image: Int, offset: Int, length: Int, data: Int)
    case create(devs: [Int])
    case append(snap: Int, pieces: [AppendPiece], variant: AppendVariant)
    case take(snap: Int)
    case destroy(snap: Int)
    /// target 0..<3: an original, 3: a missing device, 5: an unknown image
    /// number, >= 100: taken image `target - 100`.
    case markDirty(target: Int, ranges: [SectorRange])
    case removeTracker(dev: Int)
    case readCbt(dev: Int, offset: UInt32, length: UInt32)
    case waitEvent(snap: Int)
    /// Only the faulty profile makes these: a flush of an original.
    case flush(dev: Int)

    var description: String {
        switch self {
        case let .write(d, o, l, x): return ".write(dev: \(d), offset: \(o), length: \(l), data: \(x))"
        case let .discard(d, o, l): return ".discard(dev: \(d), offset: \(o), length: \(l))"
        case let .imageRead(i, o, l): return ".imageRead(image: \(i), offset: \(o), length: \(l))"
        case let .imageWrite(i, o, l, x): return ".imageWrite(image: \(i), offset: \(o), length: \(l), data: \(x))"
        case let .create(ds): return ".create(devs: \(ds))"
        case let .append(s, ps, v):
            let p = ps.map { "AppendPiece(sectors: \($0.sectors), gap: \($0.gap))" }.joined(separator: ", ")
            return ".append(snap: \(s), pieces: [\(p)], variant: .\(v))"
        case let .take(s): return ".take(snap: \(s))"
        case let .destroy(s): return ".destroy(snap: \(s))"
        case let .markDirty(t, rs):
            let r = rs.map { "SectorRange(offset: \($0.offset), count: \($0.count))" }.joined(separator: ", ")
            return ".markDirty(target: \(t), ranges: [\(r)])"
        case let .removeTracker(d): return ".removeTracker(dev: \(d))"
        case let .readCbt(d, o, l): return ".readCbt(dev: \(d), offset: \(o), length: \(l))"
        case let .waitEvent(s): return ".waitEvent(snap: \(s))"
        case let .flush(d): return ".flush(dev: \(d))"
        }
    }

    var isControl: Bool {
        switch self {
        case .create, .append, .take, .destroy, .removeTracker, .waitEvent: return true
        default: return false
        }
    }
}

private struct AppendPiece: Equatable, Sendable {
    var sectors: UInt64
    var gap: UInt64
}

private enum AppendVariant: Equatable, Sendable {
    case normal, missingDevice, pastEnd
    /// A range that overlaps one some live snapshot holds: EBUSY.
    case overlapping
}

private struct Mismatch: Error, CustomStringConvertible {
    let description: String
}

@inline(__always)
private func check(_ condition: Bool, _ message: @autoclosure () -> String) throws {
    if !condition { throw Mismatch(description: message()) }
}

/// Runs an engine call and gives its errno (0 on success).
private func errnoOf<T>(_ body: () throws -> T) -> (T?, Int32) {
    do {
        return (try body(), 0)
    } catch let e as BlksnapError {
        return (nil, e.errno.rawValue)
    } catch {
        return (nil, -1)
    }
}

private func sameBytes(_ a: [UInt8], _ b: ArraySlice<UInt8>) -> Bool {
    a.withUnsafeBytes { pa in
        b.withUnsafeBytes { pb in
            pa.count == pb.count && (pa.count == 0 || memcmp(pa.baseAddress!, pb.baseAddress!, pa.count) == 0)
        }
    }
}

private func sameBytes(_ a: [UInt8], _ b: [UInt8]) -> Bool { sameBytes(a, b[...]) }

/// Where two byte sequences first differ, for messages.
private func firstDifference(_ a: [UInt8], _ b: [UInt8]) -> String {
    if a.count != b.count { return "lengths \(a.count) vs \(b.count)" }
    for i in 0..<a.count where a[i] != b[i] { return "first difference at +\(i): engine \(a[i]), model \(b[i])" }
    return "equal"
}

// MARK: - the reference model

private struct ModelTracker {
    var read: [UInt8]
    var write: [UInt8]
    var previous = 0
    var active = 1
    var generation: Int
}

private struct ModelEvent: Equatable {
    var code: UInt32
    var requested: UInt64 = 0
    var dev = DevId(major: 0, minor: 0)
    var err: Int32 = 0
}

private final class ModelSnapshot {
    let id: UUID16
    let devs: [Int]
    var taken = false
    var corrupted = false
    /// The errno of the corrupted events: ENOSPC when the storage ran out,
    /// else the injected fault's.
    var corruptedErr: Int32 = 0
    var corruptionVerified = false
    /// Per device of the snapshot (index k): the frozen content plus image writes.
    var images: [[UInt8]] = []
    var stored: [[Bool]] = []
    /// Where each stored chunk's copy starts on the storage disk, in sectors.
    var locations: [[UInt64]] = []
    var imageIds: [DevId] = []
    /// The difference storage, as the spec describes it.
    var ranges: [(start: UInt64, count: UInt64, used: UInt64)] = []
    var current = 0
    var capacity: UInt64 = 0
    var filled: UInt64 = 0
    var requested: UInt64 = 0
    var lowFlag = false
    var events: [ModelEvent] = []
    /// Storage disk extents (sectors) this snapshot holds until DESTROY.
    var extents: [(start: UInt64, count: UInt64)] = []
    /// The ranges the engine was given (extents less their gaps).
    var held: [SectorRange] = []
    /// Events WAIT_EVENT gave: corrupted events per device and error.
    var corruptedSeen: [(dev: DevId, err: Int32)] = []

    init(id: UUID16, devs: [Int]) {
        self.id = id
        self.devs = devs
    }
}

private struct RunStats {
    var ops = 0
    var imageReadsCompared = 0
    var imageReadsEIO = 0
    var cbtReadsCompared = 0
    var takes = 0
    var wraps = 0
    var corruptions = 0
    var skipped = 0
    var faults: [String: Int] = [:]
    var failedWrites = 0
    var faultCorruptions = 0
    var errnos: [String: Int] = [:]

    mutating func note(_ what: String, _ errno: Int32) {
        errnos["\(what) \(Errno_.name(errno))", default: 0] += 1
    }
    func saw(_ what: String, _ errno: Int32) -> Bool { (errnos["\(what) \(Errno_.name(errno))"] ?? 0) > 0 }
}

/// Faults the model can be told to have, to prove the harness catches and
/// shrinks a disagreement.
private enum ModelFault: Sendable {
    case none
    case imageWritesLeaveReadMap
    /// Takes every original write as landed, faults or not.
    case failedWritesLookAcknowledged
}

/// The engine under test and the model, side by side.
private final class Harness {
    let rig: Rig
    let devices: [RoutedDevice]
    let backings: [MemoryBlockDevice]
    let pool: [UInt8]
    let fault: ModelFault
    let seed: UInt64
    /// Drives the faults of every disk beneath the engine; enabled only
    /// while an engine call runs.
    let injector: FaultInjector
    /// What the injector did during the current step: failures still to be
    /// accounted for by the model, in order.
    var failures: [InjectedFault] = []

    var orig: [[UInt8]]
    var trackers: [ModelTracker?] = [nil, nil, nil]
    var trackerOrder: [Int] = []
    var live: [ModelSnapshot] = []
    var stale: [UUID16] = []
    var seenSnapshotIds = Set<UUID16>()
    var usedMinors = Set<UInt32>()
    var generations = 0
    var observedGeneration: [Int: (gen: Int, id: UUID16)] = [:]
    var freeStorage: [(start: UInt64, count: UInt64)] = [(0, Geo.storageSectors)]
    var stats = RunStats()

    init(seed: UInt64, fault: ModelFault = .none, faultRules: [FaultRule] = []) throws {
        self.fault = fault
        self.seed = seed
        injector = FaultInjector(seed: seed, rules: faultRules)
        injector.isEnabled = false
        rig = Rig(devices: 0, size: UInt64(Geo.sizes[0]), storage: UInt64(Geo.storageBytes))
        var ds: [RoutedDevice] = []
        var bs: [MemoryBlockDevice] = []
        for i in 0..<3 {
            let b = MemoryBlockDevice(size: UInt64(Geo.sizes[i]))
            ds.append(try rig.engine.route(Geo.devIds[i], backing: FaultyBlockDevice(b, name: "dev\(i)", injector: injector)))
            bs.append(b)
        }
        devices = ds
        backings = bs
        rig.host.disks[Rig.storageId] = FaultyBlockDevice(rig.storageDisk, name: "storage", injector: injector)
        rig.host.unrouted.insert(Geo.unroutedId)
        var g = SplitMix64(seed: seed ^ 0x0DDB_A11_C0FFEE)
        var p = [UInt8](repeating: 0, count: Geo.poolSize)
        p.withUnsafeMutableBytes { raw in
            let words = raw.bindMemory(to: UInt64.self)
            for i in 0..<words.count { words[i] = g.next() }
        }
        pool = p
        orig = Geo.sizes.map { [UInt8](repeating: 0, count: $0) }
    }

    var engine: Engine { rig.engine }

    // MARK: model queries

    func snapshotOf(_ dev: Int) -> ModelSnapshot? { live.first { $0.devs.contains(dev) } }

    func resolve(_ snap: Int) -> (ModelSnapshot?, UUID16) {
        if snap >= 0 {
            guard !live.isEmpty else { return (nil, Geo.unknownId) }
            let s = live[snap % live.count]
            return (s, s.id)
        }
        guard !stale.isEmpty else { return (nil, Geo.unknownId) }
        return (nil, stale[(-snap - 1) % stale.count])
    }

    var takenImages: [(snapshot: ModelSnapshot, k: Int)] {
        live.filter(\.taken).flatMap { s in s.devs.indices.map { (s, $0) } }
    }

    // MARK: model transitions

    private func blockRange(_ offset: Int, _ length: Int) -> ClosedRange<Int>? {
        length > 0 ? (offset >> Geo.blockShift)...((offset + length - 1) >> Geo.blockShift) : nil
    }

    /// A write to the original: the write map's bytes rise to `active`.
    private func cbtWrite(_ dev: Int, _ offset: Int, _ length: Int) {
        guard trackers[dev] != nil, let r = blockRange(offset, length) else { return }
        let active = UInt8(trackers[dev]!.active)
        for b in r where trackers[dev]!.write[b] < active { trackers[dev]!.write[b] = active }
    }

    /// An image write or MARK_DIRTY: write map to `active`, read map to `previous`.
    private func cbtBoth(_ dev: Int, _ offset: Int, _ length: Int, readMapToo: Bool = true) {
        guard trackers[dev] != nil, let r = blockRange(offset, length) else { return }
        let active = UInt8(trackers[dev]!.active)
        let previous = UInt8(trackers[dev]!.previous)
        for b in r where trackers[dev]!.write[b] < active { trackers[dev]!.write[b] = active }
        if readMapToo {
            for b in r where trackers[dev]!.read[b] < previous { trackers[dev]!.read[b] = previous }
        }
    }

    private func newTracker(_ dev: Int) {
        generations += 1
        let n = Geo.blockCount(dev)
        trackers[dev] = ModelTracker(read: [UInt8](repeating: 0, count: n), write: [UInt8](repeating: 0, count: n),
                                     generation: generations)
        trackerOrder.append(dev)
    }

    private func switchMaps(_ dev: Int) {
        var t = trackers[dev]!
        t.read = t.write
        t.previous = t.active
        t.active += 1
        if t.active == 256 {
            t.active = 1
            t.write = [UInt8](repeating: 0, count: t.write.count)
            generations += 1
            t.generation = generations
            stats.wraps += 1
        }
        trackers[dev] = t
    }

    /// Cuts `sectors` from a snapshot's storage: the first sector on the
    /// storage disk, or nil when it is exhausted.
    private func allocate(_ s: ModelSnapshot, _ sectors: UInt64) -> UInt64? {
        var ok: UInt64?
        while s.current < s.ranges.count {
            let available = s.ranges[s.current].count - s.ranges[s.current].used
            if available >= sectors {
                ok = s.ranges[s.current].start + s.ranges[s.current].used
                s.ranges[s.current].used += sectors
                s.filled += sectors
                break
            }
            // A tail smaller than the chunk is left unused.
            s.filled += available
            s.ranges[s.current].used = s.ranges[s.current].count
            s.current += 1
        }
        // Requested minus used at or under half the minimum: ask once more.
        let left = Int64(bitPattern: s.requested &- s.filled)
        if ok != nil, left <= Int64((Geo.minimum >> 1) & ~7), !s.lowFlag {
            s.lowFlag = true
            s.requested += Geo.minimum
            s.events.append(ModelEvent(code: 0, requested: Geo.minimum))
        }
        return ok
    }

    private func corrupt(_ s: ModelSnapshot, _ err: Int32 = Errno_.ENOSPC, byFault: Bool = false) {
        guard !s.corrupted else { return }
        s.corrupted = true
        s.corruptedErr = err
        stats.corruptions += 1
        if byFault { stats.faultCorruptions += 1 }
        for d in s.devs { s.events.append(ModelEvent(code: 1, dev: Geo.devIds[d], err: err)) }
    }

    /// Takes the next failure of the step if it is this call.
    private func nextFailure(_ device: String, _ kind: FaultKind, at offset: UInt64? = nil, call: Int? = nil) -> InjectedFault? {
        guard let f = failures.first, f.device == device, f.kind == kind, offset == nil || f.offset == offset,
              call == nil || f.call == call else {
            return nil
        }
        failures.removeFirst()
        return f
    }

    /// Stores every chunk of `offset..<offset+length` not stored yet, in
    /// order as the engine does: read the original, cut the storage, write
    /// the copy. False when the storage ran out or a disk failed (the
    /// snapshot is then corrupted).
    private func storeChunks(_ s: ModelSnapshot, _ k: Int, _ offset: Int, _ length: Int) -> Bool {
        guard length > 0, !s.corrupted else { return !s.corrupted }
        let dev = s.devs[k]
        let first = offset >> Geo.chunkShift
        let last = min((offset + length - 1) >> Geo.chunkShift, Geo.chunkCount(dev) - 1)
        for c in first...last where !s.stored[k][c] {
            if let f = nextFailure("dev\(dev)", .read, at: UInt64(c) << UInt64(Geo.chunkShift)) {
                corrupt(s, f.errno!.rawValue, byFault: true)
                return false
            }
            guard let sector = allocate(s, Geo.chunkSectors(dev, c)) else {
                corrupt(s)
                return false
            }
            // A chunk's copy and an image write's piece may start at the
            // same byte: the storage writes of the step are counted.
            storageWrites += 1
            if let f = nextFailure("storage", .write, at: sector << 9, call: storageWrites - 1) {
                corrupt(s, f.errno!.rawValue, byFault: true)
                return false
            }
            s.stored[k][c] = true
            s.locations[k][c] = sector
        }
        return true
    }

    /// The byte on the storage disk where an image byte of a stored chunk lives.
    private func pieceOnStorage(_ s: ModelSnapshot, _ k: Int, _ position: Int) -> UInt64 {
        (s.locations[k][position >> Geo.chunkShift] << 9) + UInt64(position & (Geo.chunkSize - 1))
    }

    /// After an original write or discard: copy-on-write first (a fault
    /// there corrupts the snapshot, the write goes on), then the backing
    /// store (a fault there is the writer's error, and the range holds old
    /// or new bytes). The CBT is marked either way, before anything lands.
    private func originalChanged(_ dev: Int, _ off: Int, _ len: Int, err: Int32, kind: FaultKind,
                                 new: ArraySlice<UInt8>) throws {
        cbtWrite(dev, off, len)
        if let s = snapshotOf(dev), s.taken { _ = storeChunks(s, s.devs.firstIndex(of: dev)!, off, len) }
        if fault != .failedWritesLookAcknowledged, let f = nextFailure("dev\(dev)", kind, at: UInt64(off)) {
            stats.failedWrites += 1
            try check(err == f.errno!.rawValue,
                      "\(kind) \(off)+\(len) on device \(dev) meeting \(f): engine \(Errno_.name(err)), model \(Errno_.name(f.errno!.rawValue))")
            let actual = Array(backings[dev].snapshotBytes()[off..<(off + len)])
            let now = try adoptEither(old: orig[dev][off..<(off + len)], new: new, actual: actual,
                                      what: "failed \(kind) \(off)+\(len) on device \(dev)")
            orig[dev].replaceSubrange(off..<(off + len), with: now)
        } else {
            try check(err == 0, "original \(kind) \(off)+\(len) to device \(dev) failed: \(Errno_.name(err))")
            orig[dev].replaceSubrange(off..<(off + len), with: new)
        }
        stats.note(kind.rawValue, err)
        try allAccountedFor("original \(kind)")
        try checkOriginal(dev, off, len)
    }

    /// Runs an engine call with faults on; what it injected goes to `failures`.
    private func injecting<T>(_ body: () throws -> T) -> (T?, Int32) {
        injector.reseed(seed ^ stepHash)
        injector.isEnabled = true
        let result = errnoOf(body)
        injector.isEnabled = false
        for f in injector.drain() {
            stats.faults["\(f.device.hasPrefix("dev") ? "backing" : "storage") \(f.kind) \(f.effect)", default: 0] += 1
            if f.errno != nil { failures.append(f) }
        }
        return result
    }

    /// Per step, so a step meets the same faults wherever shrinking puts it.
    private var stepHash: UInt64 = 0
    private var stepRepeats: [UInt64: Int] = [:]
    /// Storage writes the model expects so far in the step.
    private var storageWrites = 0

    /// After a failed write: each byte of the range holds the old or the new
    /// data; `actual` (read beneath the faults) is then the truth.
    private func adoptEither(old: ArraySlice<UInt8>, new: ArraySlice<UInt8>, actual: [UInt8], what: String) throws -> [UInt8] {
        for (i, (o, (n, a))) in zip(old, zip(new, actual)).enumerated() where a != o && a != n {
            throw Mismatch(description: "\(what): byte +\(i) is \(a), neither the old \(o) nor the new \(n)")
        }
        return actual
    }

    /// Every failure of the step was explained by the model.
    private func allAccountedFor(_ what: String) throws {
        try check(failures.isEmpty, "\(what): injected \(failures) but the model expected no such call")
    }

    private func allocateStorage(_ sectors: UInt64) -> UInt64? {
        guard sectors > 0 else { return nil }
        for (i, e) in freeStorage.enumerated() where e.count >= sectors {
            freeStorage[i] = (e.start + sectors, e.count - sectors)
            if freeStorage[i].count == 0 { freeStorage.remove(at: i) }
            return e.start
        }
        return nil
    }

    private func releaseStorage(_ extent: (start: UInt64, count: UInt64)) {
        freeStorage.append(extent)
        freeStorage.sort { $0.start < $1.start }
        var merged: [(start: UInt64, count: UInt64)] = []
        for e in freeStorage {
            if let last = merged.last, last.start + last.count == e.start {
                merged[merged.count - 1].count += e.count
            } else {
                merged.append(e)
            }
        }
        freeStorage = merged
    }

    private func allocMinor() -> UInt32 {
        var m: UInt32 = 0
        while usedMinors.contains(m) { m += 1 }
        usedMinors.insert(m)
        return m
    }

    // MARK: running one operation

    func run(_ op: ModelOp) throws {
        stats.ops += 1
        failures = []
        storageWrites = 0
        // The step and how many equal steps came before it: a kept step
        // meets the same faults after shrinking, and `.take(snap: 0)` does
        // not meet the same ones every time.
        let text = op.description
        var h: UInt64 = 0xCBF2_9CE4_8422_2325
        for b in text.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01B3 }
        let repeats = stepRepeats[h, default: 0]
        stepRepeats[h] = repeats + 1
        stepHash = h &+ UInt64(repeats) &* 0x9E37_79B9_7F4A_7C15
        switch op {
        case let .write(dev, offset, length, data):
            let size = Geo.sizes[dev]
            let off = offset % size
            let len = min(length, size - off)
            let start = data % (pool.count - len + 1)
            let (_, err) = injecting {
                try pool.withUnsafeBytes { p in
                    try devices[dev].write(UnsafeRawBufferPointer(rebasing: p[start..<(start + len)]), at: UInt64(off))
                }
            }
            try originalChanged(dev, off, len, err: err, kind: .write, new: pool[start..<(start + len)])

        case let .discard(dev, offset, length):
            let size = Geo.sizes[dev]
            let off = offset % size
            let len = min(length, size - off)
            let (_, err) = injecting { try devices[dev].discard(at: UInt64(off), length: UInt64(len)) }
            try originalChanged(dev, off, len, err: err, kind: .discard, new: [UInt8](repeating: 0, count: len)[...])

        case let .flush(dev):
            let (_, err) = injecting { try devices[dev].flush() }
            let expected = nextFailure("dev\(dev)", .flush)?.errno?.rawValue ?? 0
            stats.note("flush", err)
            try check(err == expected, "flush of device \(dev): engine \(Errno_.name(err)), model \(Errno_.name(expected))")
            try allAccountedFor("flush")

        case let .imageRead(image, offset, length):
            let all = takenImages
            guard !all.isEmpty else { stats.skipped += 1; return }
            let (s, k) = all[image % all.count]
            let size = Geo.sizes[s.devs[k]]
            let off = offset % size
            let len = min(length, size - off)
            guard let img = engine.image(s.imageIds[k]) else {
                throw Mismatch(description: "no engine image \(s.imageIds[k]) for device \(s.devs[k]) of \(s.id)")
            }
            let (bytes, err) = injecting { try img.readBytes(at: UInt64(off), count: len) }
            if s.corrupted {
                try check(err == Errno_.EIO, "reading corrupted image of device \(s.devs[k]) gave \(Errno_.name(err)), not EIO")
                stats.imageReadsEIO += 1
            } else if let f = failures.first {
                // The read stops at its first fault, on the storage or the original.
                failures.removeFirst()
                try check(f.kind == .read && (f.device == "storage" || f.device == "dev\(s.devs[k])"),
                          "image read of device \(s.devs[k]) met \(f)")
                stats.note("imageRead", err)
                try check(err == f.errno!.rawValue,
                          "image read meeting \(f): engine \(Errno_.name(err)), model \(Errno_.name(f.errno!.rawValue))")
            } else {
                try check(err == 0, "image read \(off)+\(len) of device \(s.devs[k]) failed: \(Errno_.name(err))")
                try check(sameBytes(bytes!, s.images[k][off..<(off + len)]),
                          "image read \(off)+\(len) of device \(s.devs[k]) differs from the point in time: "
                          + firstDifference(bytes!, Array(s.images[k][off..<(off + len)])))
                stats.imageReadsCompared += 1
            }
            try allAccountedFor("image read")

        case let .imageWrite(image, offset, length, data):
            let all = takenImages
            guard !all.isEmpty else { stats.skipped += 1; return }
            let (s, k) = all[image % all.count]
            let dev = s.devs[k]
            let size = Geo.sizes[dev]
            let off = offset % size
            let len = min(length, size - off)
            let start = data % (pool.count - len + 1)
            guard let img = engine.image(s.imageIds[k]) else {
                throw Mismatch(description: "no engine image \(s.imageIds[k]) for device \(dev) of \(s.id)")
            }
            let (_, err) = injecting {
                try pool.withUnsafeBytes { p in
                    try img.write(UnsafeRawBufferPointer(rebasing: p[start..<(start + len)]), at: UInt64(off))
                }
            }
            var expected: Int32 = 0
            if s.corrupted {
                expected = Errno_.EIO
            } else {
                // Marked before anything is stored: a write failing half-way
                // may have changed part of the image.
                cbtBoth(dev, off, len, readMapToo: fault != .imageWritesLeaveReadMap)
                // Chunk by chunk, as the engine: store the chunk, then write its piece.
                var done = 0
                while done < len {
                    let position = off + done
                    let n = min(len - done, Geo.chunkSize - (position & (Geo.chunkSize - 1)))
                    guard storeChunks(s, k, position, n) else { expected = Errno_.EIO; break }
                    let region = pieceOnStorage(s, k, position)
                    storageWrites += 1
                    if let f = nextFailure("storage", .write, at: region, call: storageWrites - 1) {
                        expected = f.errno!.rawValue
                        stats.failedWrites += 1
                        let actual = try img.readBytes(at: UInt64(position), count: n)
                        let new = try adoptEither(old: s.images[k][position..<(position + n)], new: pool[(start + done)..<(start + done + n)],
                                                  actual: actual, what: "image write failing at \(position)+\(n)")
                        s.images[k].replaceSubrange(position..<(position + n), with: new)
                        break
                    }
                    s.images[k].replaceSubrange(position..<(position + n), with: pool[(start + done)..<(start + done + n)])
                    done += n
                }
            }
            try allAccountedFor("image write")
            stats.note("imageWrite", err)
            try check(err == expected, "image write \(off)+\(len) to device \(dev): engine \(Errno_.name(err)), model \(Errno_.name(expected))")
            // Image writes never reach the original.
            try checkOriginal(dev, off, len)

        case let .create(devs):
            var expected: Int32 = 0
            if Set(devs).count != devs.count {
                expected = Errno_.EINVAL
            } else {
                for d in devs {
                    if d == 4 { expected = Errno_.ENXIO; break }
                    if d == 3 { expected = Errno_.ENODEV; break }
                    if snapshotOf(d) != nil { expected = Errno_.EBUSY; break }
                }
            }
            let (id, err) = errnoOf { try engine.createSnapshot(devs.map(Geo.devId)) }
            stats.note("create", err)
            try check(err == expected, "create \(devs): engine \(Errno_.name(err)), model \(Errno_.name(expected))")
            if let id {
                try check(!seenSnapshotIds.contains(id), "create reused snapshot id \(id)")
                seenSnapshotIds.insert(id)
                for d in devs where trackers[d] == nil { newTracker(d) }
                let s = ModelSnapshot(id: id, devs: devs)
                s.requested = Geo.minimum
                s.events = [ModelEvent(code: 0, requested: Geo.minimum)]
                live.append(s)
            }

        case let .append(snap, pieces, variant):
            let (s, id) = resolve(snap)
            var ranges: [SectorRange] = []
            var held: [(start: UInt64, count: UInt64)] = []
            var device = Rig.storageId
            var expected: Int32 = 0
            if let s, variant == .overlapping {
                // One sector inside a range a live snapshot holds, chosen by
                // the piece's numbers so a seed replays it.
                let holders = live.flatMap(\.held)
                guard !holders.isEmpty, let p = pieces.first else {
                    stats.skipped += 1
                    return
                }
                let h = holders[Int(p.sectors) % holders.count]
                let sector = h.offset + p.gap % h.count
                let (_, err) = errnoOf { try engine.appendStorage(s.id, device: Rig.storageId,
                                                                  ranges: [SectorRange(offset: sector, count: 1)]) }
                stats.note("append", err)
                try check(err == Errno_.EBUSY, "append over \(h) at \(sector): engine \(Errno_.name(err)), model EBUSY")
                return
            }
            if s == nil || variant != .normal {
                ranges = pieces.map { SectorRange(offset: $0.gap, count: $0.sectors) }
                if variant == .missingDevice { device = Geo.missingId }
                if variant == .pastEnd { ranges.append(SectorRange(offset: Geo.storageSectors - 4, count: 64)) }
                if s == nil {
                    expected = Errno_.ESRCH
                } else if ranges.isEmpty {
                    expected = 0
                } else if variant == .missingDevice {
                    expected = Errno_.ENXIO
                } else {
                    expected = Errno_.EINVAL
                }
            } else {
                for p in pieces {
                    guard p.sectors > 0 else { ranges.append(SectorRange(offset: p.gap, count: 0)); continue }
                    guard let start = allocateStorage(p.sectors + p.gap) else {
                        // The storage disk is full of live ranges: skip the step.
                        for e in held { releaseStorage(e) }
                        stats.skipped += 1
                        return
                    }
                    held.append((start, p.sectors + p.gap))
                    ranges.append(SectorRange(offset: start + p.gap, count: p.sectors))
                }
            }
            let (_, err) = errnoOf { try engine.appendStorage(id, device: device, ranges: ranges) }
            stats.note("append", err)
            try check(err == expected, "append \(ranges) on \(device): engine \(Errno_.name(err)), model \(Errno_.name(expected))")
            if let s, err == 0 {
                s.extents += held
                s.held += ranges.filter { $0.count > 0 }
                for r in ranges where r.count > 0 {
                    s.ranges.append((r.offset, r.count, 0))
                    s.capacity += r.count
                }
                if !ranges.isEmpty, s.lowFlag, s.capacity >= s.requested { s.lowFlag = false }
            } else {
                for e in held { releaseStorage(e) }
            }

        case let .take(snap):
            let (s, id) = resolve(snap)
            var expected: Int32
            if let s {
                if s.taken { expected = Errno_.EALREADY }
                else if s.devs.isEmpty { expected = Errno_.ENODEV }
                else if s.capacity == 0 { expected = Errno_.EFAULT }
                else { expected = 0 }
            } else {
                expected = Errno_.ESRCH
            }
            let (_, err) = injecting { try engine.takeSnapshot(id) }
            // TAKE flushes every device first; a failed flush refuses it.
            if expected == 0, let f = failures.first {
                failures.removeFirst()
                try check(f.kind == .flush && s!.devs.contains { f.device == "dev\($0)" }, "take met \(f)")
                expected = f.errno!.rawValue
            }
            try allAccountedFor("take")
            stats.note("take", err)
            try check(err == expected, "take: engine \(Errno_.name(err)), model \(Errno_.name(expected))")
            if let s, err == 0 {
                stats.takes += 1
                s.taken = true
                for d in s.devs {
                    switchMaps(d)
                    s.images.append(orig[d])
                    s.stored.append([Bool](repeating: false, count: Geo.chunkCount(d)))
                    s.locations.append([UInt64](repeating: 0, count: Geo.chunkCount(d)))
                    s.imageIds.append(DevId(major: 252, minor: allocMinor()))
                }
                let areas = engine.snapshot(id)?.diffAreas ?? []
                try check(areas.count == s.devs.count && areas.allSatisfy { $0.chunkShift == Geo.chunkShift },
                          "taken snapshot has \(areas.count) diff areas with chunk shifts \(areas.map(\.chunkShift))")
            }

        case let .destroy(snap):
            let (s, id) = resolve(snap)
            let expected = s == nil ? Errno_.ENODEV : 0
            if let s, s.taken, !s.corrupted {
                for k in s.devs.indices { try checkWholeImage(s, k) }
            }
            let engineSnapshot = engine.snapshot(id)
            let images = engineSnapshot?.images ?? []
            let pending = engineSnapshot?.events.pending ?? []
            let (_, err) = errnoOf { try engine.destroySnapshot(id) }
            stats.note("destroy", err)
            try check(err == expected, "destroy: engine \(Errno_.name(err)), model \(Errno_.name(expected))")
            if let s, err == 0 {
                try checkCorruptedEvents(s, pending: pending)
                live.removeAll { $0 === s }
                stale.append(s.id)
                for i in s.imageIds { usedMinors.remove(i.minor) }
                for e in s.extents { releaseStorage(e) }
                for img in images {
                    let (_, e) = errnoOf { try img.readBytes(at: 0, count: 512) }
                    try check(e == Errno_.ENODEV, "reading an image of a destroyed snapshot gave \(Errno_.name(e)), not ENODEV")
                }
                try check(engine.snapshot(id) == nil, "destroyed snapshot \(id) is still there")
                let (_, w) = errnoOf { try engine.waitEvent(id, timeoutMs: 0) }
                try check(w == Errno_.ESRCH, "WAIT_EVENT on a destroyed snapshot gave \(Errno_.name(w)), not ESRCH")
            }

        case let .markDirty(target, ranges):
            var devId: DevId
            var dev = -1
            var expected: Int32 = 0
            switch target {
            case 0..<3:
                dev = target
                devId = Geo.devIds[dev]
                if trackers[dev] == nil { expected = Errno_.ENODEV }
            case 100...:
                let all = takenImages
                guard !all.isEmpty else { stats.skipped += 1; return }
                let (s, k) = all[(target - 100) % all.count]
                dev = s.devs[k]
                devId = s.imageIds[k]
            case 5:
                devId = Geo.bogusImageId
                expected = Errno_.ENXIO
            default:
                devId = Geo.missingId
                expected = Errno_.ENXIO
            }
            if expected == 0 {
                for r in ranges where r.count > 0 {
                    let last = Int(((r.offset + r.count) << 9 - 1) >> UInt64(Geo.blockShift))
                    if last >= Geo.blockCount(dev) { expected = Errno_.EINVAL; break }
                }
            }
            let (_, err) = errnoOf { try engine.markDirty(devId, ranges: ranges) }
            stats.note("markDirty", err)
            try check(err == expected, "mark dirty \(devId) \(ranges): engine \(Errno_.name(err)), model \(Errno_.name(expected))")
            if err == 0 {
                for r in ranges where r.count > 0 { cbtBoth(dev, Int(r.offset << 9), Int(r.count << 9)) }
            }

        case let .removeTracker(dev):
            let expected: Int32
            if dev >= 3 { expected = Errno_.ENOENT }
            else if trackers[dev] == nil { expected = Errno_.ENODATA }
            else if snapshotOf(dev) != nil { expected = Errno_.EBUSY }
            else { expected = 0 }
            let (_, err) = errnoOf { try engine.removeTracker(Geo.devId(dev)) }
            stats.note("removeTracker", err)
            try check(err == expected, "remove tracker \(dev): engine \(Errno_.name(err)), model \(Errno_.name(expected))")
            if err == 0 {
                trackers[dev] = nil
                trackerOrder.removeAll { $0 == dev }
            }

        case let .readCbt(dev, offset, length):
            var expected: Int32 = 0
            if dev >= 3 { expected = Errno_.ENXIO }
            else if trackers[dev] == nil { expected = Errno_.ENODATA }
            else if !(snapshotOf(dev)?.taken ?? false) { expected = Errno_.EPERM }
            let (bytes, err) = errnoOf { try engine.readCbtMap(Geo.devId(dev), offset: offset, length: length) }
            stats.note("readCbt", err)
            try check(err == expected, "read CBT of \(dev): engine \(Errno_.name(err)), model \(Errno_.name(expected))")
            if let bytes {
                let map = trackers[dev]!.read
                let from = min(Int(offset), map.count)
                let to = min(Int(offset) + Int(length), map.count)
                try check(sameBytes(bytes, map[from..<to]),
                          "READ_CBT_MAP \(dev) at \(offset) length \(length): " + firstDifference(bytes, Array(map[from..<to])))
                stats.cbtReadsCompared += 1
            }

        case let .waitEvent(snap):
            let (s, id) = resolve(snap)
            let (event, err) = errnoOf { try engine.waitEvent(id, timeoutMs: 0) }
            let expected = s == nil ? Errno_.ESRCH : (s!.events.isEmpty ? Errno_.ENOENT : 0)
            stats.note("waitEvent", err)
            try check(err == expected, "WAIT_EVENT: engine \(Errno_.name(err)), model \(Errno_.name(expected))")
            if let s, let event {
                let m = s.events.removeFirst()
                try checkEvent(event, m)
                if m.code == 1 { s.corruptedSeen.append((m.dev, m.err)) }
            }
        }
        try checkAfter(op)
    }

    // MARK: checks

    private func checkOriginal(_ dev: Int, _ off: Int, _ len: Int) throws {
        let (viaRouted, err) = errnoOf { try devices[dev].readBytes(at: UInt64(off), count: len) }
        try check(err == 0, "reading original \(dev) failed: \(Errno_.name(err))")
        try check(sameBytes(viaRouted!, orig[dev][off..<(off + len)]),
                  "original \(dev) at \(off)+\(len) is not what was written: "
                  + firstDifference(viaRouted!, Array(orig[dev][off..<(off + len)])))
    }

    private func checkWholeImage(_ s: ModelSnapshot, _ k: Int) throws {
        guard let img = engine.image(s.imageIds[k]) else {
            throw Mismatch(description: "no engine image \(s.imageIds[k])")
        }
        let (bytes, err) = errnoOf { try img.readBytes(at: 0, count: s.images[k].count) }
        try check(err == 0, "reading the whole image of device \(s.devs[k]) failed: \(Errno_.name(err))")
        try check(sameBytes(bytes!, s.images[k]),
                  "whole image of device \(s.devs[k]) differs: " + firstDifference(bytes!, s.images[k]))
        stats.imageReadsCompared += 1
    }

    private func checkEvent(_ e: SnapshotEvent, _ m: ModelEvent) throws {
        try check(e.code.rawValue == m.code, "event code \(e.code.rawValue), model \(m.code)")
        if m.code == 0 {
            try check(e.data.count >= EventLowFreeSpace.size, "low free space event data of \(e.data.count) bytes")
            let d = EventLowFreeSpace(wire: Array(e.data.prefix(EventLowFreeSpace.size)))
            try check(d.requestedSectors == m.requested, "low free space asks \(d.requestedSectors), model \(m.requested)")
        } else {
            try check(e.data.count >= EventCorrupted.size, "corrupted event data of \(e.data.count) bytes")
            let d = EventCorrupted(wire: Array(e.data.prefix(EventCorrupted.size)))
            try check(d.origDevId == m.dev && d.errCode == m.err,
                      "corrupted event for \(d.origDevId) err \(d.errCode), model \(m.dev) err \(m.err)")
        }
    }

    /// At DESTROY: a corrupted snapshot said so exactly once per device,
    /// with the errno that corrupted it; any other snapshot never did.
    private func checkCorruptedEvents(_ s: ModelSnapshot, pending: [SnapshotEvent]) throws {
        var all = s.corruptedSeen
        for e in pending where e.code == .corrupted {
            let d = EventCorrupted(wire: Array(e.data.prefix(EventCorrupted.size)))
            all.append((d.origDevId, d.errCode))
        }
        let expectedDevs = s.corrupted ? s.devs.map { Geo.devIds[$0] }.sorted() : []
        try check(all.map(\.dev).sorted() == expectedDevs,
                  "corrupted events for \(all.map(\.dev)), expected one for each of \(expectedDevs)")
        try check(all.allSatisfy { $0.err == s.corruptedErr },
                  "corrupted events with errors \(all.map(\.err)), not \(Errno_.name(s.corruptedErr))")
    }

    private func observeGeneration(_ dev: Int, _ id: UUID16) throws {
        let gen = trackers[dev]!.generation
        if let seen = observedGeneration[dev] {
            if seen.gen == gen {
                try check(seen.id == id, "generation id of \(dev) changed without a new generation")
            } else {
                try check(seen.id != id, "generation id of \(dev) stayed \(id) across a new generation")
            }
        }
        observedGeneration[dev] = (gen, id)
    }

    private func checkAfter(_ op: ModelOp) throws {
        // Trackers: presence, both tables, the numbers, the generation.
        for dev in 0..<3 {
            let t = engine.tracker(Geo.devIds[dev])
            try check((t == nil) == (trackers[dev] == nil), "device \(dev) tracked: engine \(t != nil), model \(trackers[dev] != nil)")
            guard let t, let m = trackers[dev] else { continue }
            let (read, write) = t.cbtMap.tables()
            try check(sameBytes(read, m.read), "CBT read map of \(dev): " + firstDifference(read, m.read))
            try check(sameBytes(write, m.write), "CBT write map of \(dev): " + firstDifference(write, m.write))
            try check(Int(t.cbtMap.snapNumberPrevious) == m.previous && Int(t.cbtMap.snapNumberActive) == m.active,
                      "snap numbers of \(dev): engine \(t.cbtMap.snapNumberPrevious)/\(t.cbtMap.snapNumberActive), model \(m.previous)/\(m.active)")
            try observeGeneration(dev, t.cbtMap.generationId)
        }
        // Snapshots: corruption and the event queue.
        for s in live {
            guard let es = engine.snapshot(s.id) else { throw Mismatch(description: "snapshot \(s.id) is gone") }
            try check(es.isCorrupted == s.corrupted, "snapshot corrupted: engine \(es.isCorrupted), model \(s.corrupted)")
            let pending = es.events.pending
            try check(pending.count == s.events.count,
                      "snapshot has \(pending.count) events queued (\(pending.map(\.code))), model \(s.events.count) (\(s.events.map(\.code)))")
            for (e, m) in zip(pending, s.events) { try checkEvent(e, m) }
            if s.corrupted && !s.corruptionVerified {
                s.corruptionVerified = true
                // Images fail from now on; originals keep everything written.
                for k in s.devs.indices {
                    guard let img = engine.image(s.imageIds[k]) else { throw Mismatch(description: "no image") }
                    let (_, r) = errnoOf { try img.readBytes(at: 0, count: 4096) }
                    try check(r == Errno_.EIO, "image of a corrupted snapshot read with \(Errno_.name(r)), not EIO")
                    let (_, w) = errnoOf { try img.writeBytes([1, 2, 3], at: 7) }
                    try check(w == Errno_.EIO, "image of a corrupted snapshot written with \(Errno_.name(w)), not EIO")
                    stats.imageReadsEIO += 1
                    try checkOriginal(s.devs[k], 0, Geo.sizes[s.devs[k]])
                }
            }
        }
        if op.isControl { try checkCollects() }
    }

    private func checkCollects() throws {
        let infos = engine.collectTrackers()
        try check(infos.map(\.devId) == trackerOrder.map { Geo.devIds[$0] },
                  "TRACKER_COLLECT lists \(infos.map(\.devId)), model \(trackerOrder)")
        for (info, dev) in zip(infos, trackerOrder) {
            let m = trackers[dev]!
            try check(info.snapNumber == UInt8(m.previous), "cbt_info.snap_number \(info.snapNumber), model \(m.previous)")
            try check(info.blockSize == 1 << Geo.blockShift && Int(info.blockCount) == Geo.blockCount(dev)
                      && info.deviceCapacity == UInt64(Geo.sizes[dev]), "cbt_info of \(dev): \(info)")
            try observeGeneration(dev, info.generationId)
        }
        try check(engine.collectSnapshots() == live.map(\.id), "SNAPSHOT_COLLECT differs from the live snapshots")
        for s in live {
            let (result, err) = errnoOf { try engine.collectImages(s.id) }
            try check(err == 0 && result!.count == s.devs.count, "COLLECT_IMAGES: \(Errno_.name(err))")
            if s.taken {
                let want = zip(s.devs, s.imageIds).map { ImageInfo(origDevId: Geo.devIds[$0], imageDevId: $1) }
                try check(result!.images == want, "COLLECT_IMAGES gives \(String(describing: result!.images)), model \(want)")
            } else {
                try check(result!.images == nil, "COLLECT_IMAGES lists images before TAKE")
            }
        }
    }

    /// Everything at once: each original whole (through the routed device
    /// and beneath it), each readable image whole.
    func fullCheck() throws {
        for dev in 0..<3 {
            try checkOriginal(dev, 0, Geo.sizes[dev])
            try check(sameBytes(backings[dev].snapshotBytes(), orig[dev]), "backing store of \(dev) differs from the model")
        }
        for s in live where s.taken && !s.corrupted {
            for k in s.devs.indices { try checkWholeImage(s, k) }
        }
    }
}

// MARK: - generating operations

private enum OpKind: CaseIterable {
    case write, discard, imageRead, imageWrite, create, append, take, destroy, markDirty, removeTracker, readCbt, waitEvent
    case flush
}

private struct Profile: Sendable {
    var name: String
    var weights: [(OpKind, Int)]
    var undersized: Bool
    /// What the disks beneath the engine do wrong; none but in "faulty".
    var faults: [FaultRule] = []

    /// Data-heavy, every control path, trackers removed now and then.
    static let mixed = Profile(name: "mixed", weights: [
        (.write, 26), (.discard, 2), (.imageRead, 14), (.imageWrite, 8), (.create, 7), (.append, 7), (.take, 7),
        (.destroy, 6), (.markDirty, 4), (.removeTracker, 2), (.readCbt, 5), (.waitEvent, 3),
    ], undersized: false)
    /// Long-lived trackers: rare removal.
    static let longTrackers = Profile(name: "longTrackers", weights: [
        (.write, 24), (.discard, 2), (.imageRead, 14), (.imageWrite, 8), (.create, 8), (.append, 8), (.take, 8),
        (.destroy, 8), (.markDirty, 5), (.removeTracker, 1), (.readCbt, 6), (.waitEvent, 3),
    ], undersized: false)
    /// Snapshot cycles as fast as possible and trackers never removed, so
    /// the snap numbers wrap past 255.
    static let cycling = Profile(name: "cycling", weights: [
        (.write, 14), (.discard, 1), (.imageRead, 8), (.imageWrite, 6), (.create, 16), (.append, 12), (.take, 16),
        (.destroy, 14), (.markDirty, 4), (.removeTracker, 0), (.readCbt, 6), (.waitEvent, 3),
    ], undersized: false)
    /// Storage much smaller than the writes: snapshots get corrupted.
    static let undersized = Profile(name: "undersized", weights: [
        (.write, 40), (.discard, 2), (.imageRead, 14), (.imageWrite, 10), (.create, 6), (.append, 5), (.take, 7),
        (.destroy, 4), (.markDirty, 3), (.removeTracker, 1), (.readCbt, 4), (.waitEvent, 4),
    ], undersized: true)
    /// The mixed load on disks that fail now and then: every kind of call
    /// on the backing stores, reads and writes on the storage disk.
    static let faulty = Profile(name: "faulty", weights: [
        (.write, 26), (.discard, 2), (.imageRead, 14), (.imageWrite, 8), (.create, 7), (.append, 7), (.take, 7),
        (.destroy, 6), (.markDirty, 4), (.removeTracker, 2), (.readCbt, 5), (.waitEvent, 3), (.flush, 3),
    ], undersized: false, faults: [
        FaultRule(devices: ["storage"], kinds: [.write], when: .random(0.006),
                  effects: [.fail(.ioError), .fail(.noSpace), .short(.ioError), .delay(microseconds: 20)]),
        // Image reads reach the storage less often than writes do.
        FaultRule(devices: ["storage"], kinds: [.read], when: .random(0.03),
                  effects: [.fail(.ioError), .short(.ioError), .delay(microseconds: 20)]),
        FaultRule(devices: ["dev0", "dev1", "dev2"], when: .random(0.015),
                  effects: [.fail(.ioError), .fail(.noSpace), .short(.ioError), .short(.noSpace), .delay(microseconds: 20)]),
    ])
}

private struct Generator {
    var rng: SplitMix64
    let profile: Profile
    let total: Int

    init(seed: UInt64, profile: Profile) {
        rng = SplitMix64(seed: seed)
        self.profile = profile
        total = profile.weights.reduce(0) { $0 + $1.1 }
    }

    mutating func next(_ h: Harness) -> ModelOp {
        for _ in 0..<16 {
            var r = rng.below(total)
            var kind = OpKind.write
            for (k, w) in profile.weights {
                if r < w { kind = k; break }
                r -= w
            }
            if let op = make(kind, h) { return op }
        }
        return makeWrite()
    }

    private mutating func io(size: Int) -> (Int, Int) {
        switch rng.below(20) {
        case 0..<7:  return (rng.below(size), rng.within(1, 4096))
        case 7..<12: return (rng.below(size), rng.within(1, 40 << 10))
        case 12..<16: return (rng.below(size >> 9) << 9, rng.within(1, 128) << 9)
        case 16..<18:
            let boundary = rng.within(1, (size - 1) >> Geo.chunkShift) << Geo.chunkShift
            return (max(0, boundary - rng.within(0, 1024)), rng.within(1, 2048))
        case 18: return (size - rng.within(1, 5000), rng.within(1, 6000))
        default: return (rng.below(size), rng.chance(50) ? 0 : rng.within(64 << 10, 128 << 10))
        }
    }

    private mutating func makeWrite() -> ModelOp {
        let dev = rng.below(3)
        let (o, l) = io(size: Geo.sizes[dev])
        return .write(dev: dev, offset: o, length: l, data: rng.below(Geo.poolSize))
    }

    private mutating func staleSelector() -> Int { -1 - rng.below(8) }

    private mutating func make(_ kind: OpKind, _ h: Harness) -> ModelOp? {
        switch kind {
        case .write:
            return makeWrite()

        case .discard:
            let dev = rng.below(3)
            let (o, l) = io(size: Geo.sizes[dev])
            return .discard(dev: dev, offset: o, length: l)

        case .imageRead, .imageWrite:
            let all = h.takenImages
            guard !all.isEmpty else { return nil }
            let i = rng.below(all.count)
            let (o, l) = io(size: Geo.sizes[all[i].snapshot.devs[all[i].k]])
            return kind == .imageRead ? .imageRead(image: i, offset: o, length: l)
                                      : .imageWrite(image: i, offset: o, length: l, data: rng.below(Geo.poolSize))

        case .create:
            let free = (0..<3).filter { h.snapshotOf($0) == nil }
            if profile.undersized {
                guard !free.isEmpty else { return nil }
                return .create(devs: shuffled(free))
            }
            if free.isEmpty && rng.chance(80) { return nil }
            var some: [Int] = []
            for d in free where rng.chance(profile.name == "cycling" ? 90 : 55) { some.append(d) }
            var list: [Int]
            switch rng.below(100) {
            case 0..<4: list = []
            case 4..<7:
                let d = rng.below(3)
                list = [d, d] + some.filter { $0 != d }
            case 7..<10: list = some + [rng.within(3, 4)]
            default:
                if free.isEmpty || rng.chance(8) {
                    let busy = (0..<3).filter { h.snapshotOf($0) != nil }
                    guard let b = busy.randomElement(using: &rng) else { return nil }
                    list = some + [b]
                } else {
                    list = some.isEmpty ? [free[rng.below(free.count)]] : some
                }
            }
            return .create(devs: shuffled(list))

        case .append:
            if !profile.undersized && rng.chance(9) {
                let r = rng.below(4)
                let snap = r == 0 ? staleSelector() : (h.live.isEmpty ? 0 : rng.below(h.live.count))
                let variants: [AppendVariant] = [.normal, .missingDevice, .pastEnd, .overlapping]
                return .append(snap: snap, pieces: [AppendPiece(sectors: UInt64(rng.within(0, 64)), gap: UInt64(rng.within(0, 4096)))],
                               variant: variants[r])
            }
            // Only snapshots that need space get more.
            // Undersized: at most about 40 chunks in all per snapshot.
            let needy = h.live.indices.filter {
                let s = h.live[$0]
                return profile.undersized ? s.capacity < 40 * 32 : s.capacity - min(s.capacity, s.filled) < 4096
            }
            guard let i = needy.randomElement(using: &rng) else { return nil }
            var pieces: [AppendPiece] = []
            for _ in 0..<rng.within(1, 3) {
                let sectors: Int
                if rng.chance(5) { sectors = 0 }
                else if profile.undersized { sectors = rng.within(1, 120) }
                else if rng.chance(15) { sectors = rng.within(1, 31) }
                else { sectors = rng.within(32, 2048) }
                pieces.append(AppendPiece(sectors: UInt64(sectors), gap: rng.chance(50) ? 0 : UInt64(rng.within(1, 7))))
            }
            return .append(snap: i, pieces: pieces, variant: .normal)

        case .take:
            let untaken = h.live.indices.filter { !h.live[$0].taken }
            let ready = untaken.filter { h.live[$0].capacity > 0 && !h.live[$0].devs.isEmpty }
            if let i = ready.randomElement(using: &rng), profile.undersized || rng.chance(85) { return .take(snap: i) }
            // Mostly pick something else when nothing is ready; sometimes go for the errors.
            if profile.undersized || rng.chance(70) { return nil }
            if let i = untaken.randomElement(using: &rng), rng.chance(50) { return .take(snap: i) }
            return .take(snap: rng.chance(70) && !h.live.isEmpty ? rng.below(h.live.count) : staleSelector())

        case .destroy:
            if profile.undersized {
                let corrupted = h.live.indices.filter { h.live[$0].corrupted }
                if let i = corrupted.randomElement(using: &rng) { return .destroy(snap: i) }
                guard !h.live.isEmpty, rng.chance(10) else { return nil }
                return .destroy(snap: rng.below(h.live.count))
            }
            if rng.chance(4) { return .destroy(snap: staleSelector()) }
            let taken = h.live.indices.filter { h.live[$0].taken }
            if let i = taken.randomElement(using: &rng), rng.chance(85) { return .destroy(snap: i) }
            guard !h.live.isEmpty, rng.chance(30) else { return nil }
            return .destroy(snap: rng.below(h.live.count))

        case .markDirty:
            let target: Int
            let dev: Int
            switch rng.below(100) {
            case 0..<3: return .markDirty(target: 3, ranges: [SectorRange(offset: 0, count: 8)])
            case 3..<6: return .markDirty(target: 5, ranges: [SectorRange(offset: 0, count: 8)])
            case 6..<40:
                let all = h.takenImages
                guard !all.isEmpty else { return nil }
                let i = rng.below(all.count)
                target = 100 + i
                dev = all[i].snapshot.devs[all[i].k]
            default:
                dev = rng.below(3)
                target = dev
            }
            let sectors = Geo.sizes[dev] >> 9
            var ranges: [SectorRange] = []
            for _ in 0..<rng.within(0, 3) {
                if rng.chance(5) {
                    ranges.append(SectorRange(offset: UInt64(Geo.blockCount(dev) * 8 + rng.below(100)), count: UInt64(rng.within(1, 8))))
                } else {
                    let o = rng.below(sectors)
                    ranges.append(SectorRange(offset: UInt64(o), count: UInt64(min(rng.within(0, 64), sectors - o))))
                }
            }
            return .markDirty(target: target, ranges: ranges)

        case .removeTracker:
            if rng.chance(3) { return .removeTracker(dev: 4) }
            // Trackers live long in some profiles: aim at an untracked device
            // now and then, so ENODATA is reached by design, not by luck.
            let untracked = (0..<3).filter { h.trackers[$0] == nil }
            if let d = untracked.randomElement(using: &rng), rng.chance(10) { return .removeTracker(dev: d) }
            let removable = (0..<3).filter { h.trackers[$0] != nil && h.snapshotOf($0) == nil }
            if let d = removable.randomElement(using: &rng), rng.chance(75) { return .removeTracker(dev: d) }
            return .removeTracker(dev: rng.below(3))

        case .readCbt:
            let dev = rng.chance(3) ? 4 : rng.below(3)
            let count = Geo.blockCount(min(dev, 2))
            let offset = rng.chance(70) ? 0 : rng.within(0, count + 16)
            let length = rng.chance(60) ? count : rng.within(0, count + 16)
            return .readCbt(dev: dev, offset: UInt32(offset), length: UInt32(length))

        case .waitEvent:
            if h.live.isEmpty || rng.chance(10) { return .waitEvent(snap: staleSelector()) }
            return .waitEvent(snap: rng.below(h.live.count))

        case .flush:
            return .flush(dev: rng.below(3))
        }
    }

    private mutating func shuffled(_ a: [Int]) -> [Int] { a.shuffled(using: &rng) }
}

// MARK: - running, replaying, shrinking

private struct Failure {
    var message: String
    var index: Int
}

private enum ModelRun {
    static let fullCheckInterval = 256

    /// Generates and runs `count` operations; the list so far and the first failure.
    static func generate(seed: UInt64, profile: Profile, count: Int, fault: ModelFault = .none)
        -> (ops: [ModelOp], failure: Failure?, stats: RunStats) {
        var ops: [ModelOp] = []
        ops.reserveCapacity(count)
        let h: Harness
        do { h = try Harness(seed: seed, fault: fault, faultRules: profile.faults) } catch {
            return ([], Failure(message: "rig: \(error)", index: 0), RunStats())
        }
        var g = Generator(seed: seed, profile: profile)
        for i in 0..<count {
            let op = g.next(h)
            ops.append(op)
            do {
                try h.run(op)
                if (i + 1) % fullCheckInterval == 0 { try h.fullCheck() }
            } catch {
                return (ops, Failure(message: "\(error)", index: i), h.stats)
            }
        }
        do { try h.fullCheck() } catch { return (ops, Failure(message: "\(error)", index: ops.count), h.stats) }
        return (ops, nil, h.stats)
    }

    /// Runs a list from scratch on a fresh rig; the first failure, if any.
    static func replay(seed: UInt64, ops: [ModelOp], fault: ModelFault = .none, faults: [FaultRule] = []) -> Failure? {
        let h: Harness
        do { h = try Harness(seed: seed, fault: fault, faultRules: faults) } catch { return Failure(message: "rig: \(error)", index: 0) }
        for (i, op) in ops.enumerated() {
            do {
                try h.run(op)
                if (i + 1) % fullCheckInterval == 0 { try h.fullCheck() }
            } catch {
                return Failure(message: "\(error)", index: i)
            }
        }
        do { try h.fullCheck() } catch { return Failure(message: "\(error)", index: ops.count) }
        return nil
    }

    /// Delta debugging: drop chunks of operations, halving the chunk size,
    /// keeping every removal after which the list still fails.
    static func shrink(seed: UInt64, ops start: [ModelOp], failure: Failure, fault: ModelFault = .none,
                       faults: [FaultRule] = [], budgetSeconds: Double = 120) -> (ops: [ModelOp], failure: Failure) {
        let deadline = monotonicNanoseconds() + UInt64(budgetSeconds * 1e9)
        var ops = Array(start.prefix(failure.index + 1))
        var last = failure
        if let f = replay(seed: seed, ops: ops, fault: fault, faults: faults) { last = f } else { ops = start }
        var chunk = max(ops.count / 2, 1)
        while true {
            var removed = false
            var i = 0
            while i < ops.count {
                if monotonicNanoseconds() > deadline { return (ops, last) }
                var candidate = ops
                candidate.removeSubrange(i..<min(i + chunk, ops.count))
                if let f = replay(seed: seed, ops: candidate, fault: fault, faults: faults) {
                    // Everything after the failing step is irrelevant.
                    ops = Array(candidate.prefix(f.index + 1))
                    last = f
                    removed = true
                } else {
                    i += chunk
                }
            }
            if chunk == 1 && !removed { break }
            if chunk > 1 { chunk = max(chunk / 2, 1) }
        }
        return (ops, last)
    }

    static func report(seed: UInt64, profile: String, ops: [ModelOp], failure: Failure) -> String {
        var s = "Model test failed: seed 0x\(String(seed, radix: 16)) (profile \(profile)), \(ops.count) operations:\n"
        s += "  \(failure.message) (at step \(failure.index))\n"
        s += "Replay with ModelRun.replay(seed: 0x\(String(seed, radix: 16)), ops: [\n"
        for op in ops { s += "    \(op),\n" }
        s += profile == "faulty" ? "], faults: Profile.faulty.faults)" : "])"
        return s
    }

    /// Generates, and on a failure shrinks and reports; the run's statistics.
    static func runSeed(_ seed: UInt64, profile: Profile, count: Int) -> RunStats {
        let (ops, failure, stats) = generate(seed: seed, profile: profile, count: count)
        if let failure {
            let (small, last) = shrink(seed: seed, ops: ops, failure: failure, faults: profile.faults)
            let text = report(seed: seed, profile: profile.name, ops: small, failure: last)
            print(text)
            Issue.record(Comment(rawValue: text))
        }
        return stats
    }
}

// MARK: - the tests

private let opsPerSeed = 10_000

@Suite struct ModelTests {
    @Test(arguments: [
        (UInt64(0x5EED_0001), 0),
        (UInt64(0xB10C_5A4F_2022), 1),
        (UInt64(0xC0DE_CAFE_F00D), 2),
    ])
    func engineAgreesWithTheModel(seed: UInt64, profileIndex: Int) {
        let profile = [Profile.mixed, .longTrackers, .cycling][profileIndex]
        let t0 = monotonicNanoseconds()
        let stats = ModelRun.runSeed(seed, profile: profile, count: opsPerSeed)
        print("model seed 0x\(String(seed, radix: 16)) \(profile.name): \(stats.ops) ops in "
              + "\((monotonicNanoseconds() - t0) / 1_000_000) ms; takes \(stats.takes), wraps \(stats.wraps), "
              + "image reads \(stats.imageReadsCompared) (+\(stats.imageReadsEIO) EIO), CBT reads \(stats.cbtReadsCompared), "
              + "corruptions \(stats.corruptions), skipped \(stats.skipped)")
        // The run must have reached what it is meant to test.
        #expect(stats.ops == opsPerSeed)
        #expect(stats.takes >= 100)
        #expect(stats.imageReadsCompared >= 500)
        #expect(stats.cbtReadsCompared >= 50)
        #expect(stats.saw("create", Errno_.EBUSY))
        #expect(stats.saw("take", Errno_.EALREADY))
        #expect(stats.saw("take", Errno_.EFAULT))
        #expect(stats.saw("readCbt", Errno_.EPERM))
        #expect(stats.saw("append", Errno_.EBUSY))
        if profile.name != "cycling" {
            #expect(stats.saw("removeTracker", Errno_.ENODATA))
            #expect(stats.saw("removeTracker", Errno_.EBUSY))
        }
        #expect(stats.saw("markDirty", 0))
        #expect(stats.saw("waitEvent", 0))
        if profile.name == "cycling" { #expect(stats.wraps >= 1, "the snap numbers never wrapped") }
    }

    @Test(arguments: [UInt64(0xDEAD_5A11), 0x5_0000_0F_5ACE, 0x0_11FF_0000_0001])
    func undersizedStorageCorruptsSnapshotsButNeverOriginals(seed: UInt64) {
        let t0 = monotonicNanoseconds()
        let stats = ModelRun.runSeed(seed, profile: .undersized, count: opsPerSeed)
        print("undersized seed 0x\(String(seed, radix: 16)): \(stats.ops) ops in "
              + "\((monotonicNanoseconds() - t0) / 1_000_000) ms; takes \(stats.takes), corruptions \(stats.corruptions), "
              + "image reads \(stats.imageReadsCompared) (+\(stats.imageReadsEIO) EIO)")
        #expect(stats.ops == opsPerSeed)
        #expect(stats.corruptions >= 20)
        #expect(stats.imageReadsEIO >= 20)
        #expect(stats.saw("imageWrite", Errno_.EIO))
        #expect(stats.saw("destroy", 0))
    }

    /// The disks beneath the engine fail: no write is lost or wrongly
    /// acknowledged, corruption is reported once per device, and snapshots
    /// go on being taken and destroyed.
    @Test(arguments: [UInt64(0xFA17_0001), 0xFA17_5EED_0002, 0xFA17_D15C_0003])
    func faultsAreReportedAndNothingAcknowledgedIsLost(seed: UInt64) {
        let t0 = monotonicNanoseconds()
        let stats = ModelRun.runSeed(seed, profile: .faulty, count: opsPerSeed)
        let injected = stats.faults.values.reduce(0, +)
        let table = stats.faults.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
        print("faulty seed 0x\(String(seed, radix: 16)): \(stats.ops) ops in \((monotonicNanoseconds() - t0) / 1_000_000) ms; "
              + "\(injected) faults injected (\(table)); failed writes \(stats.failedWrites), "
              + "corruptions \(stats.corruptions) (\(stats.faultCorruptions) by faults), takes \(stats.takes), "
              + "image reads \(stats.imageReadsCompared) (+\(stats.imageReadsEIO) EIO), "
              + "flush EIO/ENOSPC \((stats.errnos["flush EIO"] ?? 0) + (stats.errnos["flush ENOSPC"] ?? 0))")
        #expect(stats.ops == opsPerSeed)
        #expect(injected >= 100)
        #expect(stats.failedWrites >= 20)
        #expect(stats.faultCorruptions >= 5)
        #expect(stats.takes >= 100)
        #expect(stats.imageReadsCompared >= 300)
        #expect(stats.saw("write", Errno_.EIO) && stats.saw("write", Errno_.ENOSPC))
        #expect(stats.saw("flush", Errno_.EIO) || stats.saw("flush", Errno_.ENOSPC))
        #expect(stats.saw("imageRead", Errno_.EIO), "no image read met a fault")
        #expect(stats.saw("destroy", 0))
    }

    /// A model that takes a failed write for a landed one is caught by the
    /// first such write, and the list shrinks to little more than it.
    @Test func harnessCatchesAWriteThatFailedUnnoticed() {
        let seed: UInt64 = 0xFA17_0001
        let wrong = ModelFault.failedWritesLookAcknowledged
        let (ops, failure, _) = ModelRun.generate(seed: seed, profile: .faulty, count: 3000, fault: wrong)
        guard let failure else {
            Issue.record("a model that ignores failed writes went unnoticed")
            return
        }
        let faults = Profile.faulty.faults
        let (small, last) = ModelRun.shrink(seed: seed, ops: ops, failure: failure, fault: wrong, faults: faults,
                                            budgetSeconds: 30)
        let text = ModelRun.report(seed: seed, profile: "faulty", ops: small, failure: last)
        print("(expected) shrunk from \(ops.count) steps: " + text)
        #expect(ModelRun.replay(seed: seed, ops: small, fault: wrong, faults: faults) != nil)
        #expect(ModelRun.replay(seed: seed, ops: small, faults: faults) == nil, "the shrunk list fails with the right model too")
        #expect(small.count <= 3, "\(text)")
        if case .write = small.last {} else if case .discard = small.last {} else {
            Issue.record("the shrunk list does not end in the failing write: \(text)")
        }
    }

    /// Opt-in soak: `BLKSNAP_MODEL_SOAK=<seeds>` runs that many more seeds
    /// (numbered from 1) through every profile.
    @Test(.enabled(if: getenv("BLKSNAP_MODEL_SOAK") != nil))
    func soak() {
        let seeds = Int(String(cString: getenv("BLKSNAP_MODEL_SOAK")!)) ?? 10
        for seed in 1...UInt64(max(seeds, 1)) {
            for profile in [Profile.mixed, .longTrackers, .cycling, .undersized, .faulty] {
                let stats = ModelRun.runSeed(seed, profile: profile, count: opsPerSeed)
                if stats.ops < opsPerSeed { return }
            }
        }
    }

    /// The harness itself: a model that forgets one rule must be caught,
    /// and shrunk to the few steps that show it, with faults on the disks
    /// too (each kept step meets the faults it met in the long run).
    @Test(arguments: [0, 1])
    func harnessCatchesAndShrinksAWrongModel(profileIndex: Int) {
        let seed: UInt64 = 0x5EED_0001
        let profile = [Profile.mixed, .faulty][profileIndex]
        let (ops, failure, _) = ModelRun.generate(seed: seed, profile: profile, count: 3000, fault: .imageWritesLeaveReadMap)
        guard let failure else {
            Issue.record("a model that ignores the read map on image writes went unnoticed")
            return
        }
        let (small, last) = ModelRun.shrink(seed: seed, ops: ops, failure: failure, fault: .imageWritesLeaveReadMap,
                                            faults: profile.faults, budgetSeconds: 30)
        #expect(ModelRun.replay(seed: seed, ops: small, fault: .imageWritesLeaveReadMap, faults: profile.faults) != nil)
        #expect(ModelRun.replay(seed: seed, ops: small, faults: profile.faults) == nil,
                "the shrunk list fails with the right model too")
        // create, append, take, and one image write over a block the
        // previous epoch did not write: at least four steps.
        let text = ModelRun.report(seed: seed, profile: profile.name, ops: small, failure: last)
        print("(expected) shrunk from \(ops.count) steps: " + text)
        #expect(small.count >= 4 && small.count <= 8, "\(text)")
    }
}
