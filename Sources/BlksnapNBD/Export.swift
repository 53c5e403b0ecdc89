import BlksnapABI
import BlksnapEngine

/// The read map of a CBT map at one instant, as BLOCK_STATUS needs it.
public struct CbtReadMap: Sendable {
    /// One byte per tracking block: the number of the last snapshot during
    /// whose life the block was written (see `CbtMap`).
    public var bytes: [UInt8]
    public var blockShift: Int
    /// The number of the latest taken snapshot (`CbtMap.snapNumberPrevious`):
    /// no byte of the read map is above it.
    public var snapNumber: UInt8

    public init(bytes: [UInt8], blockShift: Int, snapNumber: UInt8) {
        self.bytes = bytes
        self.blockShift = blockShift
        self.snapNumber = snapNumber
    }
}

/// Gives the current read map each time BLOCK_STATUS asks, so a TAKE
/// between two requests shows in the second.
public typealias CbtSource = @Sendable () throws(BlksnapError) -> CbtReadMap

/// One export of the server: a name the client asks for and the device
/// behind it.
///
/// The device is usually a `RoutedDevice` (so writes are tracked and
/// copied on write) or a `SnapImage`. `changes`, when present, offers the
/// `blksnap:changed-since:N` metadata contexts (`ChangedBlocksContext`).
public struct Export: Sendable {
    public var name: String
    public var description: String
    public var device: any BlockDevice
    public var readOnly: Bool
    /// Whether a discard of the device reads back as zeros, so that
    /// WRITE_ZEROES without NO_HOLE may discard instead of writing. The
    /// `BlockDevice` protocol promises nothing of the kind (BLKDISCARD on
    /// many disks does not zero), so it is off unless the caller knows.
    public var discardZeroes: Bool
    public var changes: CbtSource?

    public init(name: String, description: String = "", device: any BlockDevice, readOnly: Bool = false,
                discardZeroes: Bool = false, changes: CbtSource? = nil) {
        self.name = name
        self.description = description
        self.device = device
        self.readOnly = readOnly
        self.discardZeroes = discardZeroes
        self.changes = changes
    }

    /// The minimum block size we announce: the device's alignment, which
    /// is 1 for anything not opened O_DIRECT.
    var minimumBlockSize: UInt32 { UInt32(max(device.alignment, 1)) }

    /// The transmission flags of this export on a connection.
    public func transmissionFlags(structuredReplies: Bool) -> UInt16 {
        // CAN_MULTI_CONN: a FLUSH on one connection makes durable what
        // every connection acknowledged (Connection's flush says why).
        var flags = NBD.flagHasFlags | NBD.flagSendFlush | NBD.flagCanMultiConn
        if readOnly {
            flags |= NBD.flagReadOnly
        } else {
            flags |= NBD.flagSendFUA | NBD.flagSendTrim | NBD.flagSendWriteZeroes
        }
        // One content chunk per READ is all we ever send, so "don't
        // fragment" costs nothing to honour.
        if structuredReplies { flags |= NBD.flagSendDF }
        return flags
    }
}

extension Export {
    /// The CBT source of a routed device in `engine`: the tracker is looked
    /// up at every request, because it comes with the first snapshot that
    /// names the device and may come after the export was published.
    public static func cbtSource(engine: Engine, devId: DevId) -> CbtSource {
        { () throws(BlksnapError) -> CbtReadMap in
            guard let map = engine.tracker(devId)?.cbtMap else {
                throw BlksnapError(.noData, "device \(devId) is not tracked")
            }
            // Two reads, not one snapshot of both: a TAKE in between only
            // makes LIST offer one number too few, never wrong extents.
            let snapNumber = map.snapNumberPrevious
            let bytes = try map.read(offset: 0, length: UInt32(map.blockCount))
            return CbtReadMap(bytes: bytes, blockShift: map.blockShift, snapNumber: snapNumber)
        }
    }
}
