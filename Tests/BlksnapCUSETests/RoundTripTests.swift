import BlksnapABI
import BlksnapEngine
import CBlksnapABI
import Glibc
import Testing
@testable import BlksnapCUSE

// Whole ioctls through the fake kernel's retry loop: what the caller finds
// in its memory afterwards, and how many rounds it took.

@Test func versionRoundTripWritesOneZeroZeroZero() {
    let s = Session()
    let a = s.memory.reserve(MemoryLayout<blk_snap_version>.size)
    #expect(s.ioctl(.version, a) == 0)
    let v = s.memory.load(blk_snap_version.self, at: a)
    #expect([v.major, v.minor, v.revision, v.build] == [1, 0, 0, 0])
    #expect(s.kernel.retries.count == 1)
    #expect(s.dispatches.count == 1)
}

@Test func snapshotCreateReturnsTheIdInTheCallersStruct() {
    let s = Session()
    let devs = [s.dev0, s.dev1]
    let array = s.memory.place(devs.flatMap { cBytes($0.c) })
    var arg = blk_snap_snapshot_create()
    arg.count = UInt32(devs.count)
    arg.dev_id_array = ptr(array)
    let a = s.memory.place(c: arg)

    #expect(s.ioctl(.snapshotCreate, a) == 0)
    let id = UUID16(bytes: s.memory.load(blk_snap_snapshot_create.self, at: a).id)
    #expect(id != .zero)
    #expect(s.engine.collectSnapshots() == [id])
    #expect(s.engine.snapshot(id)?.devIds == devs)
    // The array is input only: it is fetched, never written back.
    #expect(s.kernel.retries.count == 2)
    #expect(s.kernel.retries[1].output == [CallerRegion(address: a, count: 32)])
    #expect(s.memory.bytes(at: array, count: 16) == devs.flatMap { cBytes($0.c) })
}

@Test func snapshotCreateOfAnUnknownNumberGivesENXIO() {
    let s = Session()
    let array = s.memory.place(cBytes(DevId(major: 9, minor: 9).c))
    var arg = blk_snap_snapshot_create()
    arg.count = 1
    arg.dev_id_array = ptr(array)
    let a = s.memory.place(c: arg)
    #expect(s.ioctl(.snapshotCreate, a) == -ENXIO)
    #expect(s.engine.collectSnapshots().isEmpty)
}

@Test func trackerCollectWithNullArrayWritesTheCount() {
    let s = Session()
    _ = s.snapshot([s.dev0, s.dev1])
    let a = s.memory.place(c: blk_snap_tracker_collect(count: 0, cbt_info_array: nil))
    #expect(s.ioctl(.trackerCollect, a) == 0)
    #expect(s.memory.load(blk_snap_tracker_collect.self, at: a).count == 2)
    #expect(s.kernel.retries.count == 1)
}

@Test func trackerCollectIntoTooSmallArrayGivesENOBUFSAndLeavesTheCount() {
    let s = Session()
    _ = s.snapshot([s.dev0, s.dev1])
    let size = MemoryLayout<blk_snap_cbt_info>.size
    let array = s.memory.reserve(size)
    let a = s.memory.place(c: blk_snap_tracker_collect(count: 1, cbt_info_array: ptr(array)))
    #expect(s.ioctl(.trackerCollect, a) == -ENOBUFS)
    #expect(s.memory.load(blk_snap_tracker_collect.self, at: a).count == 1)
    #expect(s.memory.bytes(at: array, count: size) == [UInt8](repeating: untouched, count: size))
}

@Test func trackerCollectFillsTheArrayAndLeavesItsTail() {
    let s = Session()
    _ = s.snapshot([s.dev0, s.dev1])
    let size = MemoryLayout<blk_snap_cbt_info>.size
    let array = s.memory.reserve(4 * size)
    let a = s.memory.place(c: blk_snap_tracker_collect(count: 4, cbt_info_array: ptr(array)))
    #expect(s.ioctl(.trackerCollect, a) == 0)
    #expect(s.memory.load(blk_snap_tracker_collect.self, at: a).count == 2)
    let infos = (0..<2).map { CbtInfo(c: s.memory.load(blk_snap_cbt_info.self, at: array + UInt64($0 * size))) }
    #expect(infos.map(\.devId) == [s.dev0, s.dev1])
    #expect(s.memory.bytes(at: array + UInt64(2 * size), count: 2 * size) == [UInt8](repeating: untouched, count: 2 * size))
    #expect(s.kernel.retries.count == 2)
}

@Test func snapshotCollectWithNullIdsWritesTheCount() {
    let s = Session()
    _ = s.snapshot([s.dev0])
    _ = s.snapshot([s.dev1])
    let a = s.memory.place(c: blk_snap_snapshot_collect(count: 0, ids: nil))
    #expect(s.ioctl(.snapshotCollect, a) == 0)
    #expect(s.memory.load(blk_snap_snapshot_collect.self, at: a).count == 2)
}

@Test func snapshotCollectIntoTooSmallArrayGivesENODATAWithWhatFits() {
    let s = Session()
    let first = s.snapshot([s.dev0])
    _ = s.snapshot([s.dev1])
    let ids = s.memory.reserve(16)
    let a = s.memory.place(c: blk_snap_snapshot_collect(count: 1, ids: ptr(ids)))
    #expect(s.ioctl(.snapshotCollect, a) == -ENODATA)
    #expect(s.memory.load(blk_snap_snapshot_collect.self, at: a).count == 1)
    #expect(UUID16(array: s.memory.bytes(at: ids, count: 16)) == first)
}

@Test func readCbtMapWritesTheMapAndReturnsItsLength() {
    let s = Session()
    _ = s.takenSnapshot(writingTo: s.devices[0])
    let blocks = Int(s.engine.collectTrackers()[0].blockCount)
    let buffer = s.memory.reserve(blocks + 100)
    let arg = blk_snap_tracker_read_cbt_bitmap(dev_id: s.dev0.c, offset: 0, length: UInt32(blocks + 100), buff: ptr(buffer))
    let a = s.memory.place(c: arg)

    #expect(s.ioctl(.trackerReadCbtMap, a) == Int32(blocks))
    let map = s.memory.bytes(at: buffer, count: blocks + 100)
    #expect(map[0] == 1)
    #expect(map[1..<blocks].allSatisfy { $0 == 0 })
    #expect(map[blocks...].allSatisfy { $0 == untouched })
    // The struct is input only; the buffer is the one output.
    #expect(s.kernel.retries.last?.output == [CallerRegion(address: buffer, count: blocks + 100)])
}

@Test func waitEventCarriesTheWholePageInAndOut() {
    let s = Session()
    let id = s.snapshot([s.dev0])
    let a = s.memory.place(SnapshotEventArgument(id: id, timeoutMs: 100).wire)
    #expect(s.ioctl(.snapshotWaitEvent, a) == 0)
    let event = SnapshotEventArgument(wire: s.memory.bytes(at: a, count: SnapshotEventArgument.size))
    #expect(event.id == id)
    #expect(event.code == 0)
    #expect(event.timeLabel > 0)
    #expect(EventLowFreeSpace(wire: Array(event.data.prefix(8))).requestedSectors == 4096)
    #expect(s.kernel.retries.map(\.input) == [[CallerRegion(address: a, count: 4096)]])
    #expect(s.kernel.retries.map(\.output) == [[CallerRegion(address: a, count: 4096)]])
}

@Test func modAnswersOurNameAndFlags() {
    let s = Session()
    let a = s.memory.reserve(MemoryLayout<blk_snap_mod>.size)
    #expect(s.ioctl(.mod, a) == 0)
    let mod = ModInfo(c: s.memory.load(blk_snap_mod.self, at: a))
    #expect(mod.name == "blksnap-swift")
    #expect(mod.compatibilityFlags == 0x3)
}
