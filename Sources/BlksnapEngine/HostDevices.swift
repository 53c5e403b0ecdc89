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
