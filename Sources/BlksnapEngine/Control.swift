import BlksnapABI
import CBlksnapABI
import Logging
import SystemPackage

/// The control interface (upstream `ctrl.c`): one small handler per
/// command that copies the caller's struct, calls the concept, and copies
/// results back. Both ways in (CUSE and the preload shim) call `dispatch`
/// and hold no logic of their own.
///
/// It follows the real data flow of each command, never the direction bits
/// encoded in its number, and the errnos of the v1 module (ABI-v1.md),
/// without the module's listed defects.
public struct Control: Sendable {
    public let engine: Engine

    /// Our answer to MOD: the optional commands are all served.
    public static let modification = ModInfo(
        compatibilityFlags: ModInfo.flagDebugSectorState | ModInfo.flagSetlog, name: "blksnap-swift")
    public static let version = Version(major: 1, minor: 0, revision: 0, build: 0)
    /// Caller arrays beyond this many bytes are refused with ENOMEM, as the
    /// module's kcalloc of a huge count would be.
    public static let arrayLimit = 256 << 20

    public init(engine: Engine) { self.engine = engine }

    /// Runs one ioctl: `command` is the request number, `argument` the
    /// address passed as its third argument.
    public func dispatch(command number: UInt32, argument: UInt64, memory: some CallerMemory) -> ControlReply {
        guard let command = IoctlCommand(number: number) else {
            engine.logger.debug("blksnap-ctrl: unknown command 0x\(String(number, radix: 16))")
            return ControlReply(status: .failure(Errno.inappropriateIOCTLForDevice.rawValue), writes: [])
        }
        var call = Call(memory: memory, argument: argument, command: command, logger: engine.logger)
        let status: ControlReply.Status
        do throws(BlksnapError) {
            status = .success(try handle(command, &call))
        } catch {
            engine.logger.info("blksnap-ctrl: \(command) failed: \(error)")
            status = .failure(error.errno.rawValue)
        }
        return ControlReply(status: status, writes: call.writes)
    }

    private func handle<M: CallerMemory>(_ command: IoctlCommand, _ call: inout Call<M>) throws(BlksnapError) -> Int32 {
        switch command {
        case .version: try version(&call)
        case .trackerRemove: try trackerRemove(&call)
        case .trackerCollect: try trackerCollect(&call)
        case .trackerReadCbtMap: try trackerReadCbtMap(&call)
        case .trackerMarkDirtyBlocks: try trackerMarkDirtyBlocks(&call)
        case .snapshotCreate: try snapshotCreate(&call)
        case .snapshotDestroy: try snapshotDestroy(&call)
        case .snapshotAppendStorage: try snapshotAppendStorage(&call)
        case .snapshotTake: try snapshotTake(&call)
        case .snapshotCollect: try snapshotCollect(&call)
        case .snapshotCollectImages: try snapshotCollectImages(&call)
        case .snapshotWaitEvent: try snapshotWaitEvent(&call)
        case .mod: try mod(&call)
        case .setlog: try setlog(&call)
        case .getSectorState: try getSectorState(&call)
        }
    }

    // MARK: handlers, in the order of enum blk_snap_ioctl

    private func version<M>(_ call: inout Call<M>) throws(BlksnapError) -> Int32 {
        try call.writeArgument(Self.version)
        return 0
    }

    private func trackerRemove<M>(_ call: inout Call<M>) throws(BlksnapError) -> Int32 {
        let arg = try call.readArgument(TrackerRemove.self)
        try engine.removeTracker(arg.devId)
        return 0
    }

    private func trackerCollect<M>(_ call: inout Call<M>) throws(BlksnapError) -> Int32 {
        var arg = try call.readArgument(TrackerCollect.self)
        let infos = engine.collectTrackers()
        if arg.cbtInfoArray != 0 {
            guard infos.count <= Int(arg.count) else {
                throw BlksnapError(.noBufferSpace, "\(infos.count) trackers do not fit an array of \(arg.count)")
            }
            try call.write(infos.flatMap(\.wire), at: arg.cbtInfoArray)
        }
        arg.count = UInt32(infos.count)
        try call.writeArgument(arg)
        return 0
    }

    private func trackerReadCbtMap<M>(_ call: inout Call<M>) throws(BlksnapError) -> Int32 {
        let arg = try call.readArgument(TrackerReadCbtBitmap.self)
        let bytes = try engine.readCbtMap(arg.devId, offset: arg.offset, length: arg.length)
        try call.write(bytes, at: arg.buff)
        return Int32(bytes.count)
    }

    private func trackerMarkDirtyBlocks<M>(_ call: inout Call<M>) throws(BlksnapError) -> Int32 {
        let arg = try call.readArgument(TrackerMarkDirtyBlocks.self)
        let ranges = try call.readArray(SectorRange.self, at: arg.dirtyBlocksArray, count: arg.count)
        try engine.markDirty(arg.devId, ranges: ranges)
        return 0
    }

    private func snapshotCreate<M>(_ call: inout Call<M>) throws(BlksnapError) -> Int32 {
        var arg = try call.readArgument(SnapshotCreate.self)
        let devIds = try call.readArray(DevId.self, at: arg.devIdArray, count: arg.count)
        arg.id = try engine.createSnapshot(devIds)
        try call.writeArgument(arg)
        return 0
    }

    private func snapshotDestroy<M>(_ call: inout Call<M>) throws(BlksnapError) -> Int32 {
        let arg = try call.readArgument(SnapshotIdArgument.self)
        try engine.destroySnapshot(arg.id)
        return 0
    }

    private func snapshotAppendStorage<M>(_ call: inout Call<M>) throws(BlksnapError) -> Int32 {
        let arg = try call.readArgument(SnapshotAppendStorage.self, fault: .invalidArgument)
        let ranges = try call.readArray(SectorRange.self, at: arg.ranges, count: arg.count)
        try engine.appendStorage(arg.id, device: arg.devId, ranges: ranges)
        return 0
    }

    private func snapshotTake<M>(_ call: inout Call<M>) throws(BlksnapError) -> Int32 {
        let arg = try call.readArgument(SnapshotIdArgument.self)
        try engine.takeSnapshot(arg.id)
        return 0
    }

    private func snapshotCollect<M>(_ call: inout Call<M>) throws(BlksnapError) -> Int32 {
        var arg = try call.readArgument(SnapshotCollect.self)
        let ids = engine.collectSnapshots()
        var result: BlksnapError?
        if arg.ids == 0 {
            arg.count = UInt32(ids.count)
        } else {
            let fitting = min(ids.count, Int(arg.count))
            if fitting < ids.count {
                result = BlksnapError(.noData, "\(ids.count) snapshots do not fit an array of \(arg.count)")
            }
            // As the module: the ids that fit are copied, and count says how many.
            if fitting > 0 { try call.write(ids.prefix(fitting).flatMap(\.array), at: arg.ids) }
            arg.count = UInt32(fitting)
        }
        try call.writeArgument(arg)
        if let result { throw result }
        return 0
    }

    private func snapshotCollectImages<M>(_ call: inout Call<M>) throws(BlksnapError) -> Int32 {
        var arg = try call.readArgument(SnapshotCollectImages.self)
        let (count, images) = try engine.collectImages(arg.id)
        let given = arg.count
        arg.count = UInt32(count)
        guard let images else {
            try call.writeArgument(arg)
            throw BlksnapError(.operationNotSupportedByDevice, "snapshot \(arg.id) is not taken")
        }
        if arg.imageInfoArray != 0 {
            guard given >= UInt32(count) else {
                try call.writeArgument(arg)
                throw BlksnapError(.noData, "\(count) images do not fit an array of \(given)")
            }
            try call.write(images.flatMap(\.wire), at: arg.imageInfoArray)
        }
        try call.writeArgument(arg)
        return 0
    }

    private func snapshotWaitEvent<M>(_ call: inout Call<M>) throws(BlksnapError) -> Int32 {
        guard let bytes = call.memory.read(at: call.argument, count: SnapshotEventArgument.size) else {
            throw BlksnapError(.invalidArgument, "cannot read the event struct")
        }
        var arg = SnapshotEventArgument(wire: bytes)
        let event = try engine.waitEvent(arg.id, timeoutMs: arg.timeoutMs)
        arg.code = event.code.rawValue
        arg.timeLabel = event.timeLabel
        arg.data = event.data
        try call.write(arg.wire, at: call.argument, fault: .invalidArgument)
        return 0
    }

    private func mod<M>(_ call: inout Call<M>) throws(BlksnapError) -> Int32 {
        try call.writeArgument(Self.modification)
        return 0
    }

    private func setlog<M>(_ call: inout Call<M>) throws(BlksnapError) -> Int32 {
        let arg = try call.readArgument(SetLog.self)
        guard arg.filepath != 0 else {
            try engine.setLog(nil)
            return 0
        }
        guard arg.filepathSize > 0 else {
            throw BlksnapError(.invalidArgument, "filepath_size cannot be zero")
        }
        let raw = try call.readBytes(at: arg.filepath, count: arg.filepathSize)
        let path = String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        try engine.setLog(Engine.LogConfig(level: arg.level, path: path, tzMinutesWest: arg.tzMinutesWest))
        return 0
    }

    private func getSectorState<M>(_ call: inout Call<M>) throws(BlksnapError) -> Int32 {
        var arg = try call.readArgument(GetSectorState.self)
        arg.state = try engine.sectorState(image: arg.imageDevId, sector: arg.sector)
        try call.writeArgument(arg)
        return 0
    }
}

/// One ioctl in progress: reads through the caller's memory, collects the
/// writes. A failed copy gives ENODATA, as the module's copy_*_user checks
/// do, unless the command says otherwise (APPEND_STORAGE and WAIT_EVENT
/// give EINVAL for their struct).
struct Call<M: CallerMemory> {
    let memory: M
    let argument: UInt64
    let command: IoctlCommand
    let logger: Logger
    var writes: [CallerWrite] = []

    func readArgument<T: WireStruct>(_ type: T.Type, fault: Errno = .noData) throws(BlksnapError) -> T {
        guard let bytes = memory.read(at: argument, count: T.size) else {
            throw BlksnapError(fault, "\(command): invalid user buffer")
        }
        return T(wire: bytes)
    }

    func readArray<T: WireStruct>(_ type: T.Type, at address: UInt64, count: UInt32) throws(BlksnapError) -> [T] {
        let bytes = try readBytes(at: address, count: count, elementSize: T.size)
        return (0..<Int(count)).map { i in T(wire: Array(bytes[(i * T.size)..<((i + 1) * T.size)])) }
    }

    /// The bytes of an array of `count` elements. A byte array is read with
    /// this directly: read as one-byte elements it made an allocation per
    /// byte, and SETLOG's path (up to `arrayLimit` bytes, as the module's
    /// kzalloc allows) held the dispatcher for seconds.
    func readBytes(at address: UInt64, count: UInt32, elementSize: Int = 1) throws(BlksnapError) -> [UInt8] {
        guard count > 0 else { return [] }
        let total = Int(count) * elementSize
        guard total <= Control.arrayLimit else {
            throw BlksnapError(.noMemory, "\(command): \(count) elements are too many")
        }
        guard let bytes = memory.read(at: address, count: total) else {
            throw BlksnapError(.noData, "\(command): invalid user buffer for the array")
        }
        return bytes
    }

    mutating func write(_ bytes: [UInt8], at address: UInt64, fault: Errno = .noData) throws(BlksnapError) {
        guard !bytes.isEmpty else { return }
        guard memory.canWrite(at: address, count: bytes.count) else {
            throw BlksnapError(fault, "\(command): invalid user buffer for the result")
        }
        writes.append(CallerWrite(address: address, bytes: bytes))
    }

    mutating func writeArgument<T: WireStruct>(_ value: T) throws(BlksnapError) {
        try write(value.wire, at: argument)
    }
}

extension UInt8: WireStruct {
    public init(c: UInt8) { self = c }
    public var c: UInt8 { self }
}
