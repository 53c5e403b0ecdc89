import BlksnapABI

/// The state bits of one chunk (upstream `chunk.h`), as GET_SECTOR_STATE
/// reports them in `chunk_state`.
///
/// A chunk is the unit of copy-on-write: before the first write to the
/// original lands in a chunk after TAKE, the whole chunk is copied to the
/// difference storage. The engine keeps exactly one state byte per chunk;
/// only `storeReady`, `loading`, `dirty` and `failed` are ever set, since
/// chunks go straight from the original to storage without a cache.
public struct ChunkState: OptionSet, Sendable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }

    public static let failed = ChunkState(rawValue: 1 << 0)
    /// Written through the snapshot image.
    public static let dirty = ChunkState(rawValue: 1 << 1)
    public static let bufferReady = ChunkState(rawValue: 1 << 2)
    /// The point-in-time copy is in the difference storage.
    public static let storeReady = ChunkState(rawValue: 1 << 3)
    /// Being copied: writers and image readers of the chunk wait.
    public static let loading = ChunkState(rawValue: 1 << 4)
    public static let storing = ChunkState(rawValue: 1 << 5)
}

/// One stripe of chunk locks. Chunk `i` belongs to stripe `i % stripeCount`,
/// so copies of different chunks proceed in parallel while one mutex per
/// stripe (not per chunk) keeps memory at a byte per chunk.
///
/// `lock` guards the state bytes of the stripe's chunks, `locations` (the
/// small record per stored chunk) and `originalReaders`: image reads that
/// are reading a not-yet-copied chunk from the original. A copy waits for
/// them to finish (`draining`) before it lets the original write land, and
/// new readers wait while it drains, so they cannot starve it.
final class ChunkStripe: @unchecked Sendable {
    let lock = Lock()
    let condition = Condition()
    var originalReaders = 0
    var draining = 0
    var locations: [UInt32: DiffRegion] = [:]
}
