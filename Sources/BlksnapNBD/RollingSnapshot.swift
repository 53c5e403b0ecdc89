import BlksnapABI
import BlksnapEngine
#if canImport(Glibc)
import Glibc
#endif

/// A routed device snapshotted again on demand (blksnap-nbd-serve's
/// --snapshot and SIGUSR1), with its difference storage in an unlinked
/// temporary file and an image that always reads the latest snapshot.
/// `take` runs on one thread at a time; `lock` guards `current` because
/// the image export reads it from connection threads.
public final class RollingSnapshot: @unchecked Sendable {
    let engine: Engine
    public let name: String
    let devId: DevId
    let storageId: DevId
    let storageSectors: UInt64
    public let image: LatestImage
    private let lock = Lock()
    private var current: UUID16?

    public init(engine: Engine, name: String, devId: DevId, storageId: DevId, size: UInt64) throws {
        self.engine = engine
        self.name = name
        self.devId = devId
        self.storageId = storageId
        // Room to copy every chunk once, plus the largest chunk for the
        // rounding at the end: the file is sparse, so it costs nothing.
        let bytes = (size &+ (64 << 20) &+ 511) & ~511
        storageSectors = bytes >> 9
        let directory = getenv("TMPDIR").map { String(cString: $0) } ?? "/tmp"
        var template = Array("\(directory)/blksnap-nbd-store-XXXXXX".utf8CString)
        let fd = mkstemp(&template)
        guard fd >= 0 else { throw BlksnapError(.init(rawValue: errno), "cannot create difference storage") }
        let path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        defer { unlink(path) }
        guard bytes <= UInt64(Int64.max), ftruncate(fd, off_t(bytes)) == 0 else {
            close(fd)
            throw BlksnapError(.init(rawValue: errno), "cannot size difference storage")
        }
        close(fd)
        // Routed, because the engine finds storage by device number; the
        // unlinked file lives as long as the descriptor inside.
        try engine.route(storageId, backing: FileBlockDevice(path: path))
        image = LatestImage(size: size)
        image.resolve = { [weak self] () throws(BlksnapError) -> SnapImage in
            guard let self, let id = lock.withLock({ current }), let image = engine.images(of: id).first else {
                throw BlksnapError(.operationNotSupportedByDevice, "no snapshot of \(name) right now")
            }
            return image
        }
    }

    /// Destroys the previous snapshot and takes a new one; tracking goes on
    /// across the gap, so the new read map covers it. Returns the number.
    public func take() throws(BlksnapError) -> UInt8 {
        if let old = lock.withLock({ current }) {
            lock.withLock { current = nil }
            try engine.destroySnapshot(old)
        }
        let id = try engine.createSnapshot([devId])
        try engine.appendStorage(id, device: storageId, ranges: [SectorRange(offset: 0, count: storageSectors)])
        try engine.takeSnapshot(id)
        lock.withLock { current = id }
        return engine.tracker(devId)!.cbtMap.snapNumberPrevious
    }
}

/// The image of whichever snapshot is current, looked up at each request
/// so the export survives a new snapshot.
public final class LatestImage: BlockDevice, @unchecked Sendable {
    public let size: UInt64
    var resolve: (@Sendable () throws(BlksnapError) -> SnapImage)!

    init(size: UInt64) { self.size = size }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        try resolve().read(into: buffer, at: offset)
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        throw BlksnapError(.readOnlyFileSystem, "the snapshot export is read-only")
    }

    public func flush() throws(BlksnapError) {}
}
