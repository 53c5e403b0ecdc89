import BlksnapABI
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The copy-on-write state of one device in one taken snapshot (upstream
/// `diff_area.c`): which chunks of the original have been copied to the
/// difference storage, and where.
///
/// Invariants, per chunk:
/// - an original write lands in a chunk only once the chunk is `storeReady`
///   (or the snapshot is corrupted): `copyOnWrite` runs first;
/// - an image read of a chunk that is not `storeReady` reads the original,
///   counted in its stripe's `originalReaders`, and a copy waits for those
///   reads before marking the chunk `storeReady`, so no image read ever sees
///   a byte written after TAKE;
/// - while a chunk is `loading`, its writers and image readers wait on the
///   stripe's condition; other chunks go on in parallel.
///
/// The hot path (chunks stored already) takes one stripe mutex per chunk
/// touched, allocates nothing and never waits for an actor; a copy
/// allocates only its list of regions (a buffer, where it needs one,
/// comes from a pool).
public final class DiffArea: @unchecked Sendable {
    public let devId: DevId
    public let capacity: UInt64
    public let chunkShift: Int
    public let chunkCount: Int
    let original: any BlockDevice
    let storage: DiffStorage
    private let states: UnsafeMutableBufferPointer<UInt8>
    private let stripes: [ChunkStripe]
    private let stripeMask: Int
    private let corrupted = Atomic<Bool>(false)
    private let onFailure: @Sendable (BlksnapError) -> Void
    private let counters: DeviceCounters?
    private let poolLock = Lock()
    private var pool: [UnsafeMutableRawBufferPointer] = []
    private let poolLimit: Int
    /// How many neighbouring chunks one copy claims at most: a MiB's worth
    /// (what one request of the frontends carries at most), or one chunk
    /// where chunks are larger.
    private let batchChunks: Int

    /// `original` is the backing store beneath the engine: reads of it see
    /// exactly what has landed, and nothing here writes to it.
    init(devId: DevId, original: any BlockDevice, storage: DiffStorage, settings: EngineSettings,
         counters: DeviceCounters? = nil, onFailure: @escaping @Sendable (BlksnapError) -> Void) {
        self.devId = devId
        self.counters = counters
        self.original = original
        self.storage = storage
        self.capacity = original.size
        let minimumShift = max(settings.chunkMinimumShift, Int(log2(Double(max(original.alignment, 512)))))
        let (shift, count) = EngineSettings.shift(
            capacity: original.size, minimum: minimumShift, maximum: settings.chunkMaximumShift,
            maximumCount: settings.chunkMaximumCount)
        chunkShift = shift
        chunkCount = Int(count)
        states = .allocate(capacity: max(chunkCount, 1))
        states.initialize(repeating: 0)
        var n = 1
        while n < min(chunkCount, 4096) { n <<= 1 }
        stripes = (0..<n).map { _ in ChunkStripe() }
        stripeMask = n - 1
        batchChunks = max(1, (1 << 20) >> shift)
        poolLimit = max(settings.chunkMaximumInCache, 1)
        self.onFailure = onFailure
        pool.reserveCapacity(poolLimit)
    }

    deinit {
        states.deallocate()
        for b in pool { b.deallocate() }
    }

    public var chunkSize: Int { 1 << chunkShift }
    public var isCorrupted: Bool { corrupted.load(ordering: .acquiring) }

    /// Called by the snapshot when any of its devices failed: image I/O
    /// fails from now on and original writes go on without copy-on-write.
    func markCorrupted() {
        corrupted.store(true, ordering: .releasing)
        for s in stripes {
            s.lock.withLock { s.condition.broadcast() }
        }
    }

    private func takeBuffer() -> UnsafeMutableRawBufferPointer {
        if let b = poolLock.withLock({ pool.popLast() }) { return b }
        return .allocate(byteCount: chunkSize, alignment: 4096)
    }

    private func giveBack(_ b: UnsafeMutableRawBufferPointer) {
        let kept = poolLock.withLock { () -> Bool in
            guard pool.count < poolLimit else { return false }
            pool.append(b)
            return true
        }
        if !kept { b.deallocate() }
    }

    @inline(__always) private func stripe(_ chunk: Int) -> ChunkStripe { stripes[chunk & stripeMask] }

    /// The byte length of a chunk: the last one may be short.
    @inline(__always) private func length(of chunk: Int) -> Int {
        let start = UInt64(chunk) << UInt64(chunkShift)
        return Int(min(UInt64(chunkSize), capacity - start))
    }

    // MARK: original writes

    /// Makes sure every chunk that `offset..<offset+length` touches has its
    /// point-in-time copy stored; the caller holds the device's gate shared
    /// and writes the original afterwards. A failure corrupts the snapshot
    /// and lets the write go on: the original is never held hostage.
    ///
    /// The chunks no one else is copying are claimed in runs of neighbours
    /// and each run copied at once (`copy`); chunks another writer is
    /// copying are waited for only after this one's own are stored, so no
    /// writer ever waits while holding a claim.
    func copyOnWrite(offset: UInt64, length: UInt64) {
        guard length > 0 else { return }
        let first = Int(offset >> UInt64(chunkShift))
        let last = min(Int((offset + length - 1) >> UInt64(chunkShift)), chunkCount - 1)
        guard !isCorrupted else {
            waitForOriginalReaders(first...last)
            return
        }
        do throws(BlksnapError) {
            var othersCopying = false
            var chunk = first
            while chunk <= last {
                let (run, stored) = claim(from: chunk, through: min(last, chunk + batchChunks - 1))
                if run.isEmpty {
                    if !stored { othersCopying = true }
                    chunk += 1
                } else {
                    try copy(run)
                    chunk = run.upperBound
                }
            }
            if othersCopying {
                for chunk in first...last { _ = try ensureStored(chunk) }
            }
        } catch {
            if !isCorrupted { onFailure(error) }
            waitForOriginalReaders(first...last)
        }
    }

    /// How many stored copies wait for image reads of the original to end
    /// before their writes may land: what a test waits for to know a write
    /// is held, rather than guessing how long holding takes.
    var copiesWaitingForReaders: Int { stripes.reduce(0) { sum, s in sum + s.lock.withLock { s.draining } } }

    /// Marks `loading` the chunks from `start` on that are neither stored
    /// nor being copied, up to `end`, stopping at the first that is: the
    /// run this caller now copies. Empty when `start` itself is taken;
    /// `stored` says whether it is because `start` is stored already.
    private func claim(from start: Int, through end: Int) -> (run: Range<Int>, stored: Bool) {
        var chunk = start
        var stored = false
        while chunk <= end {
            let s = stripe(chunk)
            let claimed = s.lock.withLock { () -> Bool in
                let state = ChunkState(rawValue: states[chunk])
                stored = state.contains(.storeReady)
                guard !stored, !state.contains(.loading), !isCorrupted else { return false }
                states[chunk] |= ChunkState.loading.rawValue
                return true
            }
            guard claimed else { break }
            chunk += 1
        }
        return (start..<chunk, chunk == start && stored)
    }

    /// A corrupted snapshot copies nothing more, but a write still waits
    /// for the image reads of the original in flight on its chunks: a
    /// spliced read (`withImageFileRanges`) sends the original's pages on
    /// only after it counted itself out, and cannot fail afterwards as
    /// `readImage` does.
    private func waitForOriginalReaders(_ chunks: ClosedRange<Int>) {
        var seen = Set<ObjectIdentifier>()
        for chunk in chunks {
            let s = stripe(chunk)
            guard seen.insert(ObjectIdentifier(s)).inserted else { continue }
            s.lock.withLock { while s.originalReaders > 0 { s.condition.wait(s.lock) } }
            if seen.count == stripes.count { return }
        }
    }

    /// Copies a chunk to the difference storage unless it is there already,
    /// and says where it is.
    private func ensureStored(_ chunk: Int) throws(BlksnapError) -> DiffRegion {
        let s = stripe(chunk)
        s.lock.lock()
        while true {
            let state = ChunkState(rawValue: states[chunk])
            if state.contains(.storeReady) {
                let region = s.locations[UInt32(chunk)]!
                s.lock.unlock()
                return region
            }
            if isCorrupted {
                s.lock.unlock()
                throw BlksnapError(.ioError, "snapshot of \(devId) is corrupted")
            }
            if !state.contains(.loading) { break }
            s.condition.wait(s.lock)
        }
        states[chunk] |= ChunkState.loading.rawValue
        s.lock.unlock()
        try copy(chunk..<(chunk + 1))
        return s.lock.withLock { s.locations[UInt32(chunk)]! }
    }

    /// Copies `run`, chunks this caller claimed (`loading`), from the
    /// original to fresh regions of the storage, then makes each
    /// `storeReady` once the image reads of the original in flight on its
    /// stripe are done. On failure every chunk of the run is `failed`.
    ///
    /// Where the original is a file, each stretch of neighbouring regions
    /// is one write, moved by the kernel from the original's page cache
    /// straight to the storage (a 1 MiB write is one splice, not four
    /// reads and writes of 256 KiB); else, or where the storage cannot
    /// take a splice, each chunk is read into a buffer, cut from the
    /// storage and written, in that order.
    private func copy(_ run: Range<Int>) throws(BlksnapError) {
        let regions = UnsafeMutableBufferPointer<DiffRegion>.allocate(capacity: run.count)
        var allocated = 0
        defer {
            regions.baseAddress!.deinitialize(count: allocated)
            regions.deallocate()
        }
        do throws(BlksnapError) {
            let start = UInt64(run.lowerBound) << UInt64(chunkShift)
            let n = Int(min(UInt64(run.count) << UInt64(chunkShift), capacity - start))
            // A short last chunk is padded to a sector: through a buffer.
            if n % 512 == 0, let source = original.fileRange(at: start, count: n) {
                for i in 0..<run.count {
                    (regions.baseAddress! + i).initialize(to: try allocate(run.lowerBound + i))
                    allocated += 1
                }
                var i = 0
                while i < run.count {
                    var j = i + 1
                    while j < run.count, regions[j].device === regions[i].device,
                          regions[j].offset == regions[i].offset + UInt64((j - i) * chunkSize) { j += 1 }
                    let from = i * chunkSize, to = min(j * chunkSize, n)
                    if try !regions[i].device.write(fromFile: source.descriptor, at: source.offset + UInt64(from),
                                                    count: to - from, to: regions[i].offset) {
                        for k in i..<j { try copyThroughBuffer(run.lowerBound + k, to: regions[k]) }
                    }
                    i = j
                }
            } else {
                for i in 0..<run.count {
                    (regions.baseAddress! + i).initialize(to: try copyThroughBuffer(run.lowerBound + i))
                    allocated += 1
                }
            }
        } catch {
            for chunk in run {
                let s = stripe(chunk)
                s.lock.withLock {
                    states[chunk] = (states[chunk] & ~ChunkState.loading.rawValue) | ChunkState.failed.rawValue
                    s.condition.broadcast()
                }
            }
            throw error
        }
        for (i, chunk) in run.enumerated() {
            counters?.countChunkCopied()
            let s = stripe(chunk)
            s.lock.lock()
            s.draining += 1
            while s.originalReaders > 0 { s.condition.wait(s.lock) }
            s.draining -= 1
            s.locations[UInt32(chunk)] = regions[i]
            states[chunk] = (states[chunk] & ~ChunkState.loading.rawValue) | ChunkState.storeReady.rawValue
            s.condition.broadcast()
            s.lock.unlock()
        }
    }

    /// A fresh region of the storage for `chunk`, padded to a sector.
    private func allocate(_ chunk: Int) throws(BlksnapError) -> DiffRegion {
        guard let region = storage.allocate(sectors: UInt64((length(of: chunk) + 511) & ~511) >> sectorShift) else {
            throw BlksnapError(.noSpace, "difference storage is full")
        }
        return region
    }

    /// Reads `chunk` from the original into a buffer and writes it to
    /// `region`, or to a region cut from the storage after the read.
    @discardableResult
    private func copyThroughBuffer(_ chunk: Int, to region: DiffRegion? = nil) throws(BlksnapError) -> DiffRegion {
        let n = length(of: chunk)
        let padded = (n + 511) & ~511
        let buffer = takeBuffer()
        defer { giveBack(buffer) }
        try original.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]), at: UInt64(chunk) << UInt64(chunkShift))
        if padded > n { (buffer.baseAddress! + n).initializeMemory(as: UInt8.self, repeating: 0, count: padded - n) }
        let target: DiffRegion
        if let region { target = region } else { target = try allocate(chunk) }
        try target.device.write(UnsafeRawBufferPointer(rebasing: buffer[0..<padded]), at: target.offset)
        return target
    }

    // MARK: image I/O

    /// Splits a byte range into its pieces per chunk.
    @inline(__always)
    private func forEachPiece(offset: UInt64, count: Int,
                              _ body: (_ chunk: Int, _ inChunk: Int, _ done: Int, _ n: Int) throws(BlksnapError) -> Void) throws(BlksnapError) {
        guard count > 0 else { return }
        guard offset <= capacity, UInt64(count) <= capacity - offset else {
            throw BlksnapError(.invalidArgument, "image I/O at \(offset)+\(count) past the end of \(capacity) bytes")
        }
        var done = 0
        while done < count {
            let position = offset + UInt64(done)
            let chunk = Int(position >> UInt64(chunkShift))
            let inChunk = Int(position & UInt64(chunkSize - 1))
            let n = min(count - done, chunkSize - inChunk)
            try body(chunk, inChunk, done, n)
            done += n
        }
    }

    /// The point-in-time content, plus what was written through the image.
    func readImage(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        guard !isCorrupted else { throw BlksnapError(.ioError, "snapshot of \(devId) is corrupted") }
        try forEachPiece(offset: offset, count: buffer.count) { (chunk, inChunk, done, n) throws(BlksnapError) in
            let piece = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + n)])
            let s = stripe(chunk)
            s.lock.lock()
            while true {
                if isCorrupted {
                    s.lock.unlock()
                    throw BlksnapError(.ioError, "snapshot of \(devId) is corrupted")
                }
                let state = ChunkState(rawValue: states[chunk])
                if state.contains(.storeReady) {
                    let region = s.locations[UInt32(chunk)]!
                    s.lock.unlock()
                    try region.device.read(into: piece, at: region.offset + UInt64(inChunk))
                    return
                }
                if !state.contains(.loading) && s.draining == 0 { break }
                s.condition.wait(s.lock)
            }
            s.originalReaders += 1
            s.lock.unlock()
            defer {
                s.lock.withLock {
                    s.originalReaders -= 1
                    if s.originalReaders == 0 { s.condition.broadcast() }
                }
            }
            try original.read(into: piece, at: (UInt64(chunk) << UInt64(chunkShift)) + UInt64(inChunk))
        }
        guard !isCorrupted else { throw BlksnapError(.ioError, "snapshot of \(devId) is corrupted") }
    }

    /// A piece of the image in a file the kernel can splice from.
    public typealias FileRange = (descriptor: Int32, offset: UInt64, count: Int)

    /// Runs `body` with the files and offsets that hold the image's bytes
    /// at `offset..<offset+count`, for a frontend to splice them on. The
    /// pieces read from the original count as image reads until `body`
    /// returns, so no copy-on-write lets a write land on them before:
    /// a splice holds page references, not bytes. False, without running
    /// `body`, where a piece is in no such file or a chunk is being copied
    /// (the caller reads with `readImage` then, which waits: waiting here
    /// while counted on another chunk could deadlock a copy).
    func withImageFileRanges(offset: UInt64, count: Int, _ body: ([FileRange]) -> Void) -> Bool {
        guard count > 0 else { return false }
        var ranges: [FileRange] = []
        var counted: [ChunkStripe] = []
        defer {
            for s in counted {
                s.lock.withLock {
                    s.originalReaders -= 1
                    if s.originalReaders == 0 { s.condition.broadcast() }
                }
            }
        }
        // Thrown to stop at a piece that cannot be spliced; never escapes.
        let unspliceable = BlksnapError(.resourceTemporarilyUnavailable, "no file range")
        do throws(BlksnapError) {
            try forEachPiece(offset: offset, count: count) { (chunk, inChunk, done, n) throws(BlksnapError) in
                let position = offset + UInt64(done)
                let s = stripe(chunk)
                s.lock.lock()
                let state = ChunkState(rawValue: states[chunk])
                let piece: (descriptor: Int32, offset: UInt64)?
                if isCorrupted || (!state.contains(.storeReady) && (state.contains(.loading) || s.draining > 0)) {
                    s.lock.unlock()
                    throw unspliceable
                } else if state.contains(.storeReady) {
                    let region = s.locations[UInt32(chunk)]!
                    s.lock.unlock()
                    piece = region.device.fileRange(at: region.offset + UInt64(inChunk), count: n)
                } else {
                    // Counted under the stripe's lock after the check above: a
                    // write that sees the snapshot corrupted waits for this count.
                    s.originalReaders += 1
                    s.lock.unlock()
                    counted.append(s)
                    piece = original.fileRange(at: position, count: n)
                }
                guard let piece else { throw unspliceable }
                if let last = ranges.last, last.descriptor == piece.descriptor,
                   last.offset + UInt64(last.count) == piece.offset {
                    ranges[ranges.count - 1].count += n
                } else {
                    ranges.append((piece.descriptor, piece.offset, n))
                }
            }
        } catch {
            return false
        }
        guard !isCorrupted else { return false }
        body(ranges)
        return true
    }

    /// Stores an image write in the difference storage; the original is
    /// never touched. `beforeChange` runs once the write is known to be in
    /// range and the snapshot alive, before the first byte is stored: a
    /// write that fails half-way may already have changed part of the image.
    func writeImage(_ buffer: UnsafeRawBufferPointer, at offset: UInt64,
                    beforeChange: () throws(BlksnapError) -> Void) throws(BlksnapError) {
        guard !isCorrupted else { throw BlksnapError(.ioError, "snapshot of \(devId) is corrupted") }
        guard buffer.count > 0 else { return }
        guard offset <= capacity, UInt64(buffer.count) <= capacity - offset else {
            throw BlksnapError(.invalidArgument, "image I/O at \(offset)+\(buffer.count) past the end of \(capacity) bytes")
        }
        try beforeChange()
        try forEachPiece(offset: offset, count: buffer.count) { (chunk, inChunk, done, n) throws(BlksnapError) in
            let region: DiffRegion
            do throws(BlksnapError) {
                region = try ensureStored(chunk)
            } catch {
                if !isCorrupted { onFailure(error) }
                throw BlksnapError(.ioError, "snapshot of \(devId): \(error.message)")
            }
            try region.device.write(UnsafeRawBufferPointer(rebasing: buffer[done..<(done + n)]),
                                    at: region.offset + UInt64(inChunk))
            let s = stripe(chunk)
            s.lock.withLock { states[chunk] |= ChunkState.dirty.rawValue }
        }
    }

    /// The state bits of the chunk holding `sector`.
    func chunkState(sector: UInt64) throws(BlksnapError) -> ChunkState {
        let chunk = sector >> UInt64(chunkShift - Int(sectorShift))
        guard chunk < UInt64(chunkCount) else {
            throw BlksnapError(.invalidArgument, "sector \(sector) is past the image")
        }
        let s = stripe(Int(chunk))
        return s.lock.withLock { ChunkState(rawValue: states[Int(chunk)]) }
    }

    /// How many chunks hold a stored copy.
    public var storedChunks: Int {
        stripes.reduce(0) { total, s in total + s.lock.withLock { s.locations.count } }
    }
}
