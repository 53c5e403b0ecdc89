#if canImport(Glibc)
import Glibc
#endif
import BlksnapABI
import CBlksnapABI
import SystemPackage

/// The v1 interface as a backup program sees it: `/dev/blksnap` and its
/// ioctls, nothing else, so the same calls reach the kernel module, our
/// CUSE device, or blksnapd through the preload shim (`blksnapctl exec`).
public final class BlksnapClient: @unchecked Sendable {
    public let fd: Int32
    public static let path = "/dev/blksnap"

    public init(path: String = BlksnapClient.path) throws(BackupError) {
        let fd = open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else {
            let e = lastErrno()
            throw BackupError(e, e == .noSuchFileOrDirectory
                ? "no \(path): load the blksnap module, start blksnapd with --mode cuse, or run under `blksnapctl exec --`"
                : "cannot open \(path)")
        }
        self.fd = fd
    }

    deinit { close(fd) }

    private func call<T>(_ command: IoctlCommand, _ arg: inout T) throws(BackupError) -> Int32 {
        let rc = withUnsafeMutablePointer(to: &arg) { ioctl(fd, UInt(command.number), UnsafeMutableRawPointer($0)) }
        guard rc >= 0 else { throw BackupError(lastErrno(), "\(command) failed") }
        return rc
    }

    public func version() throws(BackupError) -> Version {
        var v = blk_snap_version()
        _ = try call(.version, &v)
        return Version(c: v)
    }

    public func createSnapshot(_ devices: [DevId]) throws(BackupError) -> UUID16 {
        var ids = devices.map(\.c)
        return try ids.withUnsafeMutableBufferPointer { (buffer) throws(BackupError) -> UUID16 in
            var arg = SnapshotCreate(count: UInt32(buffer.count), devIdArray: UInt64(UInt(bitPattern: buffer.baseAddress))).c
            _ = try call(.snapshotCreate, &arg)
            return UUID16(bytes: arg.id)
        }
    }

    public func destroy(_ id: UUID16) throws(BackupError) {
        var arg = SnapshotIdArgument(id: id).c
        _ = try call(.snapshotDestroy, &arg)
    }

    public func take(_ id: UUID16) throws(BackupError) {
        var arg = SnapshotIdArgument(id: id).c
        _ = try call(.snapshotTake, &arg)
    }

    public func appendStorage(_ id: UUID16, device: DevId, ranges: [SectorRange]) throws(BackupError) {
        var raw = ranges.map(\.c)
        try raw.withUnsafeMutableBufferPointer { (buffer) throws(BackupError) in
            var arg = SnapshotAppendStorage(id: id, devId: device, count: UInt32(buffer.count),
                                            ranges: UInt64(UInt(bitPattern: buffer.baseAddress))).c
            _ = try call(.snapshotAppendStorage, &arg)
        }
    }

    public func images(_ id: UUID16) throws(BackupError) -> [ImageInfo] {
        var arg = SnapshotCollectImages(id: id, count: 0, imageInfoArray: 0).c
        _ = try call(.snapshotCollectImages, &arg)
        // The count comes from outside: a snapshot has few devices.
        guard arg.count <= 4096 else { throw BackupError(.outOfRange, "SNAPSHOT_COLLECT_IMAGES announced \(arg.count) images") }
        var infos = [blk_snap_image_info](repeating: blk_snap_image_info(), count: Int(arg.count))
        let count = arg.count
        try infos.withUnsafeMutableBufferPointer { (buffer) throws(BackupError) in
            arg = SnapshotCollectImages(id: id, count: count, imageInfoArray: UInt64(UInt(bitPattern: buffer.baseAddress))).c
            _ = try call(.snapshotCollectImages, &arg)
        }
        return infos.prefix(Int(min(arg.count, count))).map { ImageInfo(c: $0) }
    }

    public func trackers() throws(BackupError) -> [CbtInfo] {
        var arg = TrackerCollect(count: 0, cbtInfoArray: 0).c
        _ = try call(.trackerCollect, &arg)
        guard arg.count <= 65536 else { throw BackupError(.outOfRange, "TRACKER_COLLECT announced \(arg.count) trackers") }
        let count = arg.count
        var infos = [blk_snap_cbt_info](repeating: blk_snap_cbt_info(), count: Int(count))
        try infos.withUnsafeMutableBufferPointer { (buffer) throws(BackupError) in
            arg = TrackerCollect(count: count, cbtInfoArray: UInt64(UInt(bitPattern: buffer.baseAddress))).c
            _ = try call(.trackerCollect, &arg)
        }
        return infos.prefix(Int(min(arg.count, count))).map { CbtInfo(c: $0) }
    }

    /// The whole read map of a tracked device in a taken snapshot.
    public func readCbtMap(_ info: CbtInfo) throws(BackupError) -> [UInt8] {
        var map = [UInt8](repeating: 0, count: Int(info.blockCount))
        var done = 0
        while done < map.count {
            let step = min(map.count - done, 1 << 20)
            let got = try map.withUnsafeMutableBufferPointer { (buffer) throws(BackupError) -> Int32 in
                var arg = TrackerReadCbtBitmap(devId: info.devId, offset: UInt32(done), length: UInt32(step),
                                               buff: UInt64(UInt(bitPattern: buffer.baseAddress! + done))).c
                return try call(.trackerReadCbtMap, &arg)
            }
            guard got > 0, Int(got) <= step else {
                throw BackupError(.noData, "TRACKER_READ_CBT_MAP of \(info.devId) returned \(got) bytes at \(done) of \(map.count)")
            }
            done += Int(got)
        }
        return map
    }

    public func removeTracker(_ device: DevId) throws(BackupError) {
        var arg = TrackerRemove(devId: device).c
        _ = try call(.trackerRemove, &arg)
    }

    public enum Event: Sendable {
        case lowFreeSpace(requestedSectors: UInt64)
        case corrupted(device: DevId, errno: Int32)
        case unknown(code: UInt32)
    }

    /// One event, or nil when none came within the timeout (ENOENT) or a
    /// signal cut the wait short (EINTR).
    public func waitEvent(_ id: UUID16, timeoutMs: UInt32) throws(BackupError) -> Event? {
        var page = [UInt8](repeating: 0, count: SnapshotEventArgument.size)
        let request = SnapshotEventArgument(id: id, timeoutMs: timeoutMs).wire
        page.replaceSubrange(0..<request.count, with: request)
        let rc = page.withUnsafeMutableBytes { ioctl(fd, UInt(IoctlCommand.snapshotWaitEvent.number), $0.baseAddress!) }
        if rc < 0 {
            let e = lastErrno()
            if e == .noSuchFileOrDirectory || e == .interrupted { return nil }
            throw BackupError(e, "SNAPSHOT_WAIT_EVENT failed")
        }
        let event = SnapshotEventArgument(wire: page)
        switch EventCode(rawValue: event.code) {
        case .lowFreeSpace:
            return .lowFreeSpace(requestedSectors: EventLowFreeSpace(wire: Array(event.data.prefix(EventLowFreeSpace.size))).requestedSectors)
        case .corrupted:
            let c = EventCorrupted(wire: Array(event.data.prefix(EventCorrupted.size)))
            return .corrupted(device: c.origDevId, errno: c.errCode)
        case nil:
            return .unknown(code: event.code)
        }
    }
}

extension DevId {
    /// The device number of a block device node.
    public static func of(blockDevice path: String) throws(BackupError) -> DevId {
        var st = stat()
        guard stat(path, &st) == 0 else { throw BackupError(lastErrno(), "cannot stat \(path)") }
        guard (st.st_mode & S_IFMT) == S_IFBLK else { throw BackupError(.notBlockDevice, "\(path) is not a block device") }
        return DevId(major: bkp_major(st.st_rdev), minor: bkp_minor(st.st_rdev))
    }
}

import CBlksnapBackup
