import BlksnapABI
import BlksnapDevices
import BlksnapEngine
import CBlksnapLinux
import Logging
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Block devices where the kernel has `nbd`: /dev/nbdN connected over
/// generic netlink to one end of a socketpair whose other end this
/// process's NBD server serves. Load the module with `max_part=0` so that
/// minors are indices: images take the lowest free index (nbd0 gives
/// /dev/blksnap-image0) and routed devices the highest.
///
/// Netlink rather than the ioctls, because it gives a dead-connection
/// timeout: if blksnapd dies, the kernel holds the device's requests that
/// long, and a new blksnapd can reconnect it.
public final class KernelNbdDevices: DeviceMaker, @unchecked Sendable {
    public var kind: String { "kernel NBD" }
    public static let major: UInt32 = 43
    let server: Server
    let logger: Logger
    /// Seconds a request may take before the kernel fails it.
    public var requestTimeout: UInt64 = 120
    /// Seconds the kernel keeps a device whose server died.
    public var deadConnectionTimeout: UInt64 = 60
    private let lock = Lock()
    private var reserved = Set<Int>()

    public init(server: Server, logger: Logger) {
        self.server = server
        self.logger = logger
    }

    /// Whether this kernel has the nbd driver loaded.
    public static var available: Bool { blksnap_nbd_available() == 0 && access("/dev/nbd0", F_OK) == 0 }

    public func start() throws(BlksnapError) {
        let r = blksnap_nbd_available()
        guard r == 0 else {
            throw BlksnapError(Errno(rawValue: -r), "the kernel's nbd driver is not loaded (modprobe nbd max_part=0)")
        }
    }

    public func stop() {}

    /// The nbd indices the kernel has, from /sys/block.
    private func indices() -> [Int] {
        var found: [Int] = []
        guard let dir = opendir("/sys/block") else { return [] }
        defer { closedir(dir) }
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name.hasPrefix("nbd"), let i = Int(name.dropFirst(3)) { found.append(i) }
        }
        return found.sorted()
    }

    /// A device is free when the kernel reports no server for it.
    private func isFree(_ index: Int) -> Bool {
        access("/sys/block/nbd\(index)/pid", F_OK) != 0
    }

    public func reserve(image: Bool) throws(BlksnapError) -> MadeDevice {
        let candidates = image ? indices() : indices().reversed()
        let index = lock.withLock { () -> Int? in
            guard let i = candidates.first(where: { !reserved.contains($0) && isFree($0) }) else { return nil }
            reserved.insert(i)
            return i
        }
        guard let index else {
            throw BlksnapError(.noSpace, "no free nbd device (load the module with more: modprobe nbd nbds_max=64 max_part=0)")
        }
        let node = "/dev/nbd\(index)"
        var st = stat()
        let devId = stat(node, &st) == 0
            ? DevId(major: blksnap_major(st.st_rdev), minor: blksnap_minor(st.st_rdev))
            : DevId(major: Self.major, minor: UInt32(index))
        return MadeDevice(name: "nbd\(index)", node: node, devId: devId, index: index)
    }

    public func bind(_ made: MadeDevice, to device: any BlockDevice) throws(BlksnapError) {
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            throw BlksnapError(Errno(rawValue: errno), "socketpair for \(made.node)")
        }
        let export = Export(name: made.name, device: device)
        server.serveKernel(connectedSocket: fds[1], export: export)
        let flags = UInt64(export.transmissionFlags(structuredReplies: false))
        let r = blksnap_nbd_connect(UInt32(made.index), fds[0], device.size, 512, flags,
                                    requestTimeout, deadConnectionTimeout)
        // The kernel holds its own reference to the socket now.
        close(fds[0])
        guard r == 0 else {
            throw BlksnapError(Errno(rawValue: -r), "cannot connect \(made.node) to blksnapd")
        }
    }

    public func unbind(_ made: MadeDevice) {
        let r = blksnap_nbd_disconnect(UInt32(made.index))
        if r != 0 { logger.warning("blksnapd: cannot disconnect \(made.node): \(Errno(rawValue: -r))") }
    }

    public func release(_ made: MadeDevice) {
        _ = lock.withLock { reserved.remove(made.index) }
    }
}
