#if canImport(Glibc)
import Glibc
#endif
import CBlksnapBackup
import SystemPackage

/// Copies extents of a snapshot image into a qcow2 target.
///
/// A few workers each read a piece (O_DIRECT: a backup should not flush the
/// machine's page cache) and write it; reads of the image overlap with the
/// writes of other workers. Runs of zeroes are never written: a full backup
/// skips them (a new qcow2 reads as zero), an incremental writes them as
/// zero requests so they hide what the backing file holds.
public final class Copier: @unchecked Sendable {
    public struct Counts: Sendable {
        public var scanned: UInt64 = 0
        public var written: UInt64 = 0
    }

    let source: Int32
    let target: QcowTarget
    let pieces: [ByteExtent]
    let full: Bool
    let pieceSize: Int
    let granule: Int
    let workers: Int
    private let monitor = Monitor()
    private var next = 0
    private var counts = Counts()
    private var failure: BackupError?
    private var running = 0

    /// Bytes per second to read at most (nil: as fast as it goes), so a
    /// backup can leave the disk to the machine's real work.
    let maxRate: UInt64?
    private var began = 0.0

    public init(source: Int32, target: QcowTarget, extents: [ByteExtent], full: Bool,
                pieceSize: Int = 4 << 20, granule: Int = 64 << 10, workers: Int = 4, maxRate: UInt64? = nil) {
        self.maxRate = maxRate
        self.source = source
        self.target = target
        self.pieces = ChangedExtents.pieces(of: extents, piece: UInt64(pieceSize))
        self.full = full
        self.pieceSize = pieceSize
        self.granule = granule
        self.workers = max(1, workers)
    }

    /// Runs the copy. `tick` is called on this thread about every
    /// `interval` seconds with the counts; `stop` returns an error to end
    /// the copy early (an interrupt, a corrupted snapshot).
    public func run(interval: Double = 0.5, tick: (Counts) -> Void,
                    stop: () -> BackupError?) throws(BackupError) -> Counts {
        running = workers
        began = monotonicSeconds()
        let threads = (0..<workers).map { _ in Thread { [self] in work() } }
        while monitor.locked({ running > 0 }) {
            monitor.wait(seconds: interval)
            if let e = stop() { monitor.locked { if failure == nil { failure = e } } }
            tick(monitor.locked { counts })
        }
        for t in threads { t.join() }
        if let failure = monitor.locked({ failure }) { throw failure }
        return monitor.locked { counts }
    }

    private func work() {
        defer {
            monitor.locked { running -= 1 }
            monitor.broadcast()
        }
        guard let buffer = Self.alignedBuffer(pieceSize) else {
            monitor.locked { failure = failure ?? BackupError(.noMemory, "cannot allocate a copy buffer") }
            return
        }
        defer { free(buffer.baseAddress) }
        while true {
            let index: Int? = monitor.locked {
                guard failure == nil, next < pieces.count else { return nil }
                next += 1
                return next - 1
            }
            guard let index else { return }
            if let rate = maxRate, rate > 0 {
                // Wait until the bytes read so far fit the rate.
                while true {
                    let (scanned, stopped) = monitor.locked { (counts.scanned, failure != nil) }
                    let due = began + Double(scanned) / Double(rate)
                    let now = monotonicSeconds()
                    if stopped || due <= now { break }
                    usleep(UInt32(min(due - now, 0.1) * 1e6))
                }
            }
            do {
                let written = try copy(pieces[index], buffer)
                monitor.locked {
                    counts.scanned += pieces[index].length
                    counts.written += written
                }
            } catch {
                monitor.locked { failure = failure ?? error }
                return
            }
        }
    }

    nonisolated(unsafe) static let zeroes: UnsafeMutableRawPointer = calloc(1, 1 << 20)!

    static func alignedBuffer(_ size: Int) -> UnsafeMutableRawBufferPointer? {
        var p: UnsafeMutableRawPointer?
        guard posix_memalign(&p, 4096, size) == 0, let p else { return nil }
        return UnsafeMutableRawBufferPointer(start: p, count: size)
    }

    /// One piece: read whole, then written as runs of data and of zeroes.
    private func copy(_ piece: ByteExtent, _ buffer: UnsafeMutableRawBufferPointer) throws(BackupError) -> UInt64 {
        let length = Int(piece.length)
        var done = 0
        while done < length {
            let n = pread(source, buffer.baseAddress! + done, length - done, off_t(piece.offset) + off_t(done))
            if n < 0 {
                if Glibc.errno == EINTR { continue }
                throw BackupError(lastErrno(), "reading the snapshot image at \(piece.offset + UInt64(done))")
            }
            guard n > 0 else { throw BackupError(.ioError, "the snapshot image ends at \(piece.offset + UInt64(done))") }
            done += n
        }
        var written: UInt64 = 0
        var runStart = 0
        var runIsZero: Bool? = nil
        func flush(_ end: Int) throws(BackupError) {
            guard let zero = runIsZero, end > runStart else { return }
            let offset = piece.offset + UInt64(runStart)
            if !zero {
                try target.write(UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(buffer)[runStart..<end]), at: offset)
                written += UInt64(end - runStart)
            } else if !full {
                try target.zero(UInt64(end - runStart), at: offset)
            }
        }
        var at = 0
        while at < length {
            let step = min(granule, length - at)
            let zero = memcmp(buffer.baseAddress! + at, Self.zeroes, step) == 0
            if zero != runIsZero {
                try flush(at)
                runStart = at
                runIsZero = zero
            }
            at += step
        }
        try flush(length)
        return written
    }

    /// Opens a snapshot image for reading, O_DIRECT where it is allowed.
    public static func openImage(_ path: String) throws(BackupError) -> Int32 {
        var fd = open(path, O_RDONLY | O_CLOEXEC | bkp_o_direct)
        if fd < 0 && Glibc.errno == EINVAL { fd = open(path, O_RDONLY | O_CLOEXEC) }
        guard fd >= 0 else { throw BackupError(lastErrno(), "cannot open the snapshot image \(path)") }
        return fd
    }
}
