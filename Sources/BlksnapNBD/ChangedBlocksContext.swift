import BlksnapEngine

/// The `blksnap:changed-since:N` metadata context: change block tracking
/// over NBD, so a standard client (`nbdinfo --map`, libnbd's
/// `block_status`) lists what changed between two snapshots.
///
/// **Name.** `blksnap:changed-since:` followed by N, a snapshot number in
/// decimal from 0 to 255 without sign or leading zeros (`0`, `7`, `255`;
/// not `007`, `+7` or `256`). Any such N is accepted by
/// NBD_OPT_SET_META_CONTEXT on an export that has a CBT source; other names
/// in the `blksnap:` namespace select nothing.
///
/// **Meaning.** The answer comes from the *read map* of the export's CBT
/// map, the map as it stood at the latest TAKE of a snapshot of the device
/// (upstream `cbt_map.c`): one byte per tracking block, holding the number
/// of the last snapshot during whose life the block was written. A block is
/// *changed* when its byte is greater than N. Each descriptor's status is
///
/// - bit 0 (`1`, "changed"): the block was written after snapshot N was
///   taken and before the latest snapshot was taken (or written through a
///   snapshot image, or marked dirty, since snapshot N);
/// - `0`: not written in that interval, as far as the map knows;
///
/// and every other bit is 0. So a backup tool that holds the image of
/// snapshot N and now reads the image of the latest snapshot copies exactly
/// the extents with bit 0 set. N = 0 lists every block written since the
/// device was first tracked (in this generation); N equal to the latest
/// snapshot number lists nothing.
///
/// Snapshot numbers are the map's: the first TAKE after a device starts
/// being tracked is snapshot 1, and each further TAKE adds one. After 255
/// TAKEs the numbers start again at 1 in a new generation with a zeroed
/// map (`CbtMap.switchMaps`); a tool must compare the generation id
/// (TRACKER_COLLECT) with the one it saw at its previous backup, as with
/// the blksnap ioctls, because N names a snapshot only within a generation.
///
/// **Extents.** Descriptors run from the request's offset over consecutive
/// bytes; boundaries fall on tracking-block boundaries (`CbtMap.blockSize`,
/// e.g. 64 KiB), except where the request starts or ends mid-block, and
/// adjacent blocks with equal flags are merged into one descriptor. A block
/// counts as changed as a whole, so a changed extent may include bytes
/// that were never written. With NBD_CMD_FLAG_REQ_ONE only the first
/// descriptor is sent; a long answer may also stop early (at 128 Ki
/// descriptors), as the spec allows, and the client asks again from where
/// it stopped.
///
/// **Listing.** NBD_OPT_LIST_META_CONTEXT with the query `blksnap:` (or
/// `blksnap:changed-since:`, or no query at all) lists
/// `blksnap:changed-since:N` for every N from 0 to the latest snapshot
/// number, i.e. every N for which the answer can be non-empty plus the
/// latest; nothing while the device is not tracked.
///
/// **Errors.** When the map cannot be read (the device is not tracked yet,
/// or the map is corrupted), BLOCK_STATUS fails with an error chunk
/// (EINVAL) rather than reporting "unchanged", which would make a backup
/// silently skip data.
///
/// Example: `nbdinfo --map=blksnap:changed-since:1 'nbd+unix:///disk?socket=/run/nbd.sock'`.
public enum ChangedBlocksContext {
    public static let namespace = "blksnap:"
    public static let prefix = "blksnap:changed-since:"

    /// The status bit of a changed extent.
    public static let changedFlag: UInt32 = 1

    public static func name(since n: UInt8) -> String { prefix + String(n) }

    /// N of a well-formed name, or nil.
    public static func parse(_ name: String) -> UInt8? {
        guard name.hasPrefix(prefix) else { return nil }
        let digits = name.utf8.dropFirst(prefix.utf8.count)
        guard (1...3).contains(digits.count), digits.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }),
              digits.count == 1 || digits.first != 0x30 else { return nil }
        return UInt8(String(decoding: digits, as: UTF8.self))
    }

    /// What LIST offers: N from 0 to the latest snapshot number, nothing
    /// while the map cannot be read.
    static func listed(_ export: Export) -> [UInt8] {
        guard let source = export.changes, let map = try? source() else { return [] }
        return Array(0...map.snapNumber)
    }

    /// The most descriptors one BLOCK_STATUS chunk carries (1 MiB of them).
    static let maxExtents = 131_072

    /// The extents of `offset..<offset+length`, which the caller has
    /// checked lies within the device.
    static func extents(export: Export, since n: UInt8, offset: UInt64, length: UInt32,
                        reqOne: Bool) throws(BlksnapError) -> [Extent] {
        guard let source = export.changes else {
            throw BlksnapError(.invalidArgument, "export \(export.name) has no change tracking")
        }
        return extents(map: try source(), since: n, offset: offset, length: length,
                       maxExtents: reqOne ? 1 : maxExtents)
    }

    /// Walks the tracking blocks under the range, merging equal neighbours.
    /// Blocks past the map (a device that grew) count as changed: the map
    /// cannot vouch for them.
    static func extents(map: CbtReadMap, since n: UInt8, offset: UInt64, length: UInt32,
                        maxExtents: Int) -> [Extent] {
        var out: [Extent] = []
        let end = offset + UInt64(length)
        let shift = UInt64(map.blockShift)
        var position = offset
        while position < end {
            let block = position >> shift
            let blockEnd = min((block + 1) << shift, end)
            let changed = block >= UInt64(map.bytes.count) || map.bytes[Int(block)] > n
            let flags = changed ? changedFlag : 0
            let run = UInt32(blockEnd - position)
            if let last = out.last, last.flags == flags {
                out[out.count - 1].length += run
            } else {
                if out.count == maxExtents { break }
                out.append(Extent(length: run, flags: flags))
            }
            position = blockEnd
        }
        return out
    }
}
