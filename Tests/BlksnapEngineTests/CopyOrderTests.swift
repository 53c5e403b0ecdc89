import BlksnapABI
@testable import BlksnapEngine
import BlksnapTestSupport
import Dispatch
import Logging
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// What the original and the storage were asked to do, in the order they
/// did it: an original write as it begins (with the chunks it covers), a
/// storage write once it has returned (with the chunks whose copies it
/// holds, told apart by their contents).
private final class Journal: @unchecked Sendable {
    enum Event: Equatable { case originalWrite(chunks: ClosedRange<Int>), stored(chunk: Int) }
    private let lock = Lock()
    private var list: [Event] = []
    private var moved = false
    func add(_ events: [Event], spliced: Bool = false) { lock.withLock { list += events; moved = moved || spliced } }
    /// Whether any copy was moved by the kernel rather than written from a buffer.
    var spliced: Bool { lock.withLock { moved } }
    var events: [Event] { lock.withLock { list } }
}

/// A disk that tells the journal what it did, passing everything on,
/// file ranges and spliced writes included, so either way of storing a
/// chunk is seen.
private final class RecordingDevice: BlockDevice, @unchecked Sendable {
    let base: any BlockDevice
    let isOriginal: Bool
    let journal: Journal
    let chunkSize: Int

    init(_ base: any BlockDevice, isOriginal: Bool, journal: Journal, chunkSize: Int) {
        (self.base, self.isOriginal, self.journal, self.chunkSize) = (base, isOriginal, journal, chunkSize)
    }

    var size: UInt64 { base.size }
    var alignment: Int { base.alignment }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        try base.read(into: buffer, at: offset)
    }
    func fileRange(at offset: UInt64, count: Int) -> (descriptor: Int32, offset: UInt64)? {
        base.fileRange(at: offset, count: count)
    }
    func flush() throws(BlksnapError) { try base.flush() }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        if isOriginal {
            let first = Int(offset) / chunkSize, last = (Int(offset) + buffer.count - 1) / chunkSize
            journal.add([.originalWrite(chunks: first...last)])
        }
        try base.write(buffer, at: offset)
        if !isOriginal { journal.add(storedChunks(at: offset, count: buffer.count)) }
    }

    func write(fromFile source: Int32, at sourceOffset: UInt64, count: Int, to offset: UInt64) throws(BlksnapError) -> Bool {
        guard try base.write(fromFile: source, at: sourceOffset, count: count, to: offset) else { return false }
        journal.add(storedChunks(at: offset, count: count), spliced: true)
        return true
    }

    /// Every chunk of the original holds its number + 1 in each byte
    /// before the snapshot, so a stored copy names its chunk.
    private func storedChunks(at offset: UInt64, count: Int) -> [Journal.Event] {
        stride(from: 0, to: count, by: chunkSize).map { at in
            var byte: UInt8 = 0
            withUnsafeMutableBytes(of: &byte) { try? base.read(into: $0, at: offset + UInt64(at)) }
            return .stored(chunk: Int(byte) - 1)
        }
    }
}

/// Copy-on-write stores a chunk's point-in-time copy before any write of
/// the original lands in it, however the copies are batched or moved.
@Suite struct CopyOrderTests {
    static let chunkShift = 14
    static let chunks = 64

    /// `files`: the original and the storage are files (the kernel moves
    /// the copies by splice), else memory (copies through a buffer).
    @Test(arguments: [false, true])
    func everyChunkIsStoredBeforeTheOriginalWriteThatCoversIt(files: Bool) throws {
        let chunkSize = 1 << Self.chunkShift
        let size = UInt64(Self.chunks * chunkSize)
        var settings = Rig.smallSettings
        settings.chunkMinimumShift = Self.chunkShift
        let paths = ["o", "s"].map { "/tmp/blksnap-order-\(getpid())-\(files)-\($0)" }
        defer { for p in paths { unlink(p) } }
        var old = [UInt8](repeating: 0, count: Int(size))
        for c in 0..<Self.chunks { old.replaceSubrange((c * chunkSize)..<((c + 1) * chunkSize), with: repeatElement(UInt8(c + 1), count: chunkSize)) }
        let originalBase: any BlockDevice, storageBase: any BlockDevice
        if files {
            for (p, bytes) in zip(paths, [old, [UInt8](repeating: 0, count: Int(size) + (1 << 20))]) {
                let fd = open(p, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
                #expect(pwrite(fd, bytes, bytes.count, 0) == bytes.count)
                close(fd)
            }
            originalBase = try FileBlockDevice(path: paths[0])
            storageBase = try FileBlockDevice(path: paths[1], directWritesWhenAligned: true, syncWrites: true)
        } else {
            let memory = MemoryBlockDevice(size: size)
            try memory.writeBytes(old, at: 0)
            originalBase = memory
            storageBase = MemoryBlockDevice(size: size + (1 << 20))
        }
        let journal = Journal()
        let original = RecordingDevice(originalBase, isOriginal: true, journal: journal, chunkSize: chunkSize)
        let storage = RecordingDevice(storageBase, isOriginal: false, journal: journal, chunkSize: chunkSize)
        let host = FakeHost()
        host.disks[Rig.storageId] = storage
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        let engine = Engine(settings: settings, host: host, logger: logger)
        let device = try engine.route(DevId(major: 7, minor: 0), backing: original)
        let id = try engine.createSnapshot([device.devId])
        try engine.appendStorage(id, device: Rig.storageId, ranges: [SectorRange(offset: 0, count: (size + (1 << 20)) >> 9)])
        try engine.takeSnapshot(id)

        // Four writers, each a run of chunk-spanning writes over the whole
        // device from its own starting point, so they meet on chunks.
        let writes = (0..<4).map { w in
            (0..<16).map { i -> (UInt64, Int) in
                let start = ((w * 16 + i * 5) % Self.chunks) * chunkSize + (i % 3) * 4096
                return (UInt64(start), min(chunkSize * (1 + i % 4), Int(size) - start))
            }
        }
        DispatchQueue.concurrentPerform(iterations: writes.count) { w in
            for (offset, count) in writes[w] {
                try? device.writeBytes([UInt8](repeating: 0xF0 | UInt8(w), count: count), at: offset)
            }
        }

        var stored = Set<Int>()
        var firstUnstored: (ClosedRange<Int>, Int)?
        for event in journal.events {
            switch event {
            case .stored(let chunk): stored.insert(chunk)
            case .originalWrite(let covered):
                if firstUnstored == nil, let c = covered.first(where: { !stored.contains($0) }) { firstUnstored = (covered, c) }
            }
        }
        #expect(firstUnstored == nil, "an original write began before a chunk it covers was stored: \(String(describing: firstUnstored))")
        let written = writes.joined().reduce(into: Set<Int>()) { set, w in
            set.formUnion((Int(w.0) / chunkSize)...((Int(w.0) + w.1 - 1) / chunkSize))
        }
        #expect(stored == written)
        #expect(journal.spliced == files)
        let image = engine.snapshot(id)!.images[0]
        #expect(try image.readBytes(at: 0, count: Int(size)) == old)
    }
}
