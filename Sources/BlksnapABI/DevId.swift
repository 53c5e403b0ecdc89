import CBlksnapABI

/// A block device as the interface names it: `major(st_rdev):minor(st_rdev)`.
///
/// The C counterpart is `struct blk_snap_dev_t`.
public struct DevId: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var major: UInt32
    public var minor: UInt32

    public init(major: UInt32, minor: UInt32) {
        self.major = major
        self.minor = minor
    }

    public init(_ c: blk_snap_dev_t) {
        self.init(major: c.mj, minor: c.mn)
    }

    public var c: blk_snap_dev_t { blk_snap_dev_t(mj: major, mn: minor) }

    public var description: String { "\(major):\(minor)" }

    public static func < (a: DevId, b: DevId) -> Bool {
        (a.major, a.minor) < (b.major, b.minor)
    }
}

/// A range of 512-byte sectors; the C counterpart is `struct blk_snap_block_range`.
public struct SectorRange: Hashable, Sendable {
    public var offset: UInt64
    public var count: UInt64

    public init(offset: UInt64, count: UInt64) {
        self.offset = offset
        self.count = count
    }

    public init(_ c: blk_snap_block_range) {
        self.init(offset: c.sector_offset, count: c.sector_count)
    }

    public var c: blk_snap_block_range { blk_snap_block_range(sector_offset: offset, sector_count: count) }
}

public let sectorShift: UInt64 = 9
public let sectorSize: UInt64 = 512
