/// A byte range of a device.
public struct ByteExtent: Equatable, Sendable, CustomStringConvertible {
    public var offset: UInt64
    public var length: UInt64
    public init(offset: UInt64, length: UInt64) { (self.offset, self.length) = (offset, length) }
    public var end: UInt64 { offset + length }
    public var description: String { "\(offset)+\(length)" }
}

/// Which parts of a device an incremental backup copies, from the CBT map
/// that TRACKER_READ_CBT_MAP returns after TAKE.
///
/// A block's byte is the snap number of the last snapshot during which it
/// was written; the previous backup recorded the snap number of its own
/// TAKE, P. Every block written since then has a byte greater than P (the
/// numbers only grow within one generation; a wrap past 255 draws a new
/// generation id, which forces a full backup before this is ever asked).
public enum ChangedExtents {
    /// The extents whose blocks changed after snapshot `since`, neighbours
    /// merged, the last one cut at the device's end.
    public static func since(_ since: UInt8, map: [UInt8], blockSize: UInt64, capacity: UInt64) -> [ByteExtent] {
        precondition(blockSize > 0)
        var out: [ByteExtent] = []
        var runStart: Int? = nil
        func close(_ end: Int) {
            guard let start = runStart else { return }
            let offset = UInt64(start) * blockSize
            let stop = min(UInt64(end) * blockSize, capacity)
            if stop > offset { out.append(ByteExtent(offset: offset, length: stop - offset)) }
            runStart = nil
        }
        for (i, byte) in map.enumerated() {
            if byte > since {
                if runStart == nil { runStart = i }
            } else {
                close(i)
            }
        }
        close(map.count)
        return out
    }

    /// Splits extents into pieces of at most `piece` bytes, aligned to
    /// `piece` where the extent allows, so reads and writes stay large.
    public static func pieces(of extents: [ByteExtent], piece: UInt64) -> [ByteExtent] {
        precondition(piece > 0)
        var out: [ByteExtent] = []
        for e in extents {
            var offset = e.offset
            while offset < e.end {
                let boundary = (offset / piece + 1) * piece
                let stop = min(e.end, boundary)
                out.append(ByteExtent(offset: offset, length: stop - offset))
                offset = stop
            }
        }
        return out
    }

    public static func total(_ extents: [ByteExtent]) -> UInt64 { extents.reduce(0) { $0 + $1.length } }
}
