import BlksnapABI
import BlksnapEngine
import CBlksnapABI
import Glibc
import Testing
@testable import BlksnapCUSE

// The shape of the retry exchange itself: how many rounds, what each
// declares, and that the dispatcher runs once per ioctl.

private let arrayCommands = IoctlCommand.allCases.filter { $0.layout.ptr_offset >= 0 }

/// A struct for `command` whose pointer field designates `array` holding
/// `count` elements (all else zero).
private func argument(for command: IoctlCommand, count: UInt32, array: UInt64) -> [UInt8] {
    let layout = command.layout
    var bytes = [UInt8](repeating: 0, count: Int(layout.arg_size))
    if layout.ptr_offset >= 0 {
        withUnsafeBytes(of: count.littleEndian) { bytes.replaceSubrange(Int(layout.count_offset)..<Int(layout.count_offset) + 4, with: $0) }
        withUnsafeBytes(of: array.littleEndian) { bytes.replaceSubrange(Int(layout.ptr_offset)..<Int(layout.ptr_offset) + 8, with: $0) }
    }
    return bytes
}

@Test(arguments: IoctlCommand.allCases)
func withoutAnArrayOneRetryFetchesTheStruct(_ command: IoctlCommand) {
    let s = Session()
    let a = s.memory.place(argument(for: command, count: 0, array: 0))
    _ = s.ioctl(command, a)
    let size = Int(command.layout.arg_size)
    let isOutput = command.layout.arg_flow & BLKSNAP_ABI_OUT.rawValue != 0
    #expect(s.kernel.retries.count == 1)
    #expect(s.kernel.retries[0].input == [CallerRegion(address: a, count: size)])
    #expect(s.kernel.retries[0].output == (isOutput ? [CallerRegion(address: a, count: size)] : []))
    #expect(s.dispatches.count == 1)
}

@Test(arguments: arrayCommands)
func anArrayTakesExactlyOneMoreRetry(_ command: IoctlCommand) {
    let s = Session()
    let layout = command.layout
    let array = s.memory.place([UInt8](repeating: 0, count: Int(layout.elem_size)))
    let a = s.memory.place(argument(for: command, count: 1, array: array))
    _ = s.ioctl(command, a)
    #expect(s.kernel.retries.count == 2)
    let arrayRegion = CallerRegion(address: array, count: Int(layout.elem_size))
    #expect(s.kernel.retries[1].input == [CallerRegion(address: a, count: Int(layout.arg_size)), arrayRegion])
    #expect(s.kernel.retries[1].output.contains(arrayRegion) == (layout.ptr_flow & BLKSNAP_ABI_OUT.rawValue != 0))
    #expect(s.dispatches.count == 1)
}

@Test func everyOutputRegionIsFetchedAsInputToo() {
    let s = Session()
    _ = s.snapshot([s.dev0, s.dev1])
    let array = s.memory.reserve(4 * 48)
    let a = s.memory.place(c: blk_snap_tracker_collect(count: 4, cbt_info_array: ptr(array)))
    #expect(s.ioctl(.trackerCollect, a) == 0)
    for retry in s.kernel.retries {
        #expect(retry.output.allSatisfy { retry.input.contains($0) })
    }
}

@Test func theDispatcherRunsOncePerIoctlAcrossRetries() {
    let s = Session()
    for dev in [s.dev0, s.dev1] {
        let array = s.memory.place(cBytes(dev.c))
        var arg = blk_snap_snapshot_create()
        arg.count = 1
        arg.dev_id_array = ptr(array)
        #expect(s.ioctl(.snapshotCreate, s.memory.place(c: arg)) == 0)
        #expect(s.kernel.requests.count == 3)
    }
    #expect(s.dispatches.count == 2)
    #expect(s.engine.collectSnapshots().count == 2)
}

@Test func aStructChangedBetweenRoundsStartsOverInsteadOfMixing() {
    let s = Session()
    let array = s.memory.place([s.dev0, s.dev1].flatMap { cBytes($0.c) })
    var arg = blk_snap_snapshot_create()
    arg.count = 2
    arg.dev_id_array = ptr(array)
    let a = s.memory.place(c: arg)
    s.kernel.afterRetry = { round in
        // Another thread of the caller shrinks the list after the array was planned.
        if round == 2 {
            var changed = s.memory.load(blk_snap_snapshot_create.self, at: a)
            changed.count = 1
            s.memory.store(changed, at: a)
        }
    }
    #expect(s.ioctl(.snapshotCreate, a) == 0)
    #expect(s.dispatches.count == 1)
    let id = UUID16(bytes: s.memory.load(blk_snap_snapshot_create.self, at: a).id)
    #expect(s.engine.snapshot(id)?.devIds == [s.dev0])
}

@Test func anOutputArrayBeyondOneTransferIsWrittenDirectly() {
    // The CLI reads the CBT map into a 1 MiB buffer; CUSE moves 128 KiB.
    let s = Session()
    _ = s.takenSnapshot(writingTo: s.devices[0])
    let blocks = Int(s.engine.collectTrackers()[0].blockCount)
    let length = 1 << 20
    let buffer = s.memory.reserve(length)
    let arg = blk_snap_tracker_read_cbt_bitmap(dev_id: s.dev0.c, offset: 0, length: UInt32(length), buff: ptr(buffer))
    #expect(s.ioctl(.trackerReadCbtMap, s.memory.place(c: arg)) == Int32(blocks))
    #expect(s.kernel.retries.count == 1)
    #expect(s.caller.directWrites == 1)
    let map = s.memory.bytes(at: buffer, count: length)
    #expect(map[0] == 1)
    #expect(map[1..<blocks].allSatisfy { $0 == 0 })
    #expect(map[blocks...].allSatisfy { $0 == untouched })
}

@Test func anInputArrayBeyondOneTransferIsReadDirectly() {
    let s = Session()
    _ = s.snapshot([s.dev0])
    // 9000 ranges: 144000 bytes, past the 128 KiB one transfer can carry.
    let ranges = (0..<9000).map { SectorRange(offset: UInt64($0), count: 1) }
    let array = s.memory.place(ranges.flatMap { cBytes($0.c) })
    let arg = blk_snap_tracker_mark_dirty_blocks(dev_id: s.dev0.c, count: UInt32(ranges.count), dirty_blocks_array: ptr(array))
    #expect(s.ioctl(.trackerMarkDirtyBlocks, s.memory.place(c: arg)) == 0)
    #expect(s.kernel.retries.count == 1)
    #expect(s.caller.directReads == 1)
    #expect(s.dispatches.count == 1)
}

@Test func aSmallerTransferLimitMovesTheArrayOutOfTheRetries() {
    let s = Session(transferLimit: 4096)
    let array = s.memory.place([s.dev0, s.dev1].flatMap { cBytes($0.c) })
    var arg = blk_snap_snapshot_create()
    arg.count = 2
    arg.dev_id_array = ptr(array)
    let a = s.memory.place(c: arg)
    #expect(s.ioctl(.snapshotCreate, a) == 0)
    #expect(s.kernel.retries.count == 2)
    #expect(s.caller.directReads == 0)
}
