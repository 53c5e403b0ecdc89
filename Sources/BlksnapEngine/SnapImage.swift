import BlksnapABI
import Synchronization

/// The point-in-time view of one device in a taken snapshot (upstream
/// `snapimage.c`): readable and writable, capacity equal to the original.
///
/// Reads return the stored copy of a chunk where one exists, else the
/// original; writes go to the difference storage and mark both CBT tables,
/// never the original. Frontends publish it as a block device, whose
/// major:minor becomes `devId`.
public final class SnapImage: BlockDevice, @unchecked Sendable {
    public let originalDevId: DevId
    public let size: UInt64
    let diffArea: DiffArea
    let cbtMap: CbtMap
    private let closed = Atomic<Bool>(false)
    private let devIdLock = Lock()
    private var _devId = DevId(major: 0, minor: 0)

    init(diffArea: DiffArea, cbtMap: CbtMap) {
        self.originalDevId = diffArea.devId
        self.size = diffArea.capacity
        self.diffArea = diffArea
        self.cbtMap = cbtMap
    }

    /// The image's block device number, as COLLECT_IMAGES reports it.
    public internal(set) var devId: DevId {
        get { devIdLock.withLock { _devId } }
        set { devIdLock.withLock { _devId = newValue } }
    }

    public var isCorrupted: Bool { diffArea.isCorrupted }

    /// The copy-on-write unit of this image, in bytes.
    public var chunkSize: Int { diffArea.chunkSize }

    func close() { closed.store(true, ordering: .releasing) }

    private func checkOpen() throws(BlksnapError) {
        if closed.load(ordering: .acquiring) {
            throw BlksnapError(.operationNotSupportedByDevice, "snapshot image of \(originalDevId) was destroyed")
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        try checkOpen()
        try diffArea.readImage(into: buffer, at: offset)
    }

    /// `DiffArea.withImageFileRanges` for a frontend that splices; false
    /// (the caller reads with `read`) once the image is destroyed.
    public func withFileRanges(at offset: UInt64, count: Int,
                               _ body: ([DiffArea.FileRange]) -> Void) -> Bool {
        guard !closed.load(ordering: .acquiring) else { return false }
        return diffArea.withImageFileRanges(offset: offset, count: count, body)
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        try checkOpen()
        // Marked first, as an original write is, so that a write failing
        // after part of it reached the storage still shows in the CBT.
        try diffArea.writeImage(buffer, at: offset) { () throws(BlksnapError) in
            try cbtMap.setBoth(offset: offset, length: UInt64(buffer.count))
        }
    }

    public func flush() throws(BlksnapError) {
        try checkOpen()
        guard !diffArea.isCorrupted else { throw BlksnapError(.ioError, "snapshot of \(originalDevId) is corrupted") }
    }

    /// GET_SECTOR_STATE for a sector of this image.
    public func sectorState(sector: UInt64) throws(BlksnapError) -> SectorState {
        let state = try diffArea.chunkState(sector: sector)
        let numbers = try cbtMap.sectorState(sector: sector)
        return SectorState(snapNumberPrev: numbers.previous, snapNumberCurr: numbers.current,
                           chunkState: UInt32(state.rawValue))
    }
}
