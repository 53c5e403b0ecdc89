import BlksnapABI
@testable import BlksnapEngine
import BlksnapTestSupport
import Dispatch
import Logging
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

// Threads against the engine: writers on originals, readers and a writer on
// images, and TAKE in the middle of a stream of writes. Every write fills
// whole 512-byte sectors with a stamp (writer, device, sequence, sector), so
// a torn or misplaced sector, or one written after TAKE, is recognisable.
// Every run is bounded: a hang fails the test instead of hanging it.

// MARK: - stamps

private enum Stamp {
    static let initialWriter: UInt64 = 0xFF
    static let imageWriter: UInt64 = 0x64

    /// writer (8 bits) | device (4) | sequence (32) | sector (20)
    static func word(writer: UInt64, device: UInt64, seq: UInt64, sector: UInt64) -> UInt64 {
        (writer << 56) | ((device & 0xF) << 52) | ((seq & 0xFFFF_FFFF) << 20) | (sector & 0xF_FFFF)
    }

    struct Decoded: Equatable {
        var writer: UInt64
        var device: UInt64
        var seq: UInt64
        var sector: UInt64
    }

    static func decode(_ w: UInt64) -> Decoded {
        Decoded(writer: w >> 56, device: (w >> 52) & 0xF, seq: (w >> 20) & 0xFFFF_FFFF, sector: w & 0xF_FFFF)
    }

    /// Fills `count` sectors, the first numbered `first`, with one stamp each.
    static func fill(_ buffer: UnsafeMutableRawBufferPointer, first: Int, count: Int,
                     writer: UInt64, device: UInt64, seq: UInt64) {
        for s in 0..<count {
            let w = word(writer: writer, device: device, seq: seq, sector: UInt64(first + s))
            for i in 0..<64 { buffer.storeBytes(of: w, toByteOffset: (s * 64 + i) * 8, as: UInt64.self) }
        }
    }

    /// The pattern a device holds before anything else is written to it.
    static func initial(sectors: Int, device: UInt64) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: sectors * 512)
        bytes.withUnsafeMutableBytes { fill($0, first: 0, count: sectors, writer: initialWriter, device: device, seq: 0) }
        return bytes
    }

    /// The one stamp of a sector of `bytes`, or nil when the sector is torn.
    static func whole(_ bytes: UnsafeRawBufferPointer, sector: Int) -> Decoded? {
        let base = sector * 512
        let first = bytes.load(fromByteOffset: base, as: UInt64.self)
        for i in 1..<64 where bytes.load(fromByteOffset: base + i * 8, as: UInt64.self) != first { return nil }
        return decode(first)
    }
}

// MARK: - a disk whose writes are atomic

/// A memory disk on which each I/O holds the locks of the 4 KiB pages it
/// touches (taken in ascending order), so overlapping writes from two
/// threads land one after the other, as sectors do on a real disk; plain
/// `MemoryBlockDevice` would let two memcpys interleave. The locks are
/// leaves: nothing else is taken while they are held.
private final class AtomicWriteDevice: BlockDevice, @unchecked Sendable {
    let size: UInt64
    private let inner: MemoryBlockDevice
    private let locks: [Lock]

    init(size: UInt64) {
        self.size = size
        inner = MemoryBlockDevice(size: size)
        locks = (0..<Int((size + 4095) >> 12)).map { _ in Lock() }
    }

    private func locked<T>(_ offset: UInt64, _ count: Int, _ body: () throws(BlksnapError) -> T) throws(BlksnapError) -> T {
        guard count > 0, offset < size else { return try body() }
        let first = Int(offset >> 12)
        let last = Int(min(offset + UInt64(count) - 1, size - 1) >> 12)
        for i in first...last { locks[i].lock() }
        defer { for i in first...last { locks[i].unlock() } }
        return try body()
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        try locked(offset, buffer.count) { () throws(BlksnapError) in try inner.read(into: buffer, at: offset) }
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        try locked(offset, buffer.count) { () throws(BlksnapError) in try inner.write(buffer, at: offset) }
    }

    func flush() throws(BlksnapError) {}

    func discard(at offset: UInt64, length: UInt64) throws(BlksnapError) {
        try locked(offset, Int(length)) { () throws(BlksnapError) in try inner.discard(at: offset, length: length) }
    }
}

// MARK: - plumbing


/// A plain thread; `group` is left when it ends.
private func startThread(_ group: DispatchGroup, _ body: @escaping @Sendable () -> Void) {
    group.enter()
    BlksnapEngine.startThread { body(); group.leave() }
}

/// An atomic counter that threads share.
private final class SharedInt: Sendable {
    let atomic: Atomic<Int>
    init(_ value: Int) { atomic = Atomic(value) }
    func load() -> Int { atomic.load(ordering: .sequentiallyConsistent) }
    func store(_ value: Int) { atomic.store(value, ordering: .sequentiallyConsistent) }
}

/// An atomic flag that threads share.
private final class SharedFlag: Sendable {
    let atomic = Atomic<Bool>(false)
    func load() -> Bool { atomic.load(ordering: .sequentiallyConsistent) }
    func store(_ value: Bool) { atomic.store(value, ordering: .sequentiallyConsistent) }
}

/// Equal bytes, or where they first differ.
private func difference(_ a: [UInt8], _ b: [UInt8]) -> String? {
    let same = a.count == b.count && a.withUnsafeBytes { pa in b.withUnsafeBytes { pb in memcmp(pa.baseAddress!, pb.baseAddress!, a.count) == 0 } }
    if same { return nil }
    if a.count != b.count { return "lengths \(a.count) and \(b.count)" }
    let i = (0..<a.count).first { a[$0] != b[$0] }!
    return "first difference at byte \(i): \(a[i]) vs \(b[i])"
}

/// What threads report back: failures (the first few kept) and counters.
private final class Reports: @unchecked Sendable {
    private let lock = Lock()
    private var _failures: [String] = []
    private var _failureCount = 0

    func fail(_ message: String) {
        lock.withLock {
            _failureCount += 1
            if _failures.count < 5 { _failures.append(message) }
        }
    }

    var failures: [String] { lock.withLock { _failures } }
    var failureCount: Int { lock.withLock { _failureCount } }
}

/// A value one thread fills in and others read after it is done.
private final class Slot<T>: @unchecked Sendable {
    private let lock = Lock()
    private var _value: T
    init(_ value: T) { _value = value }
    var value: T {
        get { lock.withLock { _value } }
        set { lock.withLock { _value = newValue } }
    }
}

private struct Bench {
    let engine: Engine
    let devices: [RoutedDevice]
    let backings: [AtomicWriteDevice]

    init(deviceSizes: [Int], logger given: Logger? = nil) throws {
        let host = FakeHost()
        host.disks[Rig.storageId] = MemoryBlockDevice(size: 32 << 20)
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        engine = Engine(settings: Rig.smallSettings, host: host, logger: given ?? logger)
        var ds: [RoutedDevice] = []
        var bs: [AtomicWriteDevice] = []
        for (i, size) in deviceSizes.enumerated() {
            let b = AtomicWriteDevice(size: UInt64(size))
            ds.append(try engine.route(DevId(major: 7, minor: UInt32(i)), backing: b))
            bs.append(b)
        }
        devices = ds
        backings = bs
    }
}

/// Holds the first thread that logs "is corrupted" until released: the
/// snapshot logs that line while it marks itself corrupted, so this stands
/// for that thread being preempted right there.
private final class CorruptionPause: @unchecked Sendable {
    let reached = DispatchSemaphore(value: 0)
    let release = DispatchSemaphore(value: 0)
    let paused = Atomic<Bool>(false)

    func log(_ message: String) {
        guard message.contains("is corrupted"), !paused.exchange(true, ordering: .sequentiallyConsistent) else { return }
        reached.signal()
        _ = release.wait(timeout: .now() + .seconds(10))
    }
}

private struct PausingLogHandler: LogHandler {
    let pause: CorruptionPause
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .error
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(event: LogEvent) { pause.log(event.message.description) }
}

private let hangLimitSeconds = 30

private func nowNs() -> Int { Int(monotonicNanoseconds()) }

// MARK: - the tests

@Suite struct ConcurrencyTests {
    /// Four writers hammer one original (a hot region they all share, and
    /// chunk-spanning writes anywhere), one thread writes through the image,
    /// two threads read the image. Image reads only ever see the content at
    /// TAKE (or the image writer's own sectors), the original ends with
    /// every sector whole and each writer's last write to it, and the CBT
    /// maps say exactly which blocks were written.
    @Test func writersAndImageReadersSeeOnlyWholeSectorsAndThePointInTime() throws {
        let size = 1 << 20
        let sectors = size >> 9
        let writers = 4
        let writesPerWriter = 1500
        let imageRegion = (sectors - 128)..<sectors          // last 64 KiB: the image writer's
        let hotSectors = 128                                  // first 64 KiB: four chunks all writers share

        let bench = try Bench(deviceSizes: [size])
        let dev = bench.devices[0]
        let initial = Stamp.initial(sectors: sectors, device: 0)
        try dev.writeBytes(initial, at: 0)
        let id = try bench.engine.createSnapshot([dev.devId])
        try bench.engine.appendStorage(id, device: Rig.storageId, ranges: [SectorRange(offset: 0, count: 16384)])
        try bench.engine.takeSnapshot(id)
        let image = try #require(bench.engine.snapshot(id)?.images.first)

        let reports = Reports()
        let lastWrite = (0..<writers).map { _ in Slot([Int32](repeating: -1, count: sectors)) }
        let imageLast = Slot([Int32](repeating: -1, count: sectors))
        let writersLeft = SharedInt(writers + 1)
        let readsDone = SharedInt(0)
        let group = DispatchGroup()

        for w in 0..<writers {
            startThread(group) {
                var rng = SplitMix64(seed: 0xA11CE + UInt64(w))
                var last = [Int32](repeating: -1, count: sectors)
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 512, alignment: 8)
                defer { buffer.deallocate() }
                for seq in 0..<writesPerWriter {
                    let first: Int
                    let count: Int
                    if rng.below(2) == 0 {
                        first = rng.below(hotSectors)
                        count = min(rng.within(1, 16), hotSectors - first)
                    } else {
                        first = rng.below(sectors)
                        count = min(rng.within(1, 64), sectors - first)
                    }
                    Stamp.fill(buffer, first: first, count: count, writer: UInt64(w), device: 0, seq: UInt64(seq))
                    do {
                        try dev.write(UnsafeRawBufferPointer(rebasing: buffer[0..<(count * 512)]), at: UInt64(first * 512))
                    } catch {
                        reports.fail("writer \(w): write \(first)+\(count) failed: \(error)")
                        continue
                    }
                    for s in first..<(first + count) { last[s] = Int32(seq) }
                }
                lastWrite[w].value = last
                writersLeft.atomic.subtract(1, ordering: .sequentiallyConsistent)
            }
        }

        // The image writer: its own region of the image, read back at once.
        startThread(group) {
            var rng = SplitMix64(seed: 0x1A6E)
            var last = [Int32](repeating: -1, count: sectors)
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 32 * 512, alignment: 8)
            let back = UnsafeMutableRawBufferPointer.allocate(byteCount: 32 * 512, alignment: 8)
            defer { buffer.deallocate(); back.deallocate() }
            for seq in 0..<400 {
                let first = rng.within(imageRegion.lowerBound, imageRegion.upperBound - 1)
                let count = min(rng.within(1, 32), imageRegion.upperBound - first)
                let n = count * 512
                Stamp.fill(buffer, first: first, count: count, writer: Stamp.imageWriter, device: 0, seq: UInt64(seq))
                do {
                    try image.write(UnsafeRawBufferPointer(rebasing: buffer[0..<n]), at: UInt64(first * 512))
                    try image.read(into: UnsafeMutableRawBufferPointer(rebasing: back[0..<n]), at: UInt64(first * 512))
                } catch {
                    reports.fail("image writer: \(first)+\(count) failed: \(error)")
                    continue
                }
                if memcmp(buffer.baseAddress!, back.baseAddress!, n) != 0 {
                    reports.fail("image writer: read back \(first)+\(count) differs from what it wrote")
                }
                for s in first..<(first + count) { last[s] = Int32(seq) }
            }
            imageLast.value = last
            writersLeft.atomic.subtract(1, ordering: .sequentiallyConsistent)
        }

        // Image readers, outside the image writer's region, until every writer is done.
        let readable = imageRegion.lowerBound * 512
        for r in 0..<2 {
            startThread(group) {
                var rng = SplitMix64(seed: 0x8EAD + UInt64(r))
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 << 10, alignment: 8)
                defer { buffer.deallocate() }
                var reads = 0
                while writersLeft.load() > 0 || reads < 200 {
                    let offset = rng.below(readable)
                    let n = min(rng.within(1, 64 << 10), readable - offset)
                    let piece = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n])
                    do {
                        try image.read(into: piece, at: UInt64(offset))
                    } catch {
                        reports.fail("reader \(r): image read \(offset)+\(n) failed: \(error)")
                        continue
                    }
                    let same = initial.withUnsafeBytes { memcmp(piece.baseAddress!, $0.baseAddress! + offset, n) == 0 }
                    if !same { reports.fail("reader \(r): image read \(offset)+\(n) is not the content at TAKE") }
                    reads += 1
                }
                readsDone.atomic.add(reads, ordering: .sequentiallyConsistent)
            }
        }

        guard group.wait(timeout: .now() + .seconds(hangLimitSeconds)) == .success else {
            Issue.record("threads still running after \(hangLimitSeconds) s: deadlock or livelock")
            return
        }
        #expect(reports.failureCount == 0, "\(reports.failures)")
        #expect(readsDone.load() >= 400)
        print("writers and image readers: \(readsDone.load()) image reads compared")

        // The original: every sector one whole stamp, each writer's last write to it.
        let last = lastWrite.map(\.value)
        let original = try dev.readBytes(at: 0, count: size)
        var bad: [String] = []
        original.withUnsafeBytes { raw in
            for s in 0..<sectors {
                guard let d = Stamp.whole(raw, sector: s), d.sector == UInt64(s) else {
                    bad.append("original sector \(s) is torn or misplaced")
                    continue
                }
                if d.writer == Stamp.initialWriter {
                    if last.contains(where: { $0[s] >= 0 }) { bad.append("original sector \(s) lost every write to it") }
                } else if d.writer >= UInt64(writers) || last[Int(d.writer)][s] != Int32(d.seq) {
                    bad.append("original sector \(s) holds \(d), not a writer's last write")
                }
            }
        }
        #expect(bad.isEmpty, "\(bad.prefix(5)) (\(bad.count) sectors)")

        // The image: the content at TAKE, plus the image writer's last writes.
        let imageBytes = try image.readBytes(at: 0, count: size)
        let imageLastWrite = imageLast.value
        bad = []
        imageBytes.withUnsafeBytes { raw in
            for s in 0..<sectors {
                guard let d = Stamp.whole(raw, sector: s), d.sector == UInt64(s) else {
                    bad.append("image sector \(s) is torn or misplaced")
                    continue
                }
                let want = imageLastWrite[s] >= 0 ? (Stamp.imageWriter, UInt64(imageLastWrite[s])) : (Stamp.initialWriter, 0)
                if d.writer != want.0 || d.seq != want.1 { bad.append("image sector \(s) holds \(d), expected \(want)") }
            }
        }
        #expect(bad.isEmpty, "\(bad.prefix(5)) (\(bad.count) sectors)")

        // CBT: written blocks hold 2 (the snap number after TAKE); the image
        // writer's blocks also hold 1 (the previous number) in the read map.
        let tracker = try #require(bench.engine.tracker(dev.devId))
        let (readMap, writeMap) = tracker.cbtMap.tables()
        var wantWrite = [UInt8](repeating: 0, count: size >> 12)
        var wantRead = [UInt8](repeating: 0, count: size >> 12)
        for s in 0..<sectors where last.contains(where: { $0[s] >= 0 }) || imageLastWrite[s] >= 0 { wantWrite[s >> 3] = 2 }
        for s in 0..<sectors where imageLastWrite[s] >= 0 { wantRead[s >> 3] = 1 }
        #expect(difference(writeMap, wantWrite) == nil, "write map: \(difference(writeMap, wantWrite) ?? "")")
        #expect(difference(readMap, wantRead) == nil, "read map: \(difference(readMap, wantRead) ?? "")")
        #expect(bench.engine.snapshot(id)?.isCorrupted == false)
    }

    /// TAKE while writers run, over two devices: each writer owns a region
    /// on both, logs its writes in order, and publishes how many it started
    /// and how many returned. The images must be exactly the devices after
    /// some prefix of each writer's writes (the same prefix on both
    /// devices), a prefix holding at least every write acknowledged before
    /// TAKE was called and nothing started after it returned; the CBT read
    /// maps must mark exactly the blocks of that prefix.
    @Test(arguments: 0..<4)
    func takeDuringWritesCapturesOneInstantOfAllDevices(round: Int) throws {
        let size = 1 << 20
        let sectors = size >> 9
        let writers = 4
        let regionSectors = sectors / writers
        let bench = try Bench(deviceSizes: [size, size])
        let initial = (0..<2).map { Stamp.initial(sectors: sectors, device: UInt64($0)) }
        for d in 0..<2 { try bench.devices[d].writeBytes(initial[d], at: 0) }
        let id = try bench.engine.createSnapshot(bench.devices.map(\.devId))
        try bench.engine.appendStorage(id, device: Rig.storageId, ranges: [SectorRange(offset: 8, count: 16384)])

        struct Logged { var device: Int; var first: Int; var count: Int }
        let writeCap = 20000
        let started = (0..<writers).map { _ in SharedInt(0) }
        let completed = (0..<writers).map { _ in SharedInt(0) }
        let logs = (0..<writers).map { _ in Slot<[Logged]>([]) }
        let stop = SharedFlag()
        let cut = Slot<(before: [Int], after: [Int])?>(nil)
        let reports = Reports()
        let group = DispatchGroup()

        for w in 0..<writers {
            startThread(group) {
                var rng = SplitMix64(seed: 0x7A4E + UInt64(round * 16 + w))
                var log: [Logged] = []
                log.reserveCapacity(8192)
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 48 * 512, alignment: 8)
                defer { buffer.deallocate() }
                let regionStart = w * regionSectors
                while !stop.load() && log.count < writeCap {
                    let seq = log.count
                    let device = rng.below(2)
                    let first = regionStart + rng.below(regionSectors)
                    let count = min(rng.within(1, 48), regionStart + regionSectors - first)
                    Stamp.fill(buffer, first: first, count: count, writer: UInt64(w), device: UInt64(device), seq: UInt64(seq))
                    log.append(Logged(device: device, first: first, count: count))
                    started[w].store(seq + 1)
                    do {
                        try bench.devices[device].write(UnsafeRawBufferPointer(rebasing: buffer[0..<(count * 512)]),
                                                        at: UInt64(first * 512))
                    } catch {
                        reports.fail("writer \(w): write failed: \(error)")
                    }
                    completed[w].store(seq + 1)
                }
                logs[w].value = log
            }
        }

        // The coordinator: TAKE once every writer is well under way, then
        // let them write as much again before stopping them.
        startThread(group) {
            let deadline = monotonicNanoseconds() + 20_000_000_000
            func waitFor(_ condition: () -> Bool) -> Bool {
                while !condition() {
                    if monotonicNanoseconds() > deadline { return false }
                    usleep(200)
                }
                return true
            }
            guard waitFor({ completed.allSatisfy { $0.load() >= 150 + 50 * round } }) else {
                reports.fail("writers never got going")
                stop.store(true)
                return
            }
            let before = completed.map { $0.load() }
            do {
                try bench.engine.takeSnapshot(id)
            } catch {
                reports.fail("TAKE failed: \(error)")
            }
            let after = started.map { $0.load() }
            cut.value = (before, after)
            if !waitFor({ zip(completed, after).allSatisfy { min($0.0.load(), writeCap) >= min($0.1 + 300, writeCap) } }) {
                reports.fail("writers stalled after TAKE")
            }
            stop.store(true)
        }

        guard group.wait(timeout: .now() + .seconds(hangLimitSeconds)) == .success else {
            stop.store(true)
            Issue.record("threads still running after \(hangLimitSeconds) s: deadlock or livelock")
            return
        }
        #expect(reports.failureCount == 0, "\(reports.failures)")
        let (before, after) = try #require(cut.value)
        let log = logs.map(\.value)
        let snapshot = try #require(bench.engine.snapshot(id))
        #expect(!snapshot.isCorrupted)
        let images = try (0..<2).map { d in try snapshot.images[d].readBytes(at: 0, count: size) }

        // Each writer's prefix: one past the newest write of it the images show.
        var prefix = [Int](repeating: 0, count: writers)
        var bad: [String] = []
        for d in 0..<2 {
            images[d].withUnsafeBytes { raw in
                for s in 0..<sectors {
                    let owner = s / regionSectors
                    guard let st = Stamp.whole(raw, sector: s), st.sector == UInt64(s), st.device == UInt64(d) else {
                        bad.append("image \(d) sector \(s) is torn or misplaced")
                        continue
                    }
                    if st.writer == Stamp.initialWriter { continue }
                    guard st.writer == UInt64(owner) else {
                        bad.append("image \(d) sector \(s) holds a stamp of writer \(st.writer)")
                        continue
                    }
                    prefix[owner] = max(prefix[owner], Int(st.seq) + 1)
                }
            }
        }
        #expect(bad.isEmpty, "\(bad.prefix(5))")
        print("take round \(round): acknowledged before TAKE \(before), in the images \(prefix), "
              + "started by its return \(after), written in all \(log.map(\.count))")
        for w in 0..<writers {
            #expect(prefix[w] >= before[w], "writer \(w): a write acknowledged before TAKE (\(before[w])) is missing from the images (prefix \(prefix[w]))")
            #expect(prefix[w] <= after[w], "writer \(w): a write started after TAKE returned (\(after[w])) shows in the images (prefix \(prefix[w]))")
        }

        // The images and maps are exactly that prefix; the originals, everything.
        var atTake = initial
        var final = initial
        var readWant = [[UInt8]](repeating: [UInt8](repeating: 0, count: size >> 12), count: 2)
        var writeWant = readWant
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 48 * 512, alignment: 8)
        defer { buffer.deallocate() }
        for w in 0..<writers {
            for (seq, l) in log[w].enumerated() {
                Stamp.fill(buffer, first: l.first, count: l.count, writer: UInt64(w), device: UInt64(l.device), seq: UInt64(seq))
                let n = l.count * 512
                let inImage = seq < prefix[w]
                if inImage {
                    atTake[l.device].withUnsafeMutableBytes { $0.baseAddress!.advanced(by: l.first * 512).copyMemory(from: buffer.baseAddress!, byteCount: n) }
                }
                final[l.device].withUnsafeMutableBytes { $0.baseAddress!.advanced(by: l.first * 512).copyMemory(from: buffer.baseAddress!, byteCount: n) }
                for b in (l.first >> 3)...((l.first + l.count - 1) >> 3) {
                    if inImage { readWant[l.device][b] = 1 }
                    writeWant[l.device][b] = max(writeWant[l.device][b], inImage ? 1 : 2)
                }
            }
        }
        for d in 0..<2 {
            let imageDiff = difference(images[d], atTake[d])
            #expect(imageDiff == nil, "image \(d) is not the devices after each writer's prefix \(prefix): \(imageDiff ?? "")")
            let originalDiff = difference(try bench.devices[d].readBytes(at: 0, count: size), final[d])
            #expect(originalDiff == nil, "original \(d) is not every write: \(originalDiff ?? "")")
            let (readMap, writeMap) = try #require(bench.engine.tracker(bench.devices[d].devId)).cbtMap.tables()
            #expect(difference(readMap, readWant[d]) == nil,
                    "the read map of \(d) is not exactly the blocks written before TAKE: \(difference(readMap, readWant[d]) ?? "")")
            #expect(difference(writeMap, writeWant[d]) == nil,
                    "the write map of \(d) is not the blocks written, by epoch: \(difference(writeMap, writeWant[d]) ?? "")")
        }
        try bench.engine.destroySnapshot(id)
    }

    /// Storage far too small for what four writers copy on write over two
    /// devices: the snapshot is corrupted exactly once (one corrupted event
    /// per device, ENOSPC), image reads turn to EIO and stay there, every
    /// read before that is the content at TAKE, and the originals keep
    /// every write.
    @Test(arguments: 0..<4)
    func corruptionUnderConcurrentWritesLeavesOriginalsWhole(round: Int) throws {
        let size = 1 << 20
        let sectors = size >> 9
        let writers = 4
        let regionSectors = sectors / writers
        let bench = try Bench(deviceSizes: [size, size])
        let initial = (0..<2).map { Stamp.initial(sectors: sectors, device: UInt64($0)) }
        for d in 0..<2 { try bench.devices[d].writeBytes(initial[d], at: 0) }
        let devIds = bench.devices.map(\.devId)
        let id = try bench.engine.createSnapshot(devIds)
        // 40 chunks of 32 sectors, and a tail of 20 too small for one.
        try bench.engine.appendStorage(id, device: Rig.storageId, ranges: [SectorRange(offset: 3, count: 40 * 32 + 20)])
        try bench.engine.takeSnapshot(id)
        let snapshot = try #require(bench.engine.snapshot(id))
        let images = snapshot.images

        let reports = Reports()
        let logs = (0..<writers).map { _ in Slot<[(device: Int, first: Int, count: Int)]>([]) }
        let writersLeft = SharedInt(writers)
        let eioReads = SharedInt(0)
        let group = DispatchGroup()
        for w in 0..<writers {
            startThread(group) {
                var rng = SplitMix64(seed: 0xC022 + UInt64(round * 16 + w))
                var log: [(device: Int, first: Int, count: Int)] = []
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 512, alignment: 8)
                defer { buffer.deallocate() }
                for seq in 0..<600 {
                    let device = rng.below(2)
                    let first = w * regionSectors + rng.below(regionSectors)
                    let count = min(rng.within(1, 64), (w + 1) * regionSectors - first)
                    Stamp.fill(buffer, first: first, count: count, writer: UInt64(w), device: UInt64(device), seq: UInt64(seq))
                    do {
                        try bench.devices[device].write(UnsafeRawBufferPointer(rebasing: buffer[0..<(count * 512)]),
                                                        at: UInt64(first * 512))
                    } catch {
                        reports.fail("writer \(w): original write failed after corruption: \(error)")
                    }
                    log.append((device, first, count))
                }
                logs[w].value = log
                writersLeft.atomic.subtract(1, ordering: .sequentiallyConsistent)
            }
        }
        for r in 0..<2 {
            startThread(group) {
                var rng = SplitMix64(seed: 0xEE10 + UInt64(round * 16 + r))
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 32 << 10, alignment: 8)
                defer { buffer.deallocate() }
                var failed = [false, false]
                while writersLeft.load() > 0 {
                    let d = rng.below(2)
                    let offset = rng.below(size)
                    let n = min(rng.within(1, 32 << 10), size - offset)
                    let piece = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n])
                    do throws(BlksnapError) {
                        try images[d].read(into: piece, at: UInt64(offset))
                        if failed[d] { reports.fail("reader \(r): image \(d) read again after EIO") }
                        let same = initial[d].withUnsafeBytes { memcmp(piece.baseAddress!, $0.baseAddress! + offset, n) == 0 }
                        if !same { reports.fail("reader \(r): image \(d) read \(offset)+\(n) is not the content at TAKE") }
                    } catch {
                        if error.errno.rawValue != 5 { reports.fail("reader \(r): image read failed with \(error), not EIO") }
                        failed[d] = true
                        eioReads.atomic.add(1, ordering: .sequentiallyConsistent)
                    }
                }
            }
        }
        guard group.wait(timeout: .now() + .seconds(hangLimitSeconds)) == .success else {
            Issue.record("threads still running after \(hangLimitSeconds) s: deadlock or livelock")
            return
        }
        #expect(reports.failureCount == 0, "\(reports.failures)")
        #expect(snapshot.isCorrupted)
        #expect(eioReads.load() > 0)

        // Exactly one corrupted event per device, ENOSPC; nothing else but low free space.
        var corrupted: [DevId] = []
        while let event = try? bench.engine.waitEvent(id, timeoutMs: 0) {
            if event.code == .corrupted {
                let data = EventCorrupted(wire: Array(event.data.prefix(EventCorrupted.size)))
                #expect(data.errCode == 28)
                corrupted.append(data.origDevId)
            }
        }
        #expect(corrupted.sorted() == devIds.sorted(), "corrupted events for \(corrupted)")
        for image in images {
            #expect(throws: BlksnapError.self) { try image.readBytes(at: 0, count: 512) }
        }

        // Originals: every write, in each writer's order.
        var final = initial
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 512, alignment: 8)
        defer { buffer.deallocate() }
        for w in 0..<writers {
            for (seq, l) in logs[w].value.enumerated() {
                Stamp.fill(buffer, first: l.first, count: l.count, writer: UInt64(w), device: UInt64(l.device), seq: UInt64(seq))
                final[l.device].withUnsafeMutableBytes {
                    $0.baseAddress!.advanced(by: l.first * 512).copyMemory(from: buffer.baseAddress!, byteCount: l.count * 512)
                }
            }
        }
        for d in 0..<2 {
            let diff = difference(try bench.devices[d].readBytes(at: 0, count: size), final[d])
            #expect(diff == nil, "original \(d) is not every write: \(diff ?? "")")
        }
        try bench.engine.destroySnapshot(id)
    }

    /// Two writers whose copy-on-write fails at once, on two devices of one
    /// snapshot: the first marks the snapshot corrupted; the second must not
    /// let its write land on its original while that device's image still
    /// reads as valid, or an image read returns data written after TAKE.
    /// The first thread is held (through the log line the snapshot writes
    /// while it marks itself corrupted) to make the interleaving certain.
    @Test func aSecondFailingWriterNeverShowsThroughItsImage() throws {
        let pause = CorruptionPause()
        var logger = Logger(label: "test") { _ in PausingLogHandler(pause: pause) }
        logger.logLevel = .error
        let size = 1 << 20
        let sectors = size >> 9
        let bench = try Bench(deviceSizes: [size, size], logger: logger)
        let initial = (0..<2).map { Stamp.initial(sectors: sectors, device: UInt64($0)) }
        for d in 0..<2 { try bench.devices[d].writeBytes(initial[d], at: 0) }
        let id = try bench.engine.createSnapshot(bench.devices.map(\.devId))
        // Room for exactly one chunk, which the first write takes.
        try bench.engine.appendStorage(id, device: Rig.storageId, ranges: [SectorRange(offset: 0, count: 32)])
        try bench.engine.takeSnapshot(id)
        let images = try #require(bench.engine.snapshot(id)?.images)
        let chunk = 16 << 10
        func stamped(_ device: Int, _ first: Int, _ seq: UInt64) -> [UInt8] {
            var b = [UInt8](repeating: 0, count: chunk)
            b.withUnsafeMutableBytes { Stamp.fill($0, first: first, count: chunk / 512, writer: 1, device: UInt64(device), seq: seq) }
            return b
        }
        let firstWrite = stamped(0, 32, 2)
        let secondWrite = stamped(1, 0, 3)
        try bench.devices[0].writeBytes(stamped(0, 0, 1), at: 0)       // stores chunk 0 of device 0: storage full

        let reports = Reports()
        let group = DispatchGroup()
        startThread(group) {                                           // first failure: device 0, chunk 1
            do { try bench.devices[0].writeBytes(firstWrite, at: UInt64(chunk)) } catch {
                reports.fail("first writer: \(error)")
            }
        }
        guard pause.reached.wait(timeout: .now() + .seconds(10)) == .success else {
            pause.release.signal()
            Issue.record("the first failing write never marked the snapshot corrupted")
            return
        }
        let second = DispatchGroup()
        startThread(second) {                                          // second failure: device 1, chunk 0
            do { try bench.devices[1].writeBytes(secondWrite, at: 0) } catch {
                reports.fail("second writer: \(error)")
            }
        }
        let secondDone = second.wait(timeout: .now() + .seconds(5)) == .success
        // Whatever the second writer did, image 1 must not show it.
        var seen: [UInt8]?
        var readError: BlksnapError?
        do {
            seen = try images[1].readBytes(at: 0, count: chunk)
        } catch let error as BlksnapError {
            readError = error
        }
        pause.release.signal()
        guard group.wait(timeout: .now() + .seconds(hangLimitSeconds)) == .success,
              second.wait(timeout: .now() + .seconds(hangLimitSeconds)) == .success else {
            Issue.record("threads still running after \(hangLimitSeconds) s: deadlock")
            return
        }
        #expect(secondDone || readError != nil, "the second writer waited for the first, yet image 1 still read")
        if let seen {
            #expect(difference(seen, Array(initial[1][0..<chunk])) == nil,
                    "image 1 returned data written after TAKE: \(difference(seen, Array(initial[1][0..<chunk])) ?? "")")
        } else {
            #expect(readError?.errno.rawValue == 5, "image 1 read failed with \(String(describing: readError)), not EIO")
        }
        #expect(reports.failureCount == 0, "\(reports.failures)")
        // Afterwards: corrupted, one event per device, originals whole.
        #expect(bench.engine.snapshot(id)?.isCorrupted == true)
        for image in images { #expect(throws: BlksnapError.self) { try image.readBytes(at: 0, count: 512) } }
        let events = bench.engine.snapshot(id)?.events.pending.filter { $0.code == .corrupted } ?? []
        #expect(events.map { EventCorrupted(wire: Array($0.data.prefix(EventCorrupted.size))).origDevId }.sorted()
                == bench.devices.map(\.devId))
        #expect(try bench.devices[0].readBytes(at: UInt64(chunk), count: chunk) == firstWrite)
        #expect(try bench.devices[1].readBytes(at: 0, count: chunk) == secondWrite)
    }

    /// DESTROY while writers, image readers and an image writer are busy:
    /// nothing hangs, reads that finished before DESTROY began saw the
    /// content at TAKE, I/O that began after it returned fails with ENODEV,
    /// and the original keeps every write.
    @Test func destroyDuringImageIOFinishesAndOriginalsStayWhole() throws {
        let size = 1 << 20
        let sectors = size >> 9
        let bench = try Bench(deviceSizes: [size])
        let dev = bench.devices[0]
        let initial = Stamp.initial(sectors: sectors, device: 0)
        try dev.writeBytes(initial, at: 0)
        let id = try bench.engine.createSnapshot([dev.devId])
        try bench.engine.appendStorage(id, device: Rig.storageId, ranges: [SectorRange(offset: 0, count: 16384)])
        try bench.engine.takeSnapshot(id)
        let image = try #require(bench.engine.snapshot(id)?.images.first)
        let imageRegion = (sectors - 128)..<sectors

        let reports = Reports()
        let destroyStarted = SharedInt(Int.max)
        let destroyEnded = SharedInt(Int.max)
        let stop = SharedFlag()
        let reads = SharedInt(0)
        let logs = (0..<2).map { _ in Slot<[(first: Int, count: Int)]>([]) }
        let group = DispatchGroup()

        for w in 0..<2 {
            startThread(group) {
                var rng = SplitMix64(seed: 0xDE57 + UInt64(w))
                var log: [(first: Int, count: Int)] = []
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 512, alignment: 8)
                defer { buffer.deallocate() }
                // Each writer its own half, so the final content is known.
                let base = w * (sectors / 2)
                while !stop.load() && log.count < 20000 {
                    let first = base + rng.below(sectors / 2)
                    let count = min(rng.within(1, 64), base + sectors / 2 - first)
                    Stamp.fill(buffer, first: first, count: count, writer: UInt64(w), device: 0, seq: UInt64(log.count))
                    do {
                        try dev.write(UnsafeRawBufferPointer(rebasing: buffer[0..<(count * 512)]), at: UInt64(first * 512))
                    } catch {
                        reports.fail("writer \(w): \(error)")
                    }
                    log.append((first, count))
                }
                logs[w].value = log
            }
        }
        for r in 0..<2 {
            startThread(group) {
                var rng = SplitMix64(seed: 0xDE5E + UInt64(r))
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 32 << 10, alignment: 8)
                defer { buffer.deallocate() }
                let readable = imageRegion.lowerBound * 512
                while !stop.load() {
                    let offset = rng.below(readable)
                    let n = min(rng.within(1, 32 << 10), readable - offset)
                    let piece = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n])
                    let begin = nowNs()
                    do throws(BlksnapError) {
                        try image.read(into: piece, at: UInt64(offset))
                        let same = initial.withUnsafeBytes { memcmp(piece.baseAddress!, $0.baseAddress! + offset, n) == 0 }
                        if !same && nowNs() < destroyStarted.load() {
                            reports.fail("reader \(r): a read before DESTROY is not the content at TAKE")
                        }
                        if begin > destroyEnded.load() { reports.fail("reader \(r): a read after DESTROY succeeded") }
                    } catch {
                        if error.errno.rawValue != 19 { reports.fail("reader \(r): image read failed with \(error), not ENODEV") }
                        if begin < destroyStarted.load() && nowNs() < destroyStarted.load() {
                            reports.fail("reader \(r): a read before DESTROY failed: \(error)")
                        }
                    }
                    reads.atomic.add(1, ordering: .sequentiallyConsistent)
                }
            }
        }
        startThread(group) {
            var rng = SplitMix64(seed: 0x1A6F)
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 16 * 512, alignment: 8)
            defer { buffer.deallocate() }
            var seq: UInt64 = 0
            while !stop.load() {
                let first = rng.within(imageRegion.lowerBound, imageRegion.upperBound - 16)
                Stamp.fill(buffer, first: first, count: 16, writer: Stamp.imageWriter, device: 0, seq: seq)
                let begin = nowNs()
                do throws(BlksnapError) {
                    try image.write(UnsafeRawBufferPointer(buffer), at: UInt64(first * 512))
                    if begin > destroyEnded.load() { reports.fail("image writer: a write after DESTROY succeeded") }
                } catch {
                    if error.errno.rawValue != 19 { reports.fail("image writer: failed with \(error), not ENODEV") }
                }
                seq += 1
            }
        }
        startThread(group) {
            let deadline = monotonicNanoseconds() + 10_000_000_000
            while reads.load() < 300 && monotonicNanoseconds() < deadline { usleep(500) }
            destroyStarted.store(nowNs())
            do { try bench.engine.destroySnapshot(id) } catch { reports.fail("DESTROY failed: \(error)") }
            destroyEnded.store(nowNs())
            let more = reads.load() + 300
            while reads.load() < more && monotonicNanoseconds() < deadline + 10_000_000_000 { usleep(500) }
            stop.store(true)
        }
        guard group.wait(timeout: .now() + .seconds(hangLimitSeconds)) == .success else {
            stop.store(true)
            Issue.record("threads still running after \(hangLimitSeconds) s: deadlock or livelock")
            return
        }
        #expect(reports.failureCount == 0, "\(reports.failures)")
        #expect(bench.engine.snapshot(id) == nil)
        #expect(bench.engine.collectTrackers().map(\.devId) == [dev.devId], "the tracker stays after DESTROY")

        var final = initial
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 512, alignment: 8)
        defer { buffer.deallocate() }
        for w in 0..<2 {
            for (seq, l) in logs[w].value.enumerated() {
                Stamp.fill(buffer, first: l.first, count: l.count, writer: UInt64(w), device: 0, seq: UInt64(seq))
                final.withUnsafeMutableBytes {
                    $0.baseAddress!.advanced(by: l.first * 512).copyMemory(from: buffer.baseAddress!, byteCount: l.count * 512)
                }
            }
        }
        let diff = difference(try dev.readBytes(at: 0, count: size), final)
        #expect(diff == nil, "the original is not every write: \(diff ?? "")")
    }
}
