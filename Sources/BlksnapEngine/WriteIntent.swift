import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// The write-intent record of one tracked device, in the spirit of md's
/// write-intent bitmap: a file with one byte per region of the device.
///
/// Before the first write to a region since the record was last synced is
/// acknowledged, the region's byte is written and the file fdatasync'd, so
/// after a crash (kill -9, power loss) every region that may hold a write
/// the saved CBT table lacks is marked; the restored map counts each marked
/// region as written. A region already marked costs one lock and one byte
/// load per write, which is what keeps the record cheap. Writers that mark
/// new regions at once share one fdatasync (`GroupFlush`): each waits,
/// outside the lock, for a flush that began after its byte was written,
/// and a writer that finds a region marked but not yet flushed waits for
/// the same flush. A write may copy on write while its flush runs
/// (`begin`, then `finish` before the original is written).
///
/// Regions are cleared lazily by `CbtStore.save`: `beginSync` forgets the
/// marks in memory (later writes mark again), the CBT table is copied and
/// saved, then `finishSync` rewrites the file with only the marks made
/// since `beginSync`. Since `CbtMap.set` marks the map before it calls
/// `mark`, a write the saved copy lacks marked its region after
/// `beginSync`, so its mark survives `finishSync`. Each byte of the file
/// only ever goes from its old value to its new one, and the old marks are
/// a superset of the new, so a crash halfway through `finishSync` leaves a
/// superset too.
///
/// Layout: a 4096-byte header (magic, region shift, region count, a
/// CRC-32C of those), then `regionCount` bytes, 1 for marked.
/// `lock` guards `marked`, `pending` and every write to the file.
public final class WriteIntent: @unchecked Sendable {
    public let path: String
    public let regionShift: Int
    public let regionCount: Int
    private let lock = Lock()
    private let marked: UnsafeMutableBufferPointer<UInt8>
    private var fd: Int32
    private var _isBroken = false
    private var _syncs = 0
    /// Regions whose byte is written but maybe not yet flushed (`marked`
    /// holds `unflushed` for them), with the flush that makes it durable.
    private var pending: [Int: UInt64] = [:]
    private let flusher: GroupFlush
    private static let flushed: UInt8 = 1, unflushed: UInt8 = 2

    static let magic: [UInt8] = Array("BSWINT01".utf8)
    static let headerSize = 4096

    /// Regions of at least 1 MiB, and never smaller than a tracking block,
    /// so the record is at most one byte per tracking block.
    public static func regionShift(blockShift: Int) -> Int { max(20, blockShift) }

    private init(path: String, fd: Int32, regionShift: Int, regionCount: Int) {
        (self.path, self.fd, self.regionShift, self.regionCount) = (path, fd, regionShift, regionCount)
        marked = .allocate(capacity: max(regionCount, 1))
        marked.initialize(repeating: 0)
        // A descriptor of its own: `close` may end `fd` while a flush runs.
        let syncFd = dup(fd)
        flusher = GroupFlush { fdatasync(syncFd) == 0 ? 0 : errno }
        self.syncFd = syncFd
    }

    private let syncFd: Int32

    deinit {
        close()
        if syncFd >= 0 { Glibc.close(syncFd) }
        marked.deallocate()
    }

    /// A new record with nothing marked, replacing any file at `path`
    /// (written aside, fsync'd and renamed, so a crash leaves one or the other).
    public static func create(path: String, regionShift: Int, capacity: UInt64) throws(BlksnapError) -> WriteIntent {
        let count = Int((capacity + (1 << UInt64(regionShift)) - 1) >> UInt64(regionShift))
        var bytes = header(regionShift: regionShift, regionCount: count)
        bytes += [UInt8](repeating: 0, count: count)
        try DurableFile.replace(path, with: bytes)
        let fd = open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw BlksnapError(Errno(rawValue: errno), "cannot open \(path)") }
        return WriteIntent(path: path, fd: fd, regionShift: regionShift, regionCount: count)
    }

    /// The regions an existing record marks, checked against the geometry
    /// the device has now; an error says why the record cannot be used.
    public static func markedRegions(path: String, regionShift: Int, capacity: UInt64) throws(BlksnapError) -> [Int] {
        let count = Int((capacity + (1 << UInt64(regionShift)) - 1) >> UInt64(regionShift))
        let bytes = try DurableFile.read(path, atMost: headerSize + count + 1)
        guard bytes.count >= headerSize, Array(bytes[0..<headerSize]) == header(regionShift: regionShift, regionCount: count) else {
            throw BlksnapError(.invalidArgument, "\(path) is not a write-intent record of this device's geometry")
        }
        guard bytes.count == headerSize + count else {
            throw BlksnapError(.invalidArgument, "\(path) holds \(bytes.count - headerSize) regions, not \(count)")
        }
        return (0..<count).filter { bytes[headerSize + $0] != 0 }
    }

    static func header(regionShift: Int, regionCount: Int) -> [UInt8] {
        var h = ByteWriter()
        h.append(magic)
        h.append(UInt32(regionShift))
        h.append(UInt64(regionCount))
        h.append(CRC32C.checksum(h.bytes))
        return h.bytes + [UInt8](repeating: 0, count: headerSize - h.bytes.count)
    }

    /// Whether a mark could not be made durable: then a crash could lose a
    /// write, so `CbtStore` keeps no state that a crash would restore.
    public var isBroken: Bool { lock.withLock { _isBroken } }

    /// How many marks reached the disk (for tests and benchmarks).
    public var syncCount: Int { lock.withLock { _syncs } }

    /// A range marked and its flush asked for; durable once `finish`
    /// returns.
    struct Pending {
        let record: WriteIntent
        let ticket: UInt64
        let regions: ClosedRange<Int>
        func finish() { record.finish(self) }
    }

    /// Called by `CbtMap` after it marks a range, before the write goes on;
    /// returns once the range's marks are on the disk.
    func mark(offset: UInt64, length: UInt64) {
        begin(offset: offset, length: length)?.finish()
    }

    /// Marks a range and asks for the flush that makes the marks durable,
    /// without waiting for it: nil where every region was durable already.
    /// The write must wait for `finish` before it lands.
    func begin(offset: UInt64, length: UInt64) -> Pending? {
        guard length > 0 else { return nil }
        let first = Int(offset >> UInt64(regionShift))
        let last = min(Int((offset + length - 1) >> UInt64(regionShift)), regionCount - 1)
        guard first <= last else { return nil }
        lock.lock()
        defer { lock.unlock() }
        var ticket: UInt64 = 0
        var missing = false
        for r in first...last {
            switch marked[r] {
            case 0:
                marked[r] = Self.unflushed
                missing = true
            case Self.unflushed:
                ticket = max(ticket, pending[r] ?? 0)
            default:
                break
            }
        }
        guard fd >= 0, missing || ticket > 0 else { return nil }
        if missing {
            let one: [UInt8] = marked[first...last].map { $0 == 0 ? 0 : 1 }
            let written = one.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(Self.headerSize + first)) }
            if written != one.count { _isBroken = true }
            let mine = flusher.ticket()
            for r in first...last where marked[r] == Self.unflushed && pending[r] == nil { pending[r] = mine }
            ticket = max(ticket, mine)
            _syncs += 1
        }
        return Pending(record: self, ticket: ticket, regions: first...last)
    }

    /// Returns once the marks `begin` made or found unflushed are durable.
    private func finish(_ p: Pending) {
        let failed = flusher.wait(for: p.ticket) != 0
        lock.withLock {
            if failed { _isBroken = true }
            for r in p.regions where marked[r] == Self.unflushed {
                if let t = pending[r], flusher.isDone(t) {
                    marked[r] = Self.flushed
                    pending[r] = nil
                }
            }
        }
    }

    /// A save is about to copy the CBT map: marks made from now on are
    /// written to the file again.
    func beginSync() {
        lock.withLock {
            marked.update(repeating: 0)
            pending.removeAll(keepingCapacity: true)
        }
    }

    /// The saved map holds every write marked before `beginSync`: the file
    /// keeps only the marks made since.
    func finishSync() throws(BlksnapError) {
        try lock.withLock { () throws(BlksnapError) in
            guard fd >= 0 else { return }
            let bytes: [UInt8] = marked.map { $0 == 0 ? 0 : 1 }
            let n = pwrite(fd, bytes, regionCount, off_t(Self.headerSize))
            guard n == regionCount, fdatasync(fd) == 0 else {
                _isBroken = true
                throw BlksnapError(Errno(rawValue: errno), "cannot clear the write-intent record \(path)")
            }
        }
    }

    /// How many regions are marked in memory.
    public var markedCount: Int { lock.withLock { marked.reduce(0) { $0 + ($1 == 0 ? 0 : 1) } } }

    public func close() {
        flusher.stop()
        lock.withLock {
            if fd >= 0 { Glibc.close(fd) }
            fd = -1
        }
    }
}
