import CBlksnapABI

// Swift values of the C structs, one per struct, with the C field names in
// Swift case. Pointer fields are caller addresses (UInt64): the engine never
// dereferences them, it asks CallerMemory.

/// `struct blk_snap_version`.
public struct Version: WireStruct, Equatable {
    public var major, minor, revision, build: UInt16
    public init(major: UInt16, minor: UInt16, revision: UInt16, build: UInt16) {
        (self.major, self.minor, self.revision, self.build) = (major, minor, revision, build)
    }
    public init(c: blk_snap_version) { self.init(major: c.major, minor: c.minor, revision: c.revision, build: c.build) }
    public var c: blk_snap_version { blk_snap_version(major: major, minor: minor, revision: revision, build: build) }
}

/// `struct blk_snap_tracker_remove`.
public struct TrackerRemove: WireStruct {
    public var devId: DevId
    public init(devId: DevId) { self.devId = devId }
    public init(c: blk_snap_tracker_remove) { devId = DevId(c.dev_id) }
    public var c: blk_snap_tracker_remove { blk_snap_tracker_remove(dev_id: devId.c) }
}

/// `struct blk_snap_cbt_info`: one tracker as TRACKER_COLLECT reports it.
public struct CbtInfo: WireStruct, Equatable {
    public var devId: DevId
    public var blockSize: UInt32
    public var deviceCapacity: UInt64
    public var blockCount: UInt32
    public var generationId: UUID16
    public var snapNumber: UInt8
    public init(devId: DevId, blockSize: UInt32, deviceCapacity: UInt64, blockCount: UInt32,
                generationId: UUID16, snapNumber: UInt8) {
        self.devId = devId
        self.blockSize = blockSize
        self.deviceCapacity = deviceCapacity
        self.blockCount = blockCount
        self.generationId = generationId
        self.snapNumber = snapNumber
    }
    public init(c: blk_snap_cbt_info) {
        self.init(devId: DevId(c.dev_id), blockSize: c.blk_size, deviceCapacity: c.device_capacity,
                  blockCount: c.blk_count, generationId: UUID16(bytes: c.generation_id), snapNumber: c.snap_number)
    }
    public var c: blk_snap_cbt_info {
        blk_snap_cbt_info(dev_id: devId.c, blk_size: blockSize, device_capacity: deviceCapacity,
                          blk_count: blockCount, generation_id: generationId.bytes, snap_number: snapNumber)
    }
}

/// `struct blk_snap_tracker_collect`.
public struct TrackerCollect: WireStruct {
    public var count: UInt32
    public var cbtInfoArray: UInt64
    public init(count: UInt32, cbtInfoArray: UInt64) { (self.count, self.cbtInfoArray) = (count, cbtInfoArray) }
    public init(c: blk_snap_tracker_collect) { self.init(count: c.count, cbtInfoArray: address(c.cbt_info_array)) }
    public var c: blk_snap_tracker_collect { blk_snap_tracker_collect(count: count, cbt_info_array: pointer(cbtInfoArray)) }
}

/// `struct blk_snap_tracker_read_cbt_bitmap`.
public struct TrackerReadCbtBitmap: WireStruct {
    public var devId: DevId
    public var offset: UInt32
    public var length: UInt32
    public var buff: UInt64
    public init(devId: DevId, offset: UInt32, length: UInt32, buff: UInt64) {
        (self.devId, self.offset, self.length, self.buff) = (devId, offset, length, buff)
    }
    public init(c: blk_snap_tracker_read_cbt_bitmap) {
        self.init(devId: DevId(c.dev_id), offset: c.offset, length: c.length, buff: address(c.buff))
    }
    public var c: blk_snap_tracker_read_cbt_bitmap {
        blk_snap_tracker_read_cbt_bitmap(dev_id: devId.c, offset: offset, length: length, buff: pointer(buff))
    }
}

/// `struct blk_snap_block_range`.
extension SectorRange: WireStruct {
    public init(c: blk_snap_block_range) { self.init(c) }
}

/// `struct blk_snap_dev_t`.
extension DevId: WireStruct {
    public init(c: blk_snap_dev_t) { self.init(c) }
}

/// `struct blk_snap_tracker_mark_dirty_blocks`.
public struct TrackerMarkDirtyBlocks: WireStruct {
    public var devId: DevId
    public var count: UInt32
    public var dirtyBlocksArray: UInt64
    public init(devId: DevId, count: UInt32, dirtyBlocksArray: UInt64) {
        (self.devId, self.count, self.dirtyBlocksArray) = (devId, count, dirtyBlocksArray)
    }
    public init(c: blk_snap_tracker_mark_dirty_blocks) {
        self.init(devId: DevId(c.dev_id), count: c.count, dirtyBlocksArray: address(c.dirty_blocks_array))
    }
    public var c: blk_snap_tracker_mark_dirty_blocks {
        blk_snap_tracker_mark_dirty_blocks(dev_id: devId.c, count: count, dirty_blocks_array: pointer(dirtyBlocksArray))
    }
}

/// `struct blk_snap_snapshot_create`.
public struct SnapshotCreate: WireStruct {
    public var count: UInt32
    public var devIdArray: UInt64
    public var id: UUID16
    public init(count: UInt32, devIdArray: UInt64, id: UUID16 = .zero) {
        (self.count, self.devIdArray, self.id) = (count, devIdArray, id)
    }
    public init(c: blk_snap_snapshot_create) {
        self.init(count: c.count, devIdArray: address(c.dev_id_array), id: UUID16(bytes: c.id))
    }
    public var c: blk_snap_snapshot_create {
        blk_snap_snapshot_create(count: count, dev_id_array: pointer(devIdArray), id: id.bytes)
    }
}

/// `struct blk_snap_snapshot_destroy` and `struct blk_snap_snapshot_take`
/// (one layout: the id alone).
public struct SnapshotIdArgument: WireStruct {
    public var id: UUID16
    public init(id: UUID16) { self.id = id }
    public init(c: blk_snap_snapshot_take) { id = UUID16(bytes: c.id) }
    public var c: blk_snap_snapshot_take { blk_snap_snapshot_take(id: id.bytes) }
}

/// `struct blk_snap_snapshot_append_storage`.
public struct SnapshotAppendStorage: WireStruct {
    public var id: UUID16
    public var devId: DevId
    public var count: UInt32
    public var ranges: UInt64
    public init(id: UUID16, devId: DevId, count: UInt32, ranges: UInt64) {
        (self.id, self.devId, self.count, self.ranges) = (id, devId, count, ranges)
    }
    public init(c: blk_snap_snapshot_append_storage) {
        self.init(id: UUID16(bytes: c.id), devId: DevId(c.dev_id), count: c.count, ranges: address(c.ranges))
    }
    public var c: blk_snap_snapshot_append_storage {
        blk_snap_snapshot_append_storage(id: id.bytes, dev_id: devId.c, count: count, ranges: pointer(ranges))
    }
}

/// `struct blk_snap_snapshot_collect`.
public struct SnapshotCollect: WireStruct {
    public var count: UInt32
    public var ids: UInt64
    public init(count: UInt32, ids: UInt64) { (self.count, self.ids) = (count, ids) }
    public init(c: blk_snap_snapshot_collect) { self.init(count: c.count, ids: address(c.ids)) }
    public var c: blk_snap_snapshot_collect { blk_snap_snapshot_collect(count: count, ids: pointer(ids)) }
}

/// `struct blk_snap_image_info`.
public struct ImageInfo: WireStruct, Equatable {
    public var origDevId: DevId
    public var imageDevId: DevId
    public init(origDevId: DevId, imageDevId: DevId) { (self.origDevId, self.imageDevId) = (origDevId, imageDevId) }
    public init(c: blk_snap_image_info) { self.init(origDevId: DevId(c.orig_dev_id), imageDevId: DevId(c.image_dev_id)) }
    public var c: blk_snap_image_info { blk_snap_image_info(orig_dev_id: origDevId.c, image_dev_id: imageDevId.c) }
}

/// `struct blk_snap_snapshot_collect_images`.
public struct SnapshotCollectImages: WireStruct {
    public var id: UUID16
    public var count: UInt32
    public var imageInfoArray: UInt64
    public init(id: UUID16, count: UInt32, imageInfoArray: UInt64) {
        (self.id, self.count, self.imageInfoArray) = (id, count, imageInfoArray)
    }
    public init(c: blk_snap_snapshot_collect_images) {
        self.init(id: UUID16(bytes: c.id), count: c.count, imageInfoArray: address(c.image_info_array))
    }
    public var c: blk_snap_snapshot_collect_images {
        blk_snap_snapshot_collect_images(id: id.bytes, count: count, image_info_array: pointer(imageInfoArray))
    }
}

/// `struct blk_snap_snapshot_event`: one page. Its 4064-byte data array is
/// kept as bytes; the offsets come from the C type.
public struct SnapshotEventArgument: Sendable {
    public var id: UUID16
    public var timeoutMs: UInt32
    public var code: UInt32
    public var timeLabel: Int64
    public var data: [UInt8]

    public static let size = MemoryLayout<blk_snap_snapshot_event>.size
    static let codeOffset = MemoryLayout<blk_snap_snapshot_event>.offset(of: \.code)!
    static let timeoutOffset = MemoryLayout<blk_snap_snapshot_event>.offset(of: \.timeout_ms)!
    static let timeLabelOffset = MemoryLayout<blk_snap_snapshot_event>.offset(of: \.time_label)!
    static let dataOffset = MemoryLayout<blk_snap_snapshot_event>.offset(of: \.data)!
    public static let dataCapacity = size - dataOffset

    public init(id: UUID16, timeoutMs: UInt32, code: UInt32 = 0, timeLabel: Int64 = 0, data: [UInt8] = []) {
        (self.id, self.timeoutMs, self.code, self.timeLabel, self.data) = (id, timeoutMs, code, timeLabel, data)
    }

    public init(wire bytes: [UInt8]) {
        precondition(bytes.count == Self.size)
        self = bytes.withUnsafeBytes { raw in
            SnapshotEventArgument(
                id: UUID16(array: raw[0..<16]),
                timeoutMs: raw.loadUnaligned(fromByteOffset: Self.timeoutOffset, as: UInt32.self),
                code: raw.loadUnaligned(fromByteOffset: Self.codeOffset, as: UInt32.self),
                timeLabel: raw.loadUnaligned(fromByteOffset: Self.timeLabelOffset, as: Int64.self),
                data: Array(raw[Self.dataOffset...]))
        }
    }

    public var wire: [UInt8] {
        var out = [UInt8](repeating: 0, count: Self.size)
        out.withUnsafeMutableBytes { raw in
            for (i, b) in id.array.enumerated() { raw[i] = b }
            raw.storeBytes(of: timeoutMs, toByteOffset: Self.timeoutOffset, as: UInt32.self)
            raw.storeBytes(of: code, toByteOffset: Self.codeOffset, as: UInt32.self)
            raw.storeBytes(of: timeLabel, toByteOffset: Self.timeLabelOffset, as: Int64.self)
            for (i, b) in data.prefix(Self.dataCapacity).enumerated() { raw[Self.dataOffset + i] = b }
        }
        return out
    }
}

/// `struct blk_snap_event_low_free_space`.
public struct EventLowFreeSpace: WireStruct, Equatable {
    public var requestedSectors: UInt64
    public init(requestedSectors: UInt64) { self.requestedSectors = requestedSectors }
    public init(c: blk_snap_event_low_free_space) { requestedSectors = c.requested_nr_sect }
    public var c: blk_snap_event_low_free_space { blk_snap_event_low_free_space(requested_nr_sect: requestedSectors) }
}

/// `struct blk_snap_event_corrupted`.
public struct EventCorrupted: WireStruct, Equatable {
    public var origDevId: DevId
    public var errCode: Int32
    public init(origDevId: DevId, errCode: Int32) { (self.origDevId, self.errCode) = (origDevId, errCode) }
    public init(c: blk_snap_event_corrupted) { self.init(origDevId: DevId(c.orig_dev_id), errCode: c.err_code) }
    public var c: blk_snap_event_corrupted { blk_snap_event_corrupted(orig_dev_id: origDevId.c, err_code: errCode) }
}

/// `enum blk_snap_event_codes`.
public enum EventCode: UInt32, Sendable {
    case lowFreeSpace = 0
    case corrupted = 1
}

/// `struct blk_snap_mod`.
public struct ModInfo: WireStruct, Equatable {
    public var compatibilityFlags: UInt64
    public var name: String
    public static let nameLimit = Int(BLK_SNAP_MOD_NAME_LIMIT)
    public static let flagDebugSectorState: UInt64 = 1 << UInt64(blk_snap_compat_flag_debug_sector_state.rawValue)
    public static let flagSetlog: UInt64 = 1 << UInt64(blk_snap_compat_flag_setlog.rawValue)
    public init(compatibilityFlags: UInt64, name: String) { (self.compatibilityFlags, self.name) = (compatibilityFlags, name) }
    public init(c: blk_snap_mod) {
        let bytes = withUnsafeBytes(of: c.name) { Array($0) }
        self.init(compatibilityFlags: c.compatibility_flags,
                  name: String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self))
    }
    public var c: blk_snap_mod {
        var m = blk_snap_mod()
        m.compatibility_flags = compatibilityFlags
        withUnsafeMutableBytes(of: &m.name) { raw in
            for (i, b) in name.utf8.prefix(Self.nameLimit - 1).enumerated() { raw[i] = b }
        }
        return m
    }
}

/// `struct blk_snap_setlog`.
public struct SetLog: WireStruct {
    public var tzMinutesWest: Int32
    public var level: UInt32
    public var filepathSize: UInt32
    public var filepath: UInt64
    public init(tzMinutesWest: Int32, level: UInt32, filepathSize: UInt32, filepath: UInt64) {
        (self.tzMinutesWest, self.level, self.filepathSize, self.filepath) = (tzMinutesWest, level, filepathSize, filepath)
    }
    public init(c: blk_snap_setlog) {
        self.init(tzMinutesWest: c.tz_minuteswest, level: c.level, filepathSize: c.filepath_size, filepath: address(c.filepath))
    }
    public var c: blk_snap_setlog {
        blk_snap_setlog(tz_minuteswest: tzMinutesWest, level: level, filepath_size: filepathSize, filepath: pointer(filepath))
    }
}

/// `struct blk_snap_sector_state`.
public struct SectorState: WireStruct, Equatable {
    public var snapNumberPrev: UInt8
    public var snapNumberCurr: UInt8
    public var chunkState: UInt32
    public init(snapNumberPrev: UInt8, snapNumberCurr: UInt8, chunkState: UInt32) {
        (self.snapNumberPrev, self.snapNumberCurr, self.chunkState) = (snapNumberPrev, snapNumberCurr, chunkState)
    }
    public init(c: blk_snap_sector_state) {
        self.init(snapNumberPrev: c.snap_number_prev, snapNumberCurr: c.snap_number_curr, chunkState: c.chunk_state)
    }
    public var c: blk_snap_sector_state {
        blk_snap_sector_state(snap_number_prev: snapNumberPrev, snap_number_curr: snapNumberCurr, chunk_state: chunkState)
    }
}

/// `struct blk_snap_get_sector_state`.
public struct GetSectorState: WireStruct {
    public var imageDevId: DevId
    public var sector: UInt64
    public var state: SectorState
    public init(imageDevId: DevId, sector: UInt64, state: SectorState = SectorState(snapNumberPrev: 0, snapNumberCurr: 0, chunkState: 0)) {
        (self.imageDevId, self.sector, self.state) = (imageDevId, sector, state)
    }
    public init(c: blk_snap_get_sector_state) {
        self.init(imageDevId: DevId(c.image_dev_id), sector: c.sector, state: SectorState(c: c.state))
    }
    public var c: blk_snap_get_sector_state {
        blk_snap_get_sector_state(image_dev_id: imageDevId.c, sector: sector, state: state.c)
    }
}
