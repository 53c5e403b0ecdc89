import BlksnapABI
import CBlksnapABI
import Testing

// Every size and offset of ABI-v1.md, checked against what Swift imports
// from our header: a mismatch here breaks every existing tool.

private func offset<T>(_ path: PartialKeyPath<T>) -> Int? { MemoryLayout<T>.offset(of: path) }

@Suite struct LayoutTests {
    @Test func commandNumbersAreTheV1Numbers() {
        let expected: [(IoctlCommand, UInt32)] = [
            (.version, 0x4008_5600), (.trackerRemove, 0x4008_5601), (.trackerCollect, 0x4010_5602),
            (.trackerReadCbtMap, 0x8018_5603), (.trackerMarkDirtyBlocks, 0x8018_5604),
            (.snapshotCreate, 0x4020_5605), (.snapshotDestroy, 0x8010_5606),
            (.snapshotAppendStorage, 0x4028_5607), (.snapshotTake, 0x8010_5608),
            (.snapshotCollect, 0x4010_5609), (.snapshotCollectImages, 0x4020_560a),
            (.snapshotWaitEvent, 0x5000_560b), (.mod, 0x4028_5620), (.setlog, 0x4018_5621),
            (.getSectorState, 0x4018_5622),
        ]
        #expect(expected.count == IoctlCommand.allCases.count)
        for (command, number) in expected {
            #expect(command.number == number, "\(command)")
            #expect(IoctlCommand(number: number) == command)
        }
        #expect(IoctlCommand(number: 0x4008_560c) == nil)
        #expect(IoctlCommand(number: 0x4008_5800) == nil)
    }

    @Test func argumentSizesMatchTheNumbers() {
        // The size field of each number (bits 16..29) is the struct the
        // tools pass; the shared table must agree with both.
        for command in IoctlCommand.allCases {
            let encoded = (command.number >> 16) & 0x3FFF
            #expect(command.layout.arg_size == encoded, "\(command)")
        }
    }

    @Test func structSizes() {
        #expect(MemoryLayout<blk_snap_version>.size == 8)
        #expect(MemoryLayout<blk_snap_dev_t>.size == 8)
        #expect(MemoryLayout<blk_snap_tracker_remove>.size == 8)
        #expect(MemoryLayout<blk_snap_cbt_info>.size == 48)
        #expect(MemoryLayout<blk_snap_tracker_collect>.size == 16)
        #expect(MemoryLayout<blk_snap_tracker_read_cbt_bitmap>.size == 24)
        #expect(MemoryLayout<blk_snap_block_range>.size == 16)
        #expect(MemoryLayout<blk_snap_tracker_mark_dirty_blocks>.size == 24)
        #expect(MemoryLayout<blk_snap_snapshot_create>.size == 32)
        #expect(MemoryLayout<blk_snap_snapshot_destroy>.size == 16)
        #expect(MemoryLayout<blk_snap_snapshot_append_storage>.size == 40)
        #expect(MemoryLayout<blk_snap_snapshot_take>.size == 16)
        #expect(MemoryLayout<blk_snap_snapshot_collect>.size == 16)
        #expect(MemoryLayout<blk_snap_image_info>.size == 16)
        #expect(MemoryLayout<blk_snap_snapshot_collect_images>.size == 32)
        #expect(MemoryLayout<blk_snap_snapshot_event>.size == 4096)
        #expect(MemoryLayout<blk_snap_event_low_free_space>.size == 8)
        #expect(MemoryLayout<blk_snap_event_corrupted>.size == 12)
        #expect(MemoryLayout<blk_snap_mod>.size == 40)
        #expect(MemoryLayout<blk_snap_setlog>.size == 24)
        #expect(MemoryLayout<blk_snap_sector_state>.size == 8)
        #expect(MemoryLayout<blk_snap_get_sector_state>.size == 24)
    }

    @Test func structOffsets() {
        #expect(offset(\blk_snap_version.minor) == 2)
        #expect(offset(\blk_snap_version.revision) == 4)
        #expect(offset(\blk_snap_version.build) == 6)
        #expect(offset(\blk_snap_dev_t.mn) == 4)
        #expect(offset(\blk_snap_cbt_info.blk_size) == 8)
        #expect(offset(\blk_snap_cbt_info.device_capacity) == 16)
        #expect(offset(\blk_snap_cbt_info.blk_count) == 24)
        #expect(offset(\blk_snap_cbt_info.generation_id) == 28)
        #expect(offset(\blk_snap_cbt_info.snap_number) == 44)
        #expect(offset(\blk_snap_tracker_collect.cbt_info_array) == 8)
        #expect(offset(\blk_snap_tracker_read_cbt_bitmap.offset) == 8)
        #expect(offset(\blk_snap_tracker_read_cbt_bitmap.length) == 12)
        #expect(offset(\blk_snap_tracker_read_cbt_bitmap.buff) == 16)
        #expect(offset(\blk_snap_block_range.sector_count) == 8)
        #expect(offset(\blk_snap_tracker_mark_dirty_blocks.count) == 8)
        #expect(offset(\blk_snap_tracker_mark_dirty_blocks.dirty_blocks_array) == 16)
        #expect(offset(\blk_snap_snapshot_create.dev_id_array) == 8)
        #expect(offset(\blk_snap_snapshot_create.id) == 16)
        #expect(offset(\blk_snap_snapshot_append_storage.dev_id) == 16)
        #expect(offset(\blk_snap_snapshot_append_storage.count) == 24)
        #expect(offset(\blk_snap_snapshot_append_storage.ranges) == 32)
        #expect(offset(\blk_snap_snapshot_collect.ids) == 8)
        #expect(offset(\blk_snap_image_info.image_dev_id) == 8)
        #expect(offset(\blk_snap_snapshot_collect_images.count) == 16)
        #expect(offset(\blk_snap_snapshot_collect_images.image_info_array) == 24)
        #expect(offset(\blk_snap_snapshot_event.timeout_ms) == 16)
        #expect(offset(\blk_snap_snapshot_event.code) == 20)
        #expect(offset(\blk_snap_snapshot_event.time_label) == 24)
        #expect(offset(\blk_snap_snapshot_event.data) == 32)
        #expect(offset(\blk_snap_event_corrupted.err_code) == 8)
        #expect(offset(\blk_snap_mod.name) == 8)
        #expect(offset(\blk_snap_setlog.level) == 4)
        #expect(offset(\blk_snap_setlog.filepath_size) == 8)
        #expect(offset(\blk_snap_setlog.filepath) == 16)
        #expect(offset(\blk_snap_sector_state.snap_number_curr) == 1)
        #expect(offset(\blk_snap_sector_state.chunk_state) == 4)
        #expect(offset(\blk_snap_get_sector_state.sector) == 8)
        #expect(offset(\blk_snap_get_sector_state.state) == 16)
    }

    @Test func constantsAndEnums() {
        #expect(BLK_SNAP_MOD_NAME_LIMIT == 32)
        #expect(blk_snap_event_code_low_free_space.rawValue == 0)
        #expect(blk_snap_event_code_corrupted.rawValue == 1)
        #expect(ModInfo.flagDebugSectorState == 1)
        #expect(ModInfo.flagSetlog == 2)
        #expect(String(cString: BLK_SNAP_IMAGE_NAME) == "blksnap-image")
        #expect(String(cString: BLK_SNAP_MODULE_NAME) == "blksnap")
    }
}

@Suite struct WireStructTests {
    @Test func cbtInfoBytesSitAtTheirOffsets() {
        let id = UUID16(array: (1...16).map { UInt8($0) })
        let info = CbtInfo(devId: DevId(major: 0x0102_0304, minor: 5), blockSize: 0x10000,
                           deviceCapacity: 0x1122_3344_5566_7788, blockCount: 77, generationId: id, snapNumber: 9)
        let w = info.wire
        #expect(w.count == 48)
        #expect(Array(w[0..<4]) == [4, 3, 2, 1])
        #expect(Array(w[8..<12]) == [0, 0, 1, 0])
        #expect(Array(w[16..<24]) == [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11])
        #expect(w[24] == 77)
        #expect(Array(w[28..<44]) == id.array)
        #expect(w[44] == 9)
        #expect(CbtInfo(wire: w) == info)
    }

    @Test func pointerFieldsCarryCallerAddresses() {
        let arg = SnapshotAppendStorage(id: UUID16(array: [UInt8](repeating: 0xAB, count: 16)),
                                        devId: DevId(major: 8, minor: 16), count: 3, ranges: 0x7fff_1234_5678)
        let w = arg.wire
        #expect(w.count == 40)
        #expect(Array(w[32..<40]) == [0x78, 0x56, 0x34, 0x12, 0xff, 0x7f, 0, 0])
        let back = SnapshotAppendStorage(wire: w)
        #expect(back.ranges == 0x7fff_1234_5678 && back.count == 3 && back.devId == DevId(major: 8, minor: 16))
    }

    @Test func eventStructFillsOnePage() {
        let e = SnapshotEventArgument(id: .zero, timeoutMs: 100, code: 1, timeLabel: -2,
                                      data: EventCorrupted(origDevId: DevId(major: 7, minor: 1), errCode: 28).wire)
        let w = e.wire
        #expect(w.count == 4096)
        #expect(Array(w[16..<20]) == [100, 0, 0, 0])
        #expect(Array(w[20..<24]) == [1, 0, 0, 0])
        #expect(Array(w[24..<32]) == [0xFE] + [UInt8](repeating: 0xFF, count: 7))
        #expect(Array(w[32..<44]) == [7, 0, 0, 0, 1, 0, 0, 0, 28, 0, 0, 0])
        #expect(SnapshotEventArgument(wire: w).timeLabel == -2)
    }

    @Test func modNameIsNulTerminatedWithinItsLimit() {
        let m = ModInfo(compatibilityFlags: 3, name: "blksnap-swift")
        let w = m.wire
        #expect(w.count == 40)
        #expect(Array(w[8..<21]) == Array("blksnap-swift".utf8))
        #expect(w[21] == 0)
        #expect(ModInfo(wire: w) == m)
    }

    @Test func sharedPointerTableNamesEveryArray() {
        // The shim and CUSE ship exactly these caller arrays; Swift and C
        // read the same table.
        let arrays: [(IoctlCommand, Int32, UInt32, UInt32)] = [
            (.trackerCollect, 8, 0, 48), (.trackerReadCbtMap, 16, 12, 1), (.trackerMarkDirtyBlocks, 16, 8, 16),
            (.snapshotCreate, 8, 0, 8), (.snapshotAppendStorage, 32, 24, 16), (.snapshotCollect, 8, 0, 16),
            (.snapshotCollectImages, 24, 16, 16), (.setlog, 16, 8, 1),
        ]
        for command in IoctlCommand.allCases {
            let row = command.layout
            if let a = arrays.first(where: { $0.0 == command }) {
                #expect(row.ptr_offset == a.1 && row.count_offset == a.2 && row.elem_size == a.3, "\(command)")
            } else {
                #expect(row.ptr_offset == -1, "\(command)")
            }
        }
    }
}

@Suite struct ByteCountTests {
    @Test func sizesParseAsPeopleWriteThem() {
        #expect(ByteCount("1048576")?.bytes == 1 << 20)
        #expect(ByteCount("512M")?.bytes == 512 << 20)
        #expect(ByteCount("10g")?.bytes == 10 << 30)
        #expect(ByteCount("16777215T")?.bytes == 16_777_215 << 40)
    }

    @Test(arguments: ["", "M", "10X", "-1", "1.5G", "16777216T", "18446744073709551616"])
    func otherTextIsNil(text: String) {
        #expect(ByteCount(text) == nil)
    }
}
