import BlksnapABI
import BlksnapDevices
import BlksnapEngine
import BlksnapNBD
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
    /// Seconds a request may wait for its reply before the kernel drops the
    /// connection and sends the request again on a new one (which blksnapd
    /// makes at once). This is also how long requests caught in flight by a
    /// crash wait before they go to the restarted blksnapd.
    public var requestTimeout: UInt64 = 30
    /// Seconds the kernel keeps the requests of a device whose server died
    /// before it fails them: the time a restarted blksnapd has to reclaim it.
    public var deadConnectionTimeout: UInt64 = 60
    private let lock = Lock()
    private var reserved = Set<Int>()
    /// Devices connected to this process, by index; `connection` tells the
    /// current socket from one the kernel already dropped.
    private var bound: [Int: (device: any BlockDevice, backend: String, connection: Int)] = [:]
    private var connections = 0

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

    /// The nbd indices the kernel has.
    private func indices() -> [Int] { blockDeviceIndices(named: "nbd") }

    /// A device is configured (has a server, live or dead) while the
    /// kernel shows its pid.
    private func isConfigured(_ index: Int) -> Bool {
        access("/sys/block/nbd\(index)/pid", F_OK) == 0
    }

    public func reserve(image: Bool) throws(BlksnapError) -> MadeDevice {
        let candidates = image ? indices() : indices().reversed()
        let index = lock.withLock { () -> Int? in
            guard let i = candidates.first(where: { !reserved.contains($0) && !isConfigured($0) }) else { return nil }
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

    public func bind(_ made: MadeDevice, to device: any BlockDevice, backend: String) throws(BlksnapError) {
        try connect(made, device, backend: backend, reconfigure: false)
    }

    /// Serves `device` on a new socketpair: CONNECT for a free device,
    /// RECONFIGURE for one whose connection is dead.
    private func connect(_ made: MadeDevice, _ device: any BlockDevice, backend: String,
                         reconfigure: Bool) throws(BlksnapError) {
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            throw BlksnapError(Errno(rawValue: errno), "socketpair for \(made.node)")
        }
        let connection = lock.withLock { () -> Int in
            connections += 1
            bound[made.index] = (device, backend, connections)
            return connections
        }
        let export = Export(name: made.name, device: device)
        server.serveKernel(connectedSocket: fds[1], export: export) { [weak self] in
            self?.lost(made, connection: connection)
        }
        let r = reconfigure
            ? blksnap_nbd_reconfigure(UInt32(made.index), fds[0], deadConnectionTimeout, backend)
            : blksnap_nbd_connect(UInt32(made.index), fds[0], device.size, 512,
                                  UInt64(export.transmissionFlags(structuredReplies: false)),
                                  requestTimeout, deadConnectionTimeout, backend)
        if r != 0 { lock.withLock { _ = bound.removeValue(forKey: made.index) } }
        // The kernel holds its own reference to the socket now.
        close(fds[0])
        guard r == 0 else {
            throw BlksnapError(Errno(rawValue: -r), "cannot \(reconfigure ? "reconnect" : "connect") \(made.node) to blksnapd")
        }
    }

    /// The kernel shut a device's socket while the device is still ours: a
    /// request outlived the request timeout. Its requests wait for a new
    /// connection, so give it one.
    private func lost(_ made: MadeDevice, connection: Int) {
        guard let b = lock.withLock({ bound[made.index] }), b.connection == connection else { return }
        logger.warning("blksnapd: the kernel dropped \(made.node)'s connection (a request waited over \(requestTimeout) s); reconnecting")
        do {
            try connect(made, b.device, backend: b.backend, reconfigure: true)
        } catch {
            logger.error("blksnapd: \(error); \(made.node) fails its requests in \(deadConnectionTimeout) s")
        }
    }

    public func unbind(_ made: MadeDevice) {
        lock.withLock { _ = bound.removeValue(forKey: made.index) }
        let r = blksnap_nbd_disconnect(UInt32(made.index))
        if r != 0 { logger.warning("blksnapd: cannot disconnect \(made.node): \(Errno(rawValue: -r))") }
    }

    public func release(_ made: MadeDevice) {
        _ = lock.withLock { reserved.remove(made.index) }
    }

    // MARK: after a crash

    /// The backend the kernel shows for a configured device (nil: none).
    private func backend(of index: Int) -> String? { readAttribute("/sys/block/nbd\(index)/backend") }

    public func reclaim(_ made: MadeDevice, as device: any BlockDevice, backend: String) throws(BlksnapError) {
        let configured = isConfigured(made.index)
        if configured, let shown = self.backend(of: made.index), shown != backend {
            throw BlksnapError(.resourceBusy, "\(made.node) now serves \(shown), not \(backend)")
        }
        let free = lock.withLock { reserved.insert(made.index).inserted }
        guard free else { throw BlksnapError(.resourceBusy, "\(made.node) is already in use by this blksnapd") }
        do throws(BlksnapError) {
            // A device disconnected meanwhile is connected afresh under its old name.
            try connect(made, device, backend: backend, reconfigure: configured)
        } catch {
            release(made)
            throw error
        }
    }

    public func abandon(_ made: MadeDevice, backend: String) {
        guard isConfigured(made.index) else { return }
        if let shown = self.backend(of: made.index), shown != backend {
            logger.warning("blksnapd: \(made.node) now serves \(shown); left alone")
            return
        }
        let r = blksnap_nbd_disconnect(UInt32(made.index))
        if r != 0 { logger.warning("blksnapd: cannot disconnect \(made.node): \(Errno(rawValue: -r))") }
    }
}
