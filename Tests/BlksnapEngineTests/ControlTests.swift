import BlksnapABI
import BlksnapEngine
import CBlksnapABI
import Dispatch
import Glibc
import Logging
import Testing

// The dispatcher driven as a C caller drives /dev/blksnap: argument bytes
// are those of the C structs of <blksnap/blk_snap.h> (or of their Swift
// wire twins), request numbers are the exact ioctl numbers, and every errno
// is compared by its Glibc name, so that each test can be read against the
// "Errnos and results" table of shared/ABI-v1.md.

// MARK: - helpers

/// The bytes of a C value, as a caller's struct sits in its memory.
private func cBytes<T>(_ value: T) -> [UInt8] {
    withUnsafeBytes(of: value) { Array($0) }
}

/// A C value read back from caller bytes.
private func cValue<T>(_ type: T.Type, _ bytes: [UInt8]) -> T {
    precondition(bytes.count == MemoryLayout<T>.size)
    let scratch = UnsafeMutableRawPointer.allocate(byteCount: bytes.count, alignment: MemoryLayout<T>.alignment)
    defer { scratch.deallocate() }
    bytes.withUnsafeBytes { scratch.copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
    return scratch.load(as: T.self)
}

/// A C pointer field holding a caller address.
private func ptr<T>(_ address: UInt64) -> UnsafeMutablePointer<T>? {
    UnsafeMutablePointer(bitPattern: UInt(address))
}

private func le32(_ bytes: [UInt8], _ at: Int) -> UInt32 {
    (0..<4).reduce(0) { $0 | UInt32(bytes[at + $1]) << (8 * UInt32($1)) }
}

private func le64(_ bytes: [UInt8], _ at: Int) -> UInt64 {
    (0..<8).reduce(0) { $0 | UInt64(bytes[at + $1]) << (8 * UInt64($1)) }
}

private func uuid(_ id: UUID16) -> uuid_t { id.bytes }

/// An address nothing is mapped at.
private let unmapped: UInt64 = 0xdead_0000
/// A device number with no device behind it.
private let nowhere = DevId(major: 9, minor: 9)
/// What FakeMemory.reserve fills a fresh buffer with.
private let untouched: UInt8 = 0xEE

/// Memory the caller may read but not write: copy_to_user fails.
private struct ReadOnlyMemory: CallerMemory {
    let base: FakeMemory
    func read(at address: UInt64, count: Int) -> [UInt8]? { base.read(at: address, count: count) }
    func canWrite(at address: UInt64, count: Int) -> Bool { false }
}

/// One process with /dev/blksnap open: a rig, its dispatcher and an address
/// space. Every call goes through `Control.dispatch` only.
private final class Caller {
    let rig: Rig
    let control: Control
    let memory = FakeMemory()

    init(devices: Int = 2) {
        rig = Rig(devices: devices, size: 8 << 20, storage: storageBytes)
        control = Control(engine: rig.engine)
    }

    var engine: Engine { rig.engine }
    var dev0: DevId { rig.devices[0].devId }
    var dev1: DevId { rig.devices[1].devId }

    /// ioctl(fd, number, argument): dispatches, then performs the writes.
    @discardableResult
    func ioctl(_ number: UInt32, _ argument: UInt64) -> ControlReply {
        let reply = control.dispatch(command: number, argument: argument, memory: memory)
        memory.apply(reply)
        return reply
    }

    @discardableResult
    func ioctl(_ command: IoctlCommand, _ argument: UInt64) -> ControlReply { ioctl(command.number, argument) }

    func place<T>(c value: T) -> UInt64 { memory.place(cBytes(value)) }
    func load<T>(_ type: T.Type, at address: UInt64) -> T {
        cValue(type, memory.read(at: address, count: MemoryLayout<T>.size)!)
    }
    func bytes(at address: UInt64, count: Int) -> [UInt8] { memory.read(at: address, count: count)! }

    // The commands, each from its C struct.

    /// SNAPSHOT_CREATE; the id is what the call wrote back into the struct.
    func create(_ devs: [DevId]) -> (reply: ControlReply, id: UUID16) {
        let array = memory.place(devs.flatMap { cBytes($0.c) })
        var arg = blk_snap_snapshot_create()
        arg.count = UInt32(devs.count)
        arg.dev_id_array = ptr(array)
        let a = place(c: arg)
        let reply = ioctl(.snapshotCreate, a)
        return (reply, UUID16(bytes: load(blk_snap_snapshot_create.self, at: a).id))
    }

    func createOK(_ devs: [DevId], sourceLocation: SourceLocation = #_sourceLocation) -> UUID16 {
        let (reply, id) = create(devs)
        #expect(reply.status == .success(0), sourceLocation: sourceLocation)
        return id
    }

    func destroy(_ id: UUID16) -> ControlReply {
        ioctl(.snapshotDestroy, place(c: blk_snap_snapshot_destroy(id: uuid(id))))
    }

    func take(_ id: UUID16) -> ControlReply {
        ioctl(.snapshotTake, place(c: blk_snap_snapshot_take(id: uuid(id))))
    }

    func appendStorage(_ id: UUID16, device: DevId = Rig.storageId,
                       _ ranges: [SectorRange] = [SectorRange(offset: 0, count: storageSectors / 2)]) -> ControlReply {
        let array = memory.place(ranges.flatMap { cBytes($0.c) })
        let arg = blk_snap_snapshot_append_storage(id: uuid(id), dev_id: device.c, count: UInt32(ranges.count),
                                                   ranges: ptr(array))
        return ioctl(.snapshotAppendStorage, place(c: arg))
    }

    /// WAIT_EVENT with the Swift twin of the 4096-byte struct.
    func waitEvent(_ id: UUID16, timeoutMs: UInt32) -> (reply: ControlReply, event: SnapshotEventArgument) {
        let a = memory.place(SnapshotEventArgument(id: id, timeoutMs: timeoutMs).wire)
        let reply = ioctl(.snapshotWaitEvent, a)
        return (reply, SnapshotEventArgument(wire: bytes(at: a, count: SnapshotEventArgument.size)))
    }

    /// CREATE, the first event, storage and TAKE: a snapshot with images.
    func takenSnapshot(_ devs: [DevId], sourceLocation: SourceLocation = #_sourceLocation) -> UUID16 {
        let id = createOK(devs, sourceLocation: sourceLocation)
        #expect(waitEvent(id, timeoutMs: 100).reply.status == .success(0), sourceLocation: sourceLocation)
        #expect(appendStorage(id).status == .success(0), sourceLocation: sourceLocation)
        #expect(take(id).status == .success(0), sourceLocation: sourceLocation)
        return id
    }

    /// TRACKER_COLLECT with an array of `capacity` entries (nil: NULL array).
    func trackerCollect(capacity: UInt32?) -> (reply: ControlReply, count: UInt32, infos: [CbtInfo]) {
        let array = capacity.map { memory.reserve(Int($0) * MemoryLayout<blk_snap_cbt_info>.size) } ?? 0
        let a = place(c: blk_snap_tracker_collect(count: capacity ?? 0, cbt_info_array: ptr(array)))
        let reply = ioctl(.trackerCollect, a)
        let count = load(blk_snap_tracker_collect.self, at: a).count
        var infos: [CbtInfo] = []
        if array != 0, reply.status == .success(0) {
            infos = (0..<Int(count)).map {
                CbtInfo(c: load(blk_snap_cbt_info.self, at: array + UInt64($0 * MemoryLayout<blk_snap_cbt_info>.size)))
            }
        }
        return (reply, count, infos)
    }

    /// READ_CBT_MAP into a fresh buffer of `length` bytes.
    func readCbt(_ dev: DevId, offset: UInt32 = 0, length: UInt32) -> (reply: ControlReply, buffer: [UInt8]) {
        let buff = memory.reserve(Int(length))
        let arg = blk_snap_tracker_read_cbt_bitmap(dev_id: dev.c, offset: offset, length: length, buff: ptr(buff))
        let reply = ioctl(.trackerReadCbtMap, place(c: arg))
        return (reply, bytes(at: buff, count: Int(length)))
    }

    func markDirty(_ dev: DevId, _ ranges: [SectorRange]) -> ControlReply {
        let array = memory.place(ranges.flatMap { cBytes($0.c) })
        let arg = blk_snap_tracker_mark_dirty_blocks(dev_id: dev.c, count: UInt32(ranges.count),
                                                     dirty_blocks_array: ptr(array))
        return ioctl(.trackerMarkDirtyBlocks, place(c: arg))
    }

    func trackerRemove(_ dev: DevId) -> ControlReply {
        ioctl(.trackerRemove, place(c: blk_snap_tracker_remove(dev_id: dev.c)))
    }

    /// SNAPSHOT_COLLECT with room for `capacity` ids (nil: NULL ids).
    func snapshotCollect(capacity: UInt32?) -> (reply: ControlReply, count: UInt32, ids: [UUID16]) {
        let array = capacity.map { memory.reserve(Int($0) * 16) } ?? 0
        let a = place(c: blk_snap_snapshot_collect(count: capacity ?? 0, ids: ptr(array)))
        let reply = ioctl(.snapshotCollect, a)
        let count = load(blk_snap_snapshot_collect.self, at: a).count
        let ids = array == 0 ? [] : (0..<Int(min(count, capacity!))).map {
            UUID16(array: bytes(at: array + UInt64($0 * 16), count: 16))
        }
        return (reply, count, ids)
    }

    /// COLLECT_IMAGES with room for `capacity` entries (nil: NULL array).
    func collectImages(_ id: UUID16, capacity: UInt32?) -> (reply: ControlReply, count: UInt32, images: [ImageInfo]) {
        let array = capacity.map { memory.reserve(Int($0) * MemoryLayout<blk_snap_image_info>.size) } ?? 0
        let arg = blk_snap_snapshot_collect_images(id: uuid(id), count: capacity ?? 0, image_info_array: ptr(array))
        let a = place(c: arg)
        let reply = ioctl(.snapshotCollectImages, a)
        let count = load(blk_snap_snapshot_collect_images.self, at: a).count
        var images: [ImageInfo] = []
        if array != 0, reply.status == .success(0) {
            images = (0..<Int(count)).map {
                ImageInfo(c: load(blk_snap_image_info.self, at: array + UInt64($0 * MemoryLayout<blk_snap_image_info>.size)))
            }
        }
        return (reply, count, images)
    }

    func sectorState(image: DevId, sector: UInt64) -> (reply: ControlReply, state: blk_snap_sector_state) {
        let a = place(c: blk_snap_get_sector_state(image_dev_id: image.c, sector: sector,
                                                    state: blk_snap_sector_state()))
        let reply = ioctl(.getSectorState, a)
        return (reply, load(blk_snap_get_sector_state.self, at: a).state)
    }
}

/// Writes `count` bytes of `value` to a routed original (not the dispatcher:
/// the I/O path).
private func write(_ caller: Caller, device: Int, at offset: UInt64, count: Int = 4096, value: UInt8) throws {
    try caller.rig.devices[device].writeBytes([UInt8](repeating: value, count: count), at: offset)
}

/// The Rig's geometry: 8 MiB devices, 4 KiB tracking blocks, 16 KiB chunks,
/// and a 16 MiB storage disk (small: every test zeroes its own).
private let storageBytes: UInt64 = 16 << 20
private let storageSectors: UInt64 = storageBytes / 512
private let blockSize: UInt64 = 4096
private let blockCount: UInt32 = 2048
private let sectorsPerBlock: UInt64 = blockSize / 512

@Suite struct ControlTests {

    // MARK: - request numbers

    @Test func requestNumbersAreTheLiteralsOfTheABITable() {
        #expect(IoctlCommand.version.number == 0x40085600)
        #expect(IoctlCommand.trackerRemove.number == 0x40085601)
        #expect(IoctlCommand.trackerCollect.number == 0x40105602)
        #expect(IoctlCommand.trackerReadCbtMap.number == 0x80185603)
        #expect(IoctlCommand.trackerMarkDirtyBlocks.number == 0x80185604)
        #expect(IoctlCommand.snapshotCreate.number == 0x40205605)
        #expect(IoctlCommand.snapshotDestroy.number == 0x80105606)
        #expect(IoctlCommand.snapshotAppendStorage.number == 0x40285607)
        #expect(IoctlCommand.snapshotTake.number == 0x80105608)
        #expect(IoctlCommand.snapshotCollect.number == 0x40105609)
        #expect(IoctlCommand.snapshotCollectImages.number == 0x4020560a)
        #expect(IoctlCommand.snapshotWaitEvent.number == 0x5000560b)
        #expect(IoctlCommand.mod.number == 0x40285620)
        #expect(IoctlCommand.setlog.number == 0x40185621)
        #expect(IoctlCommand.getSectorState.number == 0x40185622)
        #expect(IoctlCommand.allCases.count == 15)
    }

    @Test func versionAnsweredAtTheRawNumber0x40085600() {
        let caller = Caller()
        let a = caller.memory.reserve(8)
        let reply = caller.ioctl(0x40085600, a)
        #expect(reply.status == .success(0))
        let v = caller.load(blk_snap_version.self, at: a)
        #expect((v.major, v.minor, v.revision, v.build) == (1, 0, 0, 0))
        #expect(caller.bytes(at: a, count: 8) == [1, 0, 0, 0, 0, 0, 0, 0])
    }

    @Test func waitEventAnsweredAtTheRawNumber0x5000560b() {
        let caller = Caller()
        let id = caller.createOK([caller.dev0])
        let a = caller.memory.place(SnapshotEventArgument(id: id, timeoutMs: 100).wire)
        let reply = caller.ioctl(0x5000560b, a)
        #expect(reply.status == .success(0))
    }

    // MARK: - unknown command number -> ENOTTY

    @Test(arguments: [
        0x4008560c as UInt32,  // nr 12 (blk_snap_ioctl_end), which crashes the 2022 module
        0x0000560c,            // _IO('V', 12)
        0x40085800,            // type 'X', nr 0: the module ran VERSION
        0x80085600,            // VERSION's nr with other direction bits
        0x00005600,            // VERSION's nr, no size
        0x4008560d,            // nr 13
        0x40085623,            // nr 35, past GET_SECTOR_STATE
        0x00000000,
        0xffffffff,
    ])
    func unknownCommandNumberGivesENOTTY(number: UInt32) {
        let caller = Caller()
        let a = caller.memory.reserve(4096)
        let reply = caller.ioctl(number, a)
        #expect(reply.status == .failure(ENOTTY))
        #expect(reply.kernelResult == -ENOTTY)
        #expect(reply.writes.isEmpty)
        #expect(caller.bytes(at: a, count: 4096).allSatisfy { $0 == untouched })
    }

    // MARK: - a caller buffer cannot be read or written -> ENODATA (EINVAL for APPEND_STORAGE, WAIT_EVENT)

    private static func unreadableArgumentErrno(_ command: IoctlCommand) -> Int32 {
        command == .snapshotAppendStorage || command == .snapshotWaitEvent ? EINVAL : ENODATA
    }

    @Test(arguments: IoctlCommand.allCases)
    func nullArgumentGivesENODATAOrEINVALForAppendStorageAndWaitEvent(command: IoctlCommand) {
        let caller = Caller()
        let reply = caller.ioctl(command, 0)
        #expect(reply.status == .failure(Self.unreadableArgumentErrno(command)))
        #expect(reply.writes.isEmpty)
    }

    @Test(arguments: IoctlCommand.allCases)
    func unmappedArgumentPointerGivesENODATAOrEINVALForAppendStorageAndWaitEvent(command: IoctlCommand) {
        let caller = Caller()
        let reply = caller.ioctl(command, unmapped)
        #expect(reply.status == .failure(Self.unreadableArgumentErrno(command)))
        #expect(reply.writes.isEmpty)
    }

    /// Four mapped bytes: shorter than every struct, so the copy fails.
    @Test(arguments: IoctlCommand.allCases)
    func truncatedArgumentGivesENODATAOrEINVALForAppendStorageAndWaitEvent(command: IoctlCommand) {
        let caller = Caller()
        let a = caller.memory.place([0, 0, 0, 0])
        let reply = caller.ioctl(command, a)
        #expect(reply.status == .failure(Self.unreadableArgumentErrno(command)))
        #expect(caller.bytes(at: a, count: 4) == [0, 0, 0, 0])
    }

    @Test func versionIntoReadOnlyArgumentGivesENODATA() {
        let caller = Caller()
        let a = caller.memory.reserve(8)
        let reply = caller.control.dispatch(command: IoctlCommand.version.number, argument: a,
                                            memory: ReadOnlyMemory(base: caller.memory))
        #expect(reply.status == .failure(ENODATA))
        #expect(reply.writes.isEmpty)
    }

    @Test func modAndGetSectorStateIntoReadOnlyArgumentGiveENODATA() {
        let caller = Caller()
        _ = caller.takenSnapshot([caller.dev0])
        let ro = ReadOnlyMemory(base: caller.memory)
        let mod = caller.control.dispatch(command: IoctlCommand.mod.number,
                                          argument: caller.memory.reserve(40), memory: ro)
        #expect(mod.status == .failure(ENODATA))
        let gss = caller.place(c: blk_snap_get_sector_state(image_dev_id: DevId(major: 252, minor: 0).c, sector: 0,
                                                            state: blk_snap_sector_state()))
        let state = caller.control.dispatch(command: IoctlCommand.getSectorState.number, argument: gss, memory: ro)
        #expect(state.status == .failure(ENODATA))
    }

    @Test func waitEventIntoReadOnlyArgumentGivesEINVAL() {
        let caller = Caller()
        let id = caller.createOK([caller.dev0])
        let a = caller.memory.place(SnapshotEventArgument(id: id, timeoutMs: 100).wire)
        let reply = caller.control.dispatch(command: IoctlCommand.snapshotWaitEvent.number, argument: a,
                                            memory: ReadOnlyMemory(base: caller.memory))
        #expect(reply.status == .failure(EINVAL))
        #expect(reply.writes.isEmpty)
    }

    @Test func createWithUnreadableDevIdArrayGivesENODATA() {
        let caller = Caller()
        var arg = blk_snap_snapshot_create()
        arg.count = 1
        arg.dev_id_array = ptr(unmapped)
        let reply = caller.ioctl(.snapshotCreate, caller.place(c: arg))
        #expect(reply.status == .failure(ENODATA))
        #expect(caller.engine.collectSnapshots().isEmpty)
        #expect(caller.engine.tracker(caller.dev0) == nil)
    }

    /// The array pointer is valid but holds fewer elements than count.
    @Test func createWithDevIdArrayShorterThanCountGivesENODATA() {
        let caller = Caller()
        let array = caller.memory.place(cBytes(caller.dev0.c))
        let arg = blk_snap_snapshot_create(count: 2, dev_id_array: ptr(array), id: UUID16.zero.bytes)
        #expect(caller.ioctl(.snapshotCreate, caller.place(c: arg)).status == .failure(ENODATA))
        #expect(caller.engine.collectSnapshots().isEmpty)
    }

    @Test func markDirtyWithUnreadableRangeArrayGivesENODATA() {
        let caller = Caller()
        _ = caller.createOK([caller.dev0])
        let arg = blk_snap_tracker_mark_dirty_blocks(dev_id: caller.dev0.c, count: 1, dirty_blocks_array: ptr(unmapped))
        #expect(caller.ioctl(.trackerMarkDirtyBlocks, caller.place(c: arg)).status == .failure(ENODATA))
    }

    /// The module copies the struct with EINVAL but the ranges with ENODATA.
    @Test func appendStorageWithUnreadableRangeArrayGivesENODATA() {
        let caller = Caller()
        let id = caller.createOK([caller.dev0])
        let arg = blk_snap_snapshot_append_storage(id: uuid(id), dev_id: Rig.storageId.c, count: 1, ranges: ptr(unmapped))
        #expect(caller.ioctl(.snapshotAppendStorage, caller.place(c: arg)).status == .failure(ENODATA))
        #expect(caller.take(id).status == .failure(EFAULT))   // nothing was appended
    }

    @Test func setlogWithUnreadableFilepathGivesENODATA() {
        let caller = Caller()
        let arg = blk_snap_setlog(tz_minuteswest: 0, level: 6, filepath_size: 16, filepath: ptr(unmapped))
        #expect(caller.ioctl(.setlog, caller.place(c: arg)).status == .failure(ENODATA))
        #expect(caller.engine.currentLogConfig == nil)
    }

    @Test func trackerCollectIntoUnwritableArrayGivesENODATA() {
        let caller = Caller()
        _ = caller.createOK([caller.dev0])
        let a = caller.place(c: blk_snap_tracker_collect(count: 4, cbt_info_array: ptr(unmapped)))
        #expect(caller.ioctl(.trackerCollect, a).status == .failure(ENODATA))
    }

    @Test func readCbtMapIntoNullBufferGivesENODATA() {
        let caller = Caller()
        _ = caller.takenSnapshot([caller.dev0])
        let arg = blk_snap_tracker_read_cbt_bitmap(dev_id: caller.dev0.c, offset: 0, length: 16, buff: nil)
        #expect(caller.ioctl(.trackerReadCbtMap, caller.place(c: arg)).status == .failure(ENODATA))
    }

    @Test func snapshotCollectIntoUnwritableIdsGivesENODATA() {
        let caller = Caller()
        _ = caller.createOK([caller.dev0])
        let a = caller.place(c: blk_snap_snapshot_collect(count: 4, ids: ptr(unmapped)))
        #expect(caller.ioctl(.snapshotCollect, a).status == .failure(ENODATA))
    }

    @Test func collectImagesIntoUnwritableArrayGivesENODATA() {
        let caller = Caller()
        let id = caller.takenSnapshot([caller.dev0])
        let arg = blk_snap_snapshot_collect_images(id: uuid(id), count: 4, image_info_array: ptr(unmapped))
        #expect(caller.ioctl(.snapshotCollectImages, caller.place(c: arg)).status == .failure(ENODATA))
    }

    // MARK: - a device number with no device behind it -> ENXIO; TRACKER_REMOVE ENOENT

    @Test func createOfNumberWithNoDeviceGivesENXIO() {
        let caller = Caller()
        let (reply, id) = caller.create([nowhere])
        #expect(reply.status == .failure(ENXIO))
        #expect(id == .zero)
        #expect(caller.engine.collectSnapshots().isEmpty)
    }

    /// The module's defect not copied: a CREATE failing on its second device
    /// left the first one tracked.
    @Test func createFailingOnSecondDeviceGivesENXIOAndLeavesFirstUntracked() {
        let caller = Caller()
        #expect(caller.create([caller.dev0, nowhere]).reply.status == .failure(ENXIO))
        #expect(caller.trackerCollect(capacity: nil).count == 0)
    }

    @Test func readCbtMapOfNumberWithNoDeviceGivesENXIO() {
        let caller = Caller()
        #expect(caller.readCbt(nowhere, length: 16).reply.status == .failure(ENXIO))
    }

    @Test func markDirtyOfNumberWithNoDeviceGivesENXIO() {
        let caller = Caller()
        #expect(caller.markDirty(nowhere, [SectorRange(offset: 0, count: 8)]).status == .failure(ENXIO))
    }

    @Test func appendStorageOnNumberWithNoDeviceGivesENXIO() {
        let caller = Caller()
        let id = caller.createOK([caller.dev0])
        #expect(caller.appendStorage(id, device: nowhere).status == .failure(ENXIO))
    }

    @Test func trackerRemoveOfNumberWithNoDeviceGivesENOENT() {
        let caller = Caller()
        #expect(caller.trackerRemove(nowhere).status == .failure(ENOENT))
    }

    @Test func createOfExistingButUnroutedDeviceGivesENODEV() {
        let caller = Caller()
        let unrouted = DevId(major: 8, minor: 16)
        caller.rig.host.unrouted.insert(unrouted)
        let (reply, _) = caller.create([caller.dev0, unrouted])
        #expect(reply.status == .failure(ENODEV))
        #expect(caller.engine.collectSnapshots().isEmpty)
        #expect(caller.engine.tracker(caller.dev0) == nil)
    }

    // MARK: - TRACKER_REMOVE

    @Test func trackerRemoveOfUntrackedDeviceGivesENODATA() {
        let caller = Caller()
        let unrouted = DevId(major: 8, minor: 16)
        caller.rig.host.unrouted.insert(unrouted)
        #expect(caller.trackerRemove(caller.dev0).status == .failure(ENODATA))
        #expect(caller.trackerRemove(unrouted).status == .failure(ENODATA))
    }

    @Test func trackerRemoveOfDeviceInTakenSnapshotGivesEBUSY() {
        let caller = Caller()
        _ = caller.takenSnapshot([caller.dev0])
        #expect(caller.trackerRemove(caller.dev0).status == .failure(EBUSY))
        #expect(caller.trackerCollect(capacity: nil).count == 1)
    }

    @Test func trackerRemoveAfterDestroySucceedsAndTheTrackerIsGone() {
        let caller = Caller()
        let id = caller.takenSnapshot([caller.dev0, caller.dev1])
        #expect(caller.destroy(id).status == .success(0))
        #expect(caller.trackerCollect(capacity: nil).count == 2)   // trackers outlive the snapshot
        #expect(caller.trackerRemove(caller.dev0).status == .success(0))
        let (_, count, infos) = caller.trackerCollect(capacity: 4)
        #expect(count == 1)
        #expect(infos.map(\.devId) == [caller.dev1])
        #expect(caller.trackerRemove(caller.dev0).status == .failure(ENODATA))
    }

    // MARK: - TRACKER_COLLECT

    @Test func trackerCollectWithNullArrayWritesCountBackAndReturnsZero() {
        let caller = Caller()
        _ = caller.createOK([caller.dev0, caller.dev1])
        let (reply, count, _) = caller.trackerCollect(capacity: nil)
        #expect(reply.status == .success(0))
        #expect(count == 2)
    }

    @Test func trackerCollectWithTooSmallArrayGivesENOBUFSAndLeavesCountUnchanged() {
        let caller = Caller()
        _ = caller.createOK([caller.dev0, caller.dev1])
        let array = caller.memory.reserve(MemoryLayout<blk_snap_cbt_info>.size)
        let a = caller.place(c: blk_snap_tracker_collect(count: 1, cbt_info_array: ptr(array)))
        let reply = caller.ioctl(.trackerCollect, a)
        #expect(reply.status == .failure(ENOBUFS))
        #expect(caller.load(blk_snap_tracker_collect.self, at: a).count == 1)
        #expect(caller.bytes(at: array, count: MemoryLayout<blk_snap_cbt_info>.size).allSatisfy { $0 == untouched })
    }

    @Test func trackerCollectFillsCbtInfoInCreationOrder() {
        let caller = Caller()
        _ = caller.createOK([caller.dev1, caller.dev0])
        let (reply, count, infos) = caller.trackerCollect(capacity: 3)
        #expect(reply.status == .success(0))
        #expect(count == 2)
        #expect(infos.map(\.devId) == [caller.dev1, caller.dev0])
        for info in infos {
            #expect(info.blockSize == UInt32(blockSize))
            #expect(info.deviceCapacity == 8 << 20)
            #expect(info.blockCount == blockCount)
            #expect(info.snapNumber == 0)
            #expect(info.generationId != .zero)
        }
        #expect(infos[0].generationId != infos[1].generationId)
    }

    // MARK: - TRACKER_READ_CBT_MAP

    @Test func readCbtMapOfUntrackedDeviceGivesENODATA() {
        let caller = Caller()
        #expect(caller.readCbt(caller.dev0, length: 16).reply.status == .failure(ENODATA))
    }

    @Test func readCbtMapBeforeTakeGivesEPERM() {
        let caller = Caller()
        let id = caller.createOK([caller.dev0])
        #expect(caller.appendStorage(id).status == .success(0))
        let (reply, buffer) = caller.readCbt(caller.dev0, length: 16)
        #expect(reply.status == .failure(EPERM))
        #expect(buffer.allSatisfy { $0 == untouched })
    }

    @Test func readCbtMapAfterDestroyGivesEPERM() {
        let caller = Caller()
        let id = caller.takenSnapshot([caller.dev0])
        #expect(caller.readCbt(caller.dev0, length: 16).reply.status == .success(16))
        #expect(caller.destroy(id).status == .success(0))
        #expect(caller.readCbt(caller.dev0, length: 16).reply.status == .failure(EPERM))
    }

    /// A map becomes corrupted when a write lands outside it (an engine bug);
    /// it is poked directly here, as no caller can cause it.
    @Test func readCbtMapOfCorruptedMapGivesEFAULT() {
        let caller = Caller()
        _ = caller.takenSnapshot([caller.dev0])
        caller.engine.tracker(caller.dev0)!.cbtMap.set(offset: 1 << 40, length: 4096)
        #expect(caller.readCbt(caller.dev0, length: 16).reply.status == .failure(EFAULT))
    }

    @Test func readCbtMapReturnsMinOfLengthAndBlocksLeftAsTheIoctlResult() throws {
        let caller = Caller()
        try write(caller, device: 0, at: 0, value: 1)                                  // block 0
        let id = caller.createOK([caller.dev0])
        try write(caller, device: 0, at: 5 * blockSize, count: 2 * Int(blockSize), value: 1)  // blocks 5, 6
        try write(caller, device: 0, at: UInt64(blockCount - 1) * blockSize, value: 1) // the last block
        #expect(caller.appendStorage(id).status == .success(0))
        #expect(caller.take(id).status == .success(0))
        let readMap = caller.engine.tracker(caller.dev0)!.cbtMap.tables().read
        #expect(readMap.count == Int(blockCount))

        // The whole map: blk_count bytes, the rest of the buffer untouched.
        let (whole, buffer) = caller.readCbt(caller.dev0, length: blockCount + 100)
        #expect(whole.status == .success(Int32(blockCount)))
        #expect(Array(buffer.prefix(Int(blockCount))) == readMap)
        #expect(buffer.suffix(100).allSatisfy { $0 == untouched })
        // Written before CREATE: not tracked yet; written after: the active number, 1.
        #expect(buffer[0] == 0)
        #expect(Array(buffer[4...7]) == [0, 1, 1, 0])
        #expect(buffer[Int(blockCount) - 1] == 1)

        // A window in the middle: exactly length bytes.
        let (middle, window) = caller.readCbt(caller.dev0, offset: 4, length: 4)
        #expect(middle.status == .success(4))
        #expect(window == [0, 1, 1, 0])

        // Near the end: min(length, blk_count - offset).
        let (tail, tailBytes) = caller.readCbt(caller.dev0, offset: blockCount - 8, length: 100)
        #expect(tail.status == .success(8))
        #expect(Array(tailBytes.prefix(8)) == Array(readMap.suffix(8)))
        #expect(tailBytes.dropFirst(8).allSatisfy { $0 == untouched })

        // At and past the end: 0, nothing written (the module's defect returned bytes beyond the map).
        for offset in [blockCount, blockCount + 1, UInt32.max] {
            let (end, endBytes) = caller.readCbt(caller.dev0, offset: offset, length: 16)
            #expect(end.status == .success(0))
            #expect(end.writes.isEmpty)
            #expect(endBytes.allSatisfy { $0 == untouched })
        }
        // Length 0: 0.
        #expect(caller.readCbt(caller.dev0, offset: 0, length: 0).reply.status == .success(0))
    }

    // MARK: - TRACKER_MARK_DIRTY_BLOCKS

    @Test func markDirtyOfUntrackedDeviceGivesENODEV() {
        let caller = Caller()
        #expect(caller.markDirty(caller.dev0, [SectorRange(offset: 0, count: 8)]).status == .failure(ENODEV))
    }

    @Test func markDirtyPastTheDeviceGivesEINVAL() {
        let caller = Caller()
        _ = caller.createOK([caller.dev0])
        let sectors = (8 << 20) / 512 as UInt64
        #expect(caller.markDirty(caller.dev0, [SectorRange(offset: sectors, count: 1)]).status == .failure(EINVAL))
        #expect(caller.markDirty(caller.dev0, [SectorRange(offset: sectors - 8, count: 16)]).status == .failure(EINVAL))
        #expect(caller.markDirty(caller.dev0, [SectorRange(offset: UInt64.max, count: 2)]).status == .failure(EINVAL))
        // A refused call marks nothing, even its in-range ranges.
        let refused = caller.markDirty(caller.dev0, [SectorRange(offset: 0, count: 8), SectorRange(offset: sectors, count: 8)])
        #expect(refused.status == .failure(EINVAL))
        #expect(caller.engine.tracker(caller.dev0)!.cbtMap.tables().write.allSatisfy { $0 == 0 })
        // The very last sector is inside.
        #expect(caller.markDirty(caller.dev0, [SectorRange(offset: sectors - 1, count: 1)]).status == .success(0))
    }

    @Test func markDirtyBeforeTakeIsAllowedAndShowsInTheMapAfterTake() {
        let caller = Caller()
        let id = caller.createOK([caller.dev0])
        // Blocks 3 and 4 (sectors 24..<40), and block 10 by one sector.
        let reply = caller.markDirty(caller.dev0, [SectorRange(offset: 3 * sectorsPerBlock, count: 2 * sectorsPerBlock),
                                                   SectorRange(offset: 10 * sectorsPerBlock + 1, count: 1)])
        #expect(reply.status == .success(0))
        let (read, written) = caller.engine.tracker(caller.dev0)!.cbtMap.tables()
        #expect(written[3] == 1 && written[4] == 1 && written[10] == 1)   // the active number
        #expect(read.allSatisfy { $0 == 0 })                              // previous is 0
        #expect(caller.appendStorage(id).status == .success(0))
        #expect(caller.take(id).status == .success(0))
        let (_, map) = caller.readCbt(caller.dev0, length: blockCount)
        let dirty = map.indices.filter { map[$0] > 0 }
        #expect(dirty == [3, 4, 10])
        #expect(dirty.allSatisfy { map[$0] == 1 })
    }

    /// After TAKE, MARK_DIRTY puts `previous` in the read map, so the map this
    /// backup reads already shows the block, and `active` in the write map.
    @Test func markDirtyAfterTakeMarksTheReadMapWithTheSnapNumber() {
        let caller = Caller()
        _ = caller.takenSnapshot([caller.dev0])
        #expect(caller.trackerCollect(capacity: 1).infos.first?.snapNumber == 1)
        #expect(caller.markDirty(caller.dev0, [SectorRange(offset: 20 * sectorsPerBlock, count: sectorsPerBlock)]).status
                == .success(0))
        let (_, map) = caller.readCbt(caller.dev0, length: blockCount)
        #expect(map.indices.filter { map[$0] != 0 } == [20])
        #expect(map[20] == 1)
        #expect(caller.engine.tracker(caller.dev0)!.cbtMap.tables().write[20] == 2)
    }

    @Test func markDirtyOnAnImageDevIdMarksTheOriginalsMap() throws {
        let caller = Caller()
        let id = caller.takenSnapshot([caller.dev0, caller.dev1])
        let images = caller.collectImages(id, capacity: 2).images
        let image1 = try #require(images.first { $0.origDevId == caller.dev1 }).imageDevId
        #expect(caller.markDirty(image1, [SectorRange(offset: 7 * sectorsPerBlock, count: 1)]).status == .success(0))
        let (_, map1) = caller.readCbt(caller.dev1, length: blockCount)
        #expect(map1.indices.filter { map1[$0] != 0 } == [7])
        let (_, map0) = caller.readCbt(caller.dev0, length: blockCount)
        #expect(map0.allSatisfy { $0 == 0 })
        // The image is as large as its original.
        #expect(caller.markDirty(image1, [SectorRange(offset: (8 << 20) / 512, count: 1)]).status == .failure(EINVAL))
    }

    // MARK: - SNAPSHOT_CREATE

    @Test func createWithTheSameDeviceTwiceGivesEINVAL() {
        let caller = Caller()
        let (reply, id) = caller.create([caller.dev0, caller.dev1, caller.dev0])
        #expect(reply.status == .failure(EINVAL))
        #expect(id == .zero)
        #expect(caller.engine.collectSnapshots().isEmpty)
        #expect(caller.trackerCollect(capacity: nil).count == 0)
    }

    @Test func createWithCountZeroSucceedsAndItsTakeGivesENODEV() {
        let caller = Caller()
        var arg = blk_snap_snapshot_create()
        arg.count = 0
        arg.dev_id_array = nil
        let a = caller.place(c: arg)
        #expect(caller.ioctl(.snapshotCreate, a).status == .success(0))
        let id = UUID16(bytes: caller.load(blk_snap_snapshot_create.self, at: a).id)
        #expect(id != .zero)
        #expect(caller.engine.collectSnapshots() == [id])
        #expect(caller.appendStorage(id).status == .success(0))
        #expect(caller.take(id).status == .failure(ENODEV))
        #expect(caller.destroy(id).status == .success(0))
    }

    @Test func createOfDeviceInLiveSnapshotGivesEBUSY() {
        let caller = Caller()
        let first = caller.createOK([caller.dev0])
        #expect(caller.create([caller.dev1, caller.dev0]).reply.status == .failure(EBUSY))
        #expect(caller.appendStorage(first).status == .success(0))
        #expect(caller.take(first).status == .success(0))
        #expect(caller.create([caller.dev0]).reply.status == .failure(EBUSY))
        #expect(caller.destroy(first).status == .success(0))
        #expect(caller.create([caller.dev0]).reply.status == .success(0))
    }

    @Test func severalSnapshotsLiveAtOnceAreAllReachableThroughSnapshotCollect() {
        let caller = Caller()
        let a = caller.createOK([caller.dev0])
        let b = caller.createOK([caller.dev1])
        let c = caller.createOK([])
        #expect(Set([a, b, c]).count == 3)
        let (reply, count, ids) = caller.snapshotCollect(capacity: 3)
        #expect(reply.status == .success(0))
        #expect(count == 3)
        #expect(Set(ids) == Set([a, b, c]))
        // Each one is still usable: the first is not unlinked by the second.
        #expect(caller.appendStorage(a).status == .success(0))
        #expect(caller.take(a).status == .success(0))
        #expect(caller.appendStorage(b, [SectorRange(offset: storageSectors / 2, count: storageSectors / 2)]).status == .success(0))
        #expect(caller.take(b).status == .success(0))
        #expect(caller.collectImages(a, capacity: 1).images.map(\.origDevId) == [caller.dev0])
        #expect(caller.collectImages(b, capacity: 1).images.map(\.origDevId) == [caller.dev1])
    }

    // MARK: - DESTROY, and unknown ids

    @Test func destroyOfUnknownIdGivesENODEV() {
        let caller = Caller()
        #expect(caller.destroy(UUID16.random()).status == .failure(ENODEV))
        let id = caller.createOK([caller.dev0])
        #expect(caller.destroy(id).status == .success(0))
        #expect(caller.destroy(id).status == .failure(ENODEV))
    }

    @Test func appendStorageToUnknownIdGivesESRCH() {
        let caller = Caller()
        #expect(caller.appendStorage(UUID16.random()).status == .failure(ESRCH))
    }

    @Test func takeOfUnknownIdGivesESRCH() {
        let caller = Caller()
        #expect(caller.take(UUID16.random()).status == .failure(ESRCH))
    }

    @Test func waitEventOnUnknownIdGivesESRCH() {
        let caller = Caller()
        let (reply, _) = caller.waitEvent(UUID16.random(), timeoutMs: 10)
        #expect(reply.status == .failure(ESRCH))
    }

    @Test func collectImagesOfUnknownIdGivesESRCH() {
        let caller = Caller()
        #expect(caller.collectImages(UUID16.random(), capacity: 2).reply.status == .failure(ESRCH))
    }

    // MARK: - SNAPSHOT_APPEND_STORAGE

    @Test func appendStorageWithCountZeroSucceedsAndAddsNothing() {
        let caller = Caller()
        let id = caller.createOK([caller.dev0])
        let arg = blk_snap_snapshot_append_storage(id: uuid(id), dev_id: Rig.storageId.c, count: 0, ranges: nil)
        #expect(caller.ioctl(.snapshotAppendStorage, caller.place(c: arg)).status == .success(0))
        #expect(caller.take(id).status == .failure(EFAULT))   // still no storage
    }

    @Test func appendStoragePastItsDeviceGivesEINVAL() {
        let caller = Caller()
        let id = caller.createOK([caller.dev0])
        #expect(caller.appendStorage(id, [SectorRange(offset: storageSectors - 8, count: 16)]).status == .failure(EINVAL))
        #expect(caller.take(id).status == .failure(EFAULT))
    }

    // MARK: - SNAPSHOT_TAKE

    @Test func takeTwiceGivesEALREADY() {
        let caller = Caller()
        let id = caller.takenSnapshot([caller.dev0])
        #expect(caller.take(id).status == .failure(EALREADY))
        #expect(caller.collectImages(id, capacity: 2).count == 1)
    }

    @Test func takeWithNoDevicesGivesENODEV() {
        let caller = Caller()
        let id = caller.createOK([])
        #expect(caller.take(id).status == .failure(ENODEV))
    }

    @Test func takeWithoutStorageGivesEFAULTAndKeepsTheSnapshot() {
        let caller = Caller()
        let id = caller.createOK([caller.dev0])
        #expect(caller.take(id).status == .failure(EFAULT))
        #expect(caller.snapshotCollect(capacity: 1).ids == [id])
        #expect(caller.collectImages(id, capacity: 1).reply.status == .failure(ENODEV))
        #expect(caller.appendStorage(id).status == .success(0))
        #expect(caller.take(id).status == .success(0))
        #expect(caller.collectImages(id, capacity: 1).images.count == 1)
    }

    // MARK: - SNAPSHOT_COLLECT

    @Test func snapshotCollectWithNullIdsWritesCountBack() {
        let caller = Caller()
        #expect(caller.snapshotCollect(capacity: nil).count == 0)
        _ = caller.createOK([caller.dev0])
        _ = caller.createOK([caller.dev1])
        let (reply, count, _) = caller.snapshotCollect(capacity: nil)
        #expect(reply.status == .success(0))
        #expect(count == 2)
    }

    @Test func snapshotCollectWithTooSmallArrayGivesENODATA() {
        let caller = Caller()
        let a = caller.createOK([caller.dev0])
        let b = caller.createOK([caller.dev1])
        let (reply, count, ids) = caller.snapshotCollect(capacity: 1)
        #expect(reply.status == .failure(ENODATA))
        #expect(count <= 1)
        #expect(ids.allSatisfy { [a, b].contains($0) })
        let (zero, _, _) = caller.snapshotCollect(capacity: 0)
        #expect(zero.status == .failure(ENODATA))
    }

    // MARK: - SNAPSHOT_COLLECT_IMAGES

    @Test func collectImagesBeforeTakeGivesENODEVWithCountSet() {
        let caller = Caller()
        let id = caller.createOK([caller.dev0, caller.dev1])
        let (reply, count, _) = caller.collectImages(id, capacity: 5)
        #expect(reply.status == .failure(ENODEV))
        #expect(count == 2)
    }

    @Test func collectImagesWithNullArraySucceedsWithCount() {
        let caller = Caller()
        let id = caller.takenSnapshot([caller.dev0, caller.dev1])
        let (reply, count, _) = caller.collectImages(id, capacity: nil)
        #expect(reply.status == .success(0))
        #expect(count == 2)
    }

    @Test func collectImagesWithTooSmallArrayGivesENODATAWithCountSet() {
        let caller = Caller()
        let id = caller.takenSnapshot([caller.dev0, caller.dev1])
        let array = caller.memory.reserve(MemoryLayout<blk_snap_image_info>.size)
        let a = caller.place(c: blk_snap_snapshot_collect_images(id: uuid(id), count: 1, image_info_array: ptr(array)))
        let reply = caller.ioctl(.snapshotCollectImages, a)
        #expect(reply.status == .failure(ENODATA))
        #expect(caller.load(blk_snap_snapshot_collect_images.self, at: a).count == 2)
        #expect(caller.bytes(at: array, count: MemoryLayout<blk_snap_image_info>.size).allSatisfy { $0 == untouched })
    }

    @Test func collectImagesReturnsImageInfoPairsNumberedFromMinorZero() {
        let caller = Caller()
        let id = caller.takenSnapshot([caller.dev1, caller.dev0])
        let (reply, count, images) = caller.collectImages(id, capacity: 4)
        #expect(reply.status == .success(0))
        #expect(count == 2)
        #expect(Set(images.map(\.origDevId)) == [caller.dev0, caller.dev1])
        #expect(images.map(\.imageDevId.minor).sorted() == [0, 1])
        #expect(Set(images.map(\.imageDevId.major)).count == 1)
        #expect(images.allSatisfy { $0.imageDevId != $0.origDevId })
        // A second snapshot's image takes the next free minor; after DESTROY
        // the freed minors are used again, lowest first.
        #expect(caller.destroy(id).status == .success(0))
        let second = caller.takenSnapshot([caller.dev0])
        #expect(caller.collectImages(second, capacity: 1).images.map(\.imageDevId.minor) == [0])
    }

    // MARK: - SNAPSHOT_WAIT_EVENT

    /// Raw bytes, at the ABI offsets: id 0, timeout_ms 16, code 20,
    /// time_label 24, data 32 (low_free_space.requested_nr_sect at data+0).
    @Test func waitEventRightAfterCreateGivesLowFreeSpaceForDiffStorageMinimum() {
        let caller = Caller()
        let id = caller.createOK([caller.dev0])
        var arg = [UInt8](repeating: 0xEE, count: 4096)
        arg.replaceSubrange(0..<16, with: id.array)
        arg.replaceSubrange(16..<20, with: [100, 0, 0, 0])   // 100 ms, as libblksnap waits
        let a = caller.memory.place(arg)
        let reply = caller.ioctl(.snapshotWaitEvent, a)
        #expect(reply.status == .success(0))
        let out = caller.bytes(at: a, count: 4096)
        #expect(Array(out[0..<16]) == id.array)
        #expect(le32(out, 16) == 100)
        #expect(le32(out, 20) == 0)                          // blk_snap_event_code_low_free_space
        #expect(le32(out, 20) == blk_snap_event_code_low_free_space.rawValue)
        let timeLabel = Int64(bitPattern: le64(out, 24))
        var now = timespec()
        clock_gettime(CLOCK_BOOTTIME, &now)
        #expect(timeLabel > 0)
        #expect(timeLabel <= Int64(now.tv_sec) * 1_000_000_000 + Int64(now.tv_nsec))
        #expect(le64(out, 32) == caller.engine.settings.diffStorageMinimum)
        #expect(le64(out, 32) == 4096)
        // The event was taken: the queue is empty now.
        #expect(caller.waitEvent(id, timeoutMs: 0).reply.status == .failure(ENOENT))
    }

    @Test func waitEventWithNothingQueuedGivesENOENTAfterTheTimeoutInMilliseconds() {
        let caller = Caller()
        let id = caller.createOK([caller.dev0])
        #expect(caller.waitEvent(id, timeoutMs: 100).reply.status == .success(0))   // CREATE's event
        let clock = ContinuousClock()
        let start = clock.now
        let (reply, _) = caller.waitEvent(id, timeoutMs: 50)
        let waited = clock.now - start
        #expect(reply.status == .failure(ENOENT))
        #expect(waited >= .milliseconds(40))
        #expect(waited < .seconds(2))
    }

    @Test func waitEventWhileAnotherThreadDestroysTheSnapshotGivesESRCHPromptly() {
        let caller = Caller()
        let id = caller.createOK([caller.dev0])
        #expect(caller.waitEvent(id, timeoutMs: 100).reply.status == .success(0))

        final class Box: @unchecked Sendable {
            var reply: ControlReply?
            var elapsed: Duration = .zero
        }
        let box = Box()
        let done = DispatchSemaphore(value: 0)
        let control = caller.control
        DispatchQueue.global().async {
            let memory = FakeMemory()   // the waiting thread's own copy of the struct
            let a = memory.place(SnapshotEventArgument(id: id, timeoutMs: 10_000).wire)
            let clock = ContinuousClock()
            let start = clock.now
            box.reply = control.dispatch(command: IoctlCommand.snapshotWaitEvent.number, argument: a, memory: memory)
            box.elapsed = clock.now - start
            done.signal()
        }
        // Destroy only once the other thread sleeps in WAIT_EVENT.
        guard let snapshot = caller.control.engine.snapshot(id) else { Issue.record("the snapshot is gone"); return }
        let asleepBy = ContinuousClock.now + .seconds(5)
        while snapshot.eventWaiters == 0 && ContinuousClock.now < asleepBy { sched_yield() }
        #expect(snapshot.eventWaiters == 1)
        let clock = ContinuousClock()
        let destroyedAt = clock.now
        #expect(caller.destroy(id).status == .success(0))
        #expect(done.wait(timeout: .now() + 5) == .success)
        let sinceDestroy = clock.now - destroyedAt
        #expect(box.reply?.status == .failure(ESRCH))
        #expect(sinceDestroy < .seconds(2))
        #expect(box.elapsed < .seconds(5))
    }

    // MARK: - MOD, SETLOG, GET_SECTOR_STATE

    @Test func modAnswersBlksnapSwiftWithFlags0x3() {
        let caller = Caller()
        let a = caller.memory.reserve(40)
        #expect(caller.ioctl(.mod, a).status == .success(0))
        let m = caller.load(blk_snap_mod.self, at: a)
        #expect(m.compatibility_flags == 0x3)
        let name = withUnsafeBytes(of: m.name) { Array($0) }
        #expect(name == Array("blksnap-swift".utf8) + [UInt8](repeating: 0, count: 32 - 13))
        let raw = caller.bytes(at: a, count: 40)
        #expect(le64(raw, 0) == 0x3)
        #expect(String(decoding: raw[8...].prefix { $0 != 0 }, as: UTF8.self) == "blksnap-swift")
    }

    @Test func setlogWithNullFilepathSucceedsAndTurnsFileLoggingOff() {
        let caller = Caller()
        let path = Array(temporaryLogPath().utf8) + [0]
        let on = caller.place(c: blk_snap_setlog(tz_minuteswest: 0, level: 6, filepath_size: UInt32(path.count),
                                                 filepath: ptr(caller.memory.place(path))))
        #expect(caller.ioctl(.setlog, on).status == .success(0))
        #expect(caller.engine.currentLogConfig != nil)
        let off = caller.place(c: blk_snap_setlog(tz_minuteswest: 0, level: 6, filepath_size: 0, filepath: nil))
        #expect(caller.ioctl(.setlog, off).status == .success(0))
        #expect(caller.engine.currentLogConfig == nil)
    }

    @Test func setlogWithZeroFilepathSizeAndAPathGivesEINVAL() {
        let caller = Caller()
        let path = caller.memory.place(Array("/tmp/blksnap.log".utf8) + [0])
        let arg = blk_snap_setlog(tz_minuteswest: 0, level: 6, filepath_size: 0, filepath: ptr(path))
        #expect(caller.ioctl(.setlog, caller.place(c: arg)).status == .failure(EINVAL))
        #expect(caller.engine.currentLogConfig == nil)
    }

    @Test func setlogWithAPathSucceedsAndSetsTheLogConfig() {
        let caller = Caller()
        let file = temporaryLogPath()
        let path = Array(file.utf8) + [0, 0, 0]   // size counts the NULs too
        let arg = blk_snap_setlog(tz_minuteswest: -120, level: 7, filepath_size: UInt32(path.count),
                                  filepath: ptr(caller.memory.place(path)))
        #expect(caller.ioctl(.setlog, caller.place(c: arg)).status == .success(0))
        let config = caller.engine.currentLogConfig
        #expect(config?.path == file)
        #expect(config?.level == 7)
        #expect(config?.tzMinutesWest == -120)
    }

    @Test func setlogStartsTheFileAndLogRecordsReachIt() throws {
        let caller = Caller()
        let file = temporaryLogPath()
        let path = Array(file.utf8) + [0]
        let arg = blk_snap_setlog(tz_minuteswest: 0, level: 6, filepath_size: UInt32(path.count),
                                  filepath: ptr(caller.memory.place(path)))
        #expect(caller.ioctl(.setlog, caller.place(c: arg)).status == .success(0))
        var logger = Logger(label: "t", factory: { _ in LogFileHandler(file: caller.engine.logFile) })
        logger.logLevel = .trace
        logger.info("an info record")
        logger.debug("a debug record, above level 6")
        let text = try #require(readWholeFile(file))
        #expect(text.contains("Start log for module blksnap-swift"))
        #expect(text.contains("<6> an info record"))
        #expect(!text.contains("a debug record"))
    }

    @Test func setlogWithAnUnwritablePathGivesItsErrno() {
        let caller = Caller()
        let path = Array("/nonexistent-blksnap-dir/blksnap.log".utf8) + [0]
        let arg = blk_snap_setlog(tz_minuteswest: 0, level: 6, filepath_size: UInt32(path.count),
                                  filepath: ptr(caller.memory.place(path)))
        #expect(caller.ioctl(.setlog, caller.place(c: arg)).status == .failure(ENOENT))
        #expect(caller.engine.currentLogConfig == nil)
    }

    @Test func getSectorStateOfUnknownImageGivesENODEV() {
        let caller = Caller()
        #expect(caller.sectorState(image: DevId(major: 252, minor: 0), sector: 0).reply.status == .failure(ENODEV))
        _ = caller.takenSnapshot([caller.dev0])
        // An original is not an image.
        #expect(caller.sectorState(image: caller.dev0, sector: 0).reply.status == .failure(ENODEV))
        #expect(caller.sectorState(image: DevId(major: 252, minor: 1), sector: 0).reply.status == .failure(ENODEV))
    }

    @Test func getSectorStateReportsSnapNumbersAndChunkStateBits() throws {
        let caller = Caller()
        let id = caller.createOK([caller.dev0])
        try write(caller, device: 0, at: 0, value: 1)              // block 0, before TAKE
        #expect(caller.waitEvent(id, timeoutMs: 0).reply.status == .success(0))
        #expect(caller.appendStorage(id).status == .success(0))
        #expect(caller.take(id).status == .success(0))
        let image = try #require(caller.collectImages(id, capacity: 1).images.first).imageDevId

        // Untouched: all zero.
        let quiet = caller.sectorState(image: image, sector: 1024)
        #expect(quiet.reply.status == .success(0))
        #expect((quiet.state.snap_number_prev, quiet.state.snap_number_curr, quiet.state.chunk_state) == (0, 0, 0))

        // Written to the original before TAKE and again after: read map 1,
        // write map 2, the chunk copied to the difference storage.
        try write(caller, device: 0, at: 0, value: 2)
        let copied = caller.sectorState(image: image, sector: 0)
        #expect(copied.reply.status == .success(0))
        #expect(copied.state.snap_number_prev == 1)
        #expect(copied.state.snap_number_curr == 2)
        #expect(copied.state.chunk_state == BLK_SNAP_CHUNK_ST_STORE_READY)

        // Written through the image (chunk 2, 16 KiB chunks): dirty and stored.
        try caller.engine.image(image)!.writeBytes([UInt8](repeating: 9, count: 512), at: 64 * 512)
        let dirty = caller.sectorState(image: image, sector: 64)
        #expect(dirty.reply.status == .success(0))
        #expect(dirty.state.snap_number_prev == 1)
        #expect(dirty.state.snap_number_curr == 2)
        #expect(dirty.state.chunk_state == BLK_SNAP_CHUNK_ST_DIRTY | BLK_SNAP_CHUNK_ST_STORE_READY)
        #expect(dirty.state.chunk_state == 0x2 | 0x8)
    }

    // MARK: - a full backup cycle, dispatcher only

    @Test func fullBackupCycleOnTwoDevicesThroughTheDispatcherOnly() throws {
        let caller = Caller()
        let devs = [caller.dev0, caller.dev1]

        // First backup.
        let (created, first) = caller.create(devs)
        #expect(created.status == .success(0))
        let (waited, event) = caller.waitEvent(first, timeoutMs: 100)
        #expect(waited.status == .success(0))
        #expect(event.code == EventCode.lowFreeSpace.rawValue)
        let requested = EventLowFreeSpace(wire: Array(event.data.prefix(8))).requestedSectors
        #expect(requested == 4096)
        #expect(caller.appendStorage(first, [SectorRange(offset: 0, count: requested)]).status == .success(0))
        #expect(caller.take(first).status == .success(0))

        let (countOnly, snapshots, _) = caller.snapshotCollect(capacity: nil)
        #expect(countOnly.status == .success(0))
        #expect(caller.snapshotCollect(capacity: snapshots).ids == [first])

        let imageCount = caller.collectImages(first, capacity: nil).count
        #expect(imageCount == 2)
        let (collected, _, images) = caller.collectImages(first, capacity: imageCount)
        #expect(collected.status == .success(0))
        #expect(images == [ImageInfo(origDevId: caller.dev0, imageDevId: DevId(major: 252, minor: 0)),
                           ImageInfo(origDevId: caller.dev1, imageDevId: DevId(major: 252, minor: 1))])

        let trackerCount = caller.trackerCollect(capacity: nil).count
        #expect(trackerCount == 2)
        let firstInfos = caller.trackerCollect(capacity: trackerCount).infos
        #expect(firstInfos.map(\.snapNumber) == [1, 1])
        let baseline = firstInfos[0].snapNumber
        for dev in devs {
            let (reply, map) = caller.readCbt(dev, length: blockCount)
            #expect(reply.status == .success(Int32(blockCount)))
            #expect(map.allSatisfy { $0 <= baseline })
        }

        // The devices change while the first snapshot stands.
        try write(caller, device: 0, at: 10 * blockSize, value: 0xA1)
        try write(caller, device: 1, at: 100 * blockSize, count: 2 * Int(blockSize), value: 0xB1)
        try write(caller, device: 1, at: 2047 * blockSize + 512, count: 512, value: 0xB2)
        let stored = caller.sectorState(image: images[0].imageDevId, sector: 10 * sectorsPerBlock)
        #expect(stored.state.chunk_state & BLK_SNAP_CHUNK_ST_STORE_READY != 0)
        #expect(caller.destroy(first).status == .success(0))
        #expect(caller.snapshotCollect(capacity: nil).count == 0)

        // Second backup: the incremental one.
        let second = caller.createOK(devs)
        #expect(caller.waitEvent(second, timeoutMs: 100).event.code == EventCode.lowFreeSpace.rawValue)
        #expect(caller.appendStorage(second, [SectorRange(offset: storageSectors / 2, count: storageSectors / 2)]).status == .success(0))
        #expect(caller.take(second).status == .success(0))
        #expect(caller.collectImages(second, capacity: 2).images.map(\.imageDevId.minor) == [0, 1])

        let secondInfos = caller.trackerCollect(capacity: 2).infos
        #expect(secondInfos.map(\.snapNumber) == [2, 2])
        #expect(secondInfos.map(\.generationId) == firstInfos.map(\.generationId))

        func changed(_ dev: DevId) -> [Int] {
            let (reply, map) = caller.readCbt(dev, length: blockCount)
            #expect(reply.status == .success(Int32(blockCount)))
            return map.indices.filter { map[$0] > baseline }
        }
        #expect(changed(caller.dev0) == [10])
        #expect(changed(caller.dev1) == [100, 101, 2047])

        // The tool learns of a change it cannot see (e.g. a discard it made) and marks it.
        #expect(caller.markDirty(caller.dev0, [SectorRange(offset: 500 * sectorsPerBlock, count: 3 * sectorsPerBlock)])
                .status == .success(0))
        #expect(changed(caller.dev0) == [10, 500, 501, 502])

        // Done: destroy, stop tracking.
        #expect(caller.destroy(second).status == .success(0))
        #expect(caller.snapshotCollect(capacity: nil).count == 0)
        for dev in devs { #expect(caller.trackerRemove(dev).status == .success(0)) }
        let (last, remaining, _) = caller.trackerCollect(capacity: nil)
        #expect(last.status == .success(0))
        #expect(remaining == 0)
    }
}

/// A fresh path in a fresh temporary directory.
private func temporaryLogPath() -> String {
    var template = Array("/tmp/blksnap-setlog-XXXXXX".utf8CString)
    return String(cString: mkdtemp(&template)!) + "/blksnap.log"
}

private func readWholeFile(_ path: String) -> String? {
    guard let fp = fopen(path, "r") else { return nil }
    defer { fclose(fp) }
    var bytes: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = fread(&buffer, 1, buffer.count, fp)
        if n <= 0 { break }
        bytes += buffer[0..<n]
    }
    return String(decoding: bytes, as: UTF8.self)
}
