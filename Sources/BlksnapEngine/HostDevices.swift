#if canImport(Glibc)
import Glibc
#endif
import BlksnapABI

/// Block devices of the host that the engine does not route: what the
/// engine needs of them is whether a number names one (ENXIO if not), and
/// for difference storage, to open one by number.
public protocol HostDevices: Sendable {
    func exists(_ devId: DevId) -> Bool
    /// A name to show in logs, such as `/dev/sdb`.
    func path(of devId: DevId) -> String?
    func open(_ devId: DevId) throws(BlksnapError) -> any BlockDevice
}

/// The real host: `/sys/dev/block/MJ:MN` says whether a device exists, and
/// its `uevent` names the node under /dev.
public struct SysfsHostDevices: HostDevices {
    public init() {}

    public func exists(_ devId: DevId) -> Bool {
        access("/sys/dev/block/\(devId.major):\(devId.minor)", F_OK) == 0
    }

    public func path(of devId: DevId) -> String? {
        guard let fp = fopen("/sys/dev/block/\(devId.major):\(devId.minor)/uevent", "r") else { return nil }
        defer { fclose(fp) }
        var line = [CChar](repeating: 0, count: 512)
        while fgets(&line, Int32(line.count), fp) != nil {
            let s = String(decoding: line.prefix { $0 != 0 && $0 != 10 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if s.hasPrefix("DEVNAME=") { return "/dev/" + s.dropFirst("DEVNAME=".count) }
        }
        return nil
    }

    public func open(_ devId: DevId) throws(BlksnapError) -> any BlockDevice {
        guard let path = path(of: devId) else {
            throw BlksnapError(.noSuchAddressOrDevice, "no block device \(devId)")
        }
        // Only difference storage is opened here: written beneath the page
        // cache or synchronously, so a failing disk fails the chunk's write.
        return try FileBlockDevice(path: path, directWritesWhenAligned: true, syncWrites: true)
    }
}

/// Where the images of a taken snapshot become block devices, and how the
/// devices of a snapshot are quiesced before TAKE. The data plane provides
/// the real one (freeze, flush, NBD or FUSE plus loop); the engine's own
/// default numbers images virtually, from minor 0 upwards, as the module
/// numbers its image minors.
public protocol SnapshotHooks: AnyObject, Sendable {
    /// Freeze what sits on the devices and flush what the kernel holds, so
    /// every write acknowledged before TAKE has reached the engine; returns
    /// what thaws them.
    func quiesce(_ devices: [RoutedDevice]) throws(BlksnapError) -> @Sendable () -> Void
    /// Makes an image appear as a block device; returns its number.
    func publish(_ image: SnapImage) throws(BlksnapError) -> DevId
    /// Removes an image's block device (DESTROY).
    func withdraw(_ image: SnapImage)
}

/// Images as numbers only, lowest free minor first, under one major.
public final class VirtualImages: SnapshotHooks, @unchecked Sendable {
    public let major: UInt32
    private let lock = Lock()
    private var used = Set<UInt32>()

    public init(major: UInt32 = 252) { self.major = major }

    public func quiesce(_ devices: [RoutedDevice]) throws(BlksnapError) -> @Sendable () -> Void {
        for d in devices { try d.flush() }
        return {}
    }

    public func publish(_ image: SnapImage) throws(BlksnapError) -> DevId {
        lock.withLock {
            var minor: UInt32 = 0
            while used.contains(minor) { minor += 1 }
            used.insert(minor)
            return DevId(major: major, minor: minor)
        }
    }

    public func withdraw(_ image: SnapImage) {
        _ = lock.withLock { used.remove(image.devId.minor) }
    }
}
