import BlksnapABI
import BlksnapEngine
import CBlksnapABI
import Glibc
import Testing
@testable import BlksnapCUSE

// Bad caller memory must give the module's errnos (ENODATA; EINVAL for the
// struct of APPEND_STORAGE and WAIT_EVENT), never the EFAULT the kernel
// would give for an iovec it cannot copy.

@Test func unknownCommandGivesENOTTYWithoutRetry() {
    let s = Session()
    let a = s.memory.reserve(64)
    #expect(s.kernel.ioctl(0x4008_560C, a) == -ENOTTY)   // number 12: the module's crash
    #expect(s.kernel.requests.count == 1)
    #expect(s.dispatches.count == 0)
}

@Test func thirtyTwoBitCallerGivesENOTTY() {
    let s = Session()
    let a = s.memory.reserve(8)
    #expect(s.kernel.ioctl(IoctlCommand.version.number, a, compat: true) == -ENOTTY)
    #expect(s.dispatches.count == 0)
}

@Test func badStructPointerGivesENODATA() {
    let s = Session()
    #expect(s.ioctl(.trackerRemove, unmapped) == -ENODATA)
    #expect(s.kernel.requests.count == 1)
    #expect(s.dispatches.count == 1)
}

@Test func badStructPointerOfAppendStorageGivesEINVAL() {
    let s = Session()
    #expect(s.ioctl(.snapshotAppendStorage, unmapped) == -EINVAL)
    #expect(s.kernel.requests.count == 1)
}

@Test func badStructPointerOfWaitEventGivesEINVAL() {
    let s = Session()
    #expect(s.ioctl(.snapshotWaitEvent, unmapped) == -EINVAL)
}

@Test func structRunningOffTheMappingGivesENODATA() {
    let s = Session()
    // 8 bytes where TRACKER_COLLECT needs 16.
    let a = s.memory.place([UInt8](repeating: 0, count: 8))
    #expect(s.ioctl(.trackerCollect, a) == -ENODATA)
}

@Test func badArrayPointerGivesENODATAAndCreatesNothing() {
    let s = Session()
    var arg = blk_snap_snapshot_create()
    arg.count = 1
    arg.dev_id_array = ptr(unmapped)
    let a = s.memory.place(c: arg)
    #expect(s.ioctl(.snapshotCreate, a) == -ENODATA)
    #expect(s.engine.collectSnapshots().isEmpty)
    #expect(s.kernel.retries.count == 1)
}

@Test func badOutputArrayGivesENODATAAndLeavesTheCount() {
    let s = Session()
    _ = s.snapshot([s.dev0, s.dev1])
    let a = s.memory.place(c: blk_snap_tracker_collect(count: 2, cbt_info_array: ptr(unmapped)))
    #expect(s.ioctl(.trackerCollect, a) == -ENODATA)
    #expect(s.memory.load(blk_snap_tracker_collect.self, at: a).count == 2)
}

@Test func readOnlyOutputArrayGivesENODATA() {
    let s = Session()
    _ = s.takenSnapshot(writingTo: s.devices[0])
    let buffer = s.memory.place([UInt8](repeating: untouched, count: 64), readOnly: true)
    let a = s.memory.place(c: blk_snap_tracker_read_cbt_bitmap(dev_id: s.dev0.c, offset: 0, length: 64, buff: ptr(buffer)))
    #expect(s.ioctl(.trackerReadCbtMap, a) == -ENODATA)
    #expect(s.memory.bytes(at: buffer, count: 64) == [UInt8](repeating: untouched, count: 64))
}

@Test func readOnlyStructOfVersionGivesENODATA() {
    let s = Session()
    let a = s.memory.place([UInt8](repeating: untouched, count: 8), readOnly: true)
    #expect(s.ioctl(.version, a) == -ENODATA)
    #expect(s.memory.bytes(at: a, count: 8) == [UInt8](repeating: untouched, count: 8))
}

@Test func arrayBeyondTheLimitGivesENOMEMWithoutDispatch() {
    let s = Session()
    let ranges = s.memory.reserve(16)
    let arg = blk_snap_tracker_mark_dirty_blocks(dev_id: s.dev0.c, count: UInt32.max, dirty_blocks_array: ptr(ranges))
    #expect(s.ioctl(.trackerMarkDirtyBlocks, s.memory.place(c: arg)) == -ENOMEM)
    #expect(s.dispatches.count == 0)
}

@Test func arrayWrappingTheAddressSpaceGivesENODATA() {
    let s = Session()
    var arg = blk_snap_snapshot_create()
    arg.count = 2
    arg.dev_id_array = ptr(UInt64.max - 7)
    #expect(s.ioctl(.snapshotCreate, s.memory.place(c: arg)) == -ENODATA)
    #expect(s.engine.collectSnapshots().isEmpty)
}

@Test func whenTheCallerCannotBeInspectedTheKernelsCopyDecides() {
    // EPERM from process_vm_readv: regions are named anyway, and a bad one
    // fails the ioctl with the kernel's EFAULT instead of being refused.
    let s = Session(blind: true)
    #expect(s.ioctl(.trackerRemove, unmapped) == -EFAULT)
    #expect(s.dispatches.count == 0)
    let a = s.memory.reserve(8)
    #expect(s.ioctl(.version, a) == 0)
}

@Test func arrayWrappingTheAddressSpaceGivesENODATAEvenWhenTheCallerCannotBeInspected() {
    // No copy can succeed there, so the region is not named (found by the
    // CUSE fuzz harness: a blind caller had it named, input and output).
    let s = Session(blind: true)
    _ = s.snapshot([s.dev0, s.dev1])
    let a = s.memory.place(c: blk_snap_tracker_collect(count: 2, cbt_info_array: ptr(UInt64.max - 7)))
    #expect(s.ioctl(.trackerCollect, a) == -ENODATA)
    #expect(s.kernel.retries.allSatisfy { $0.input.allSatisfy { $0.end != nil } })
    #expect(s.memory.load(blk_snap_tracker_collect.self, at: a).count == 2)
}
