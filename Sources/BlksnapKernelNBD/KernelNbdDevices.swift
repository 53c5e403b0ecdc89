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
/// generic netlink to socketpairs whose other ends this process's NBD
/// server serves. Load the module with `max_part=0` so that minors are
/// indices: images take the lowest free index (nbd0 gives
/// /dev/blksnap-image0) and routed devices the highest.
///
/// Netlink rather than the ioctls, because it gives a dead-connection
/// timeout: if blksnapd dies, the kernel holds the device's requests that
/// long, and a new blksnapd can reconnect it.
///
/// Each device has `connectionsPerDevice` connections: the kernel makes a
/// hardware queue per connection (at most one per CPU) and sends a queue's
/// requests on its socket, so requests from several CPUs are read and
/// answered by as many server threads instead of queueing behind one
/// reader. The kernel sends a FLUSH on one connection only; that is enough
/// because every connection writes through the same `BlockDevice`, whose
/// flush makes durable whatever any connection had acknowledged (the
/// export announces NBD_FLAG_CAN_MULTI_CONN, which promises exactly that).
public final class KernelNbdDevices: DeviceMaker, @unchecked Sendable {
    public var kind: String { "kernel NBD" }
    public static let major: UInt32 = 43
    let server: Server
    let logger: Logger
    let driver: any NbdDriver
    /// Seconds a request may wait for its reply before the kernel drops the
    /// connection and sends the request again on another (or on a new one,
    /// which blksnapd makes at once). This is also how long requests
    /// caught in flight by a crash wait before they go to the restarted
    /// blksnapd.
    public var requestTimeout: UInt64 = 30
    /// Seconds the kernel keeps the requests of a device whose server died
    /// before it fails them: the time a restarted blksnapd has to reclaim it.
    public var deadConnectionTimeout: UInt64 = 60
    /// Connections a device is made with (1 to `NetlinkNbdDriver.maxSockets`).
    /// A device a blksnapd that died made keeps the count it was made with.
    public var connectionsPerDevice = KernelNbdDevices.defaultConnections
    /// One connection per CPU up to 4: the kernel uses no more than one
    /// per CPU, and past 4 readers the engine, not the socket, is the limit.
    public static var defaultConnections: Int { min(max(Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))), 1), 4) }
    private let lock = Lock()
    private var reserved = Set<Int>()
    /// Devices connected to this process, by index, with the connections
    /// the kernel has now: a socket it dropped is told from one that was
    /// already replaced, or that the device's disconnect shut.
    private var bound: [Int: Bound] = [:]
    private var lastConnection = 0

    private struct Bound {
        var device: any BlockDevice
        var backend: String
        /// Each live connection, with the server's number for it (to end
        /// it), nil until the server took it.
        var live: [Int: Int?]
    }

    public init(server: Server, logger: Logger, driver: any NbdDriver = NetlinkNbdDriver()) {
        self.server = server
        self.logger = logger
        self.driver = driver
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

    public func reserve(image: Bool) throws(BlksnapError) -> MadeDevice {
        let candidates = image ? indices() : indices().reversed()
        let index = lock.withLock { () -> Int? in
            guard let i = candidates.first(where: { !reserved.contains($0) && !driver.isConfigured($0) }) else { return nil }
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
        return MadeDevice(name: "nbd\(index)", node: node, devId: devId, index: index,
                          connections: connectionsPerDevice)
    }

    public func bind(_ made: MadeDevice, to device: any BlockDevice, backend: String) throws(BlksnapError) {
        try connect(made, device, backend: backend, count: made.connections, reconfigure: false)
    }

    /// Serves `device` on `count` new socketpairs: CONNECT for a free
    /// device, RECONFIGURE for one with as many dead connections.
    private func connect(_ made: MadeDevice, _ device: any BlockDevice, backend: String, count: Int,
                         reconfigure: Bool) throws(BlksnapError) {
        guard (1...NetlinkNbdDriver.maxSockets).contains(count) else {
            throw BlksnapError(.invalidArgument, "\(made.node): \(count) connections (1 to \(NetlinkNbdDriver.maxSockets))")
        }
        var kernelEnds: [Int32] = []
        var ourEnds: [Int32] = []
        // The kernel holds its own reference to each socket it took.
        defer { for fd in kernelEnds { close(fd) } }
        for _ in 0..<count {
            var fds: [Int32] = [-1, -1]
            guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
                let e = BlksnapError(Errno(rawValue: errno), "socketpair for \(made.node)")
                for fd in ourEnds { close(fd) }
                throw e
            }
            kernelEnds.append(fds[0])
            ourEnds.append(fds[1])
        }
        let ids = lock.withLock { () -> [Int] in
            let ids = (0..<count).map { _ in
                lastConnection += 1
                return lastConnection
            }
            for id in ids { bound[made.index, default: Bound(device: device, backend: backend, live: [:])].live[id] = .some(nil) }
            return ids
        }
        let export = Export(name: made.name, device: device)
        for (fd, id) in zip(ourEnds, ids) {
            let served = server.serveKernel(connectedSocket: fd, export: export) { [weak self] in
                self?.lost(made, connection: id)
            }
            lock.withLock { if bound[made.index]?.live[id] != nil { bound[made.index]?.live[id] = served } }
        }
        do throws(Errno) {
            if reconfigure {
                try driver.reconfigure(index: made.index, sockets: kernelEnds, deadTimeout: deadConnectionTimeout,
                                       backend: backend)
            } else {
                try driver.connect(index: made.index, sockets: kernelEnds, size: device.size,
                                   serverFlags: UInt64(export.transmissionFlags(structuredReplies: false)),
                                   requestTimeout: requestTimeout, deadTimeout: deadConnectionTimeout, backend: backend)
            }
        } catch {
            // Forgotten before the kernel ends close: their end of stream
            // must not look like a connection to replace.
            lock.withLock {
                for id in ids { bound[made.index]?.live[id] = nil }
                if bound[made.index]?.live.isEmpty == true { bound[made.index] = nil }
            }
            throw BlksnapError(error, "cannot \(reconfigure ? "reconnect" : "connect") \(made.node) to blksnapd")
        }
    }

    /// The kernel shut one of a device's sockets while the device is still
    /// ours: a request on it outlived the request timeout. The kernel marks
    /// that connection dead and sends its requests on the others (or holds
    /// them, where none is left), so give it exactly one in its place: one
    /// more would be dropped by the kernel and come back here.
    private func lost(_ made: MadeDevice, connection: Int) {
        let b = lock.withLock { () -> Bound? in
            guard bound[made.index]?.live.removeValue(forKey: connection) != nil else { return nil }
            return bound[made.index]
        }
        guard let b else { return }
        logger.warning("blksnapd: the kernel dropped \(made.node)'s connection (a request waited over \(requestTimeout) s); reconnecting")
        do {
            try connect(made, b.device, backend: b.backend, count: 1, reconfigure: true)
        } catch {
            logger.error("blksnapd: \(error); \(made.node) fails its requests in \(deadConnectionTimeout) s")
        }
    }

    public func unbind(_ made: MadeDevice) {
        lock.withLock { _ = bound.removeValue(forKey: made.index) }
        do throws(Errno) {
            try driver.disconnect(index: made.index)
        } catch {
            logger.warning("blksnapd: cannot disconnect \(made.node): \(error)")
        }
    }

    public func release(_ made: MadeDevice) {
        _ = lock.withLock { reserved.remove(made.index) }
    }

    /// Ends the device's connections (what they read completes first) but
    /// leaves the device configured, as a crash of blksnapd would: the
    /// kernel holds its requests for the dead-connection timeout, and a
    /// blksnapd started within it reclaims the device from the saved list.
    public func leave(_ made: MadeDevice) -> Bool {
        guard let b = lock.withLock({ bound.removeValue(forKey: made.index) }) else { return false }
        server.end(connections: b.live.values.compactMap { $0 })
        return true
    }

    /// The connections a device has now (0: none of ours): for status and tests.
    public func connectionCount(_ made: MadeDevice) -> Int {
        lock.withLock { bound[made.index]?.live.count ?? 0 }
    }

    public func servingConnections(_ made: MadeDevice) -> Int? { connectionCount(made) }

    // MARK: after a crash

    public func reclaim(_ made: MadeDevice, as device: any BlockDevice, backend: String) throws(BlksnapError) {
        let configured = driver.isConfigured(made.index)
        if configured, let shown = driver.backend(of: made.index), shown != backend {
            throw BlksnapError(.resourceBusy, "\(made.node) now serves \(shown), not \(backend)")
        }
        let free = lock.withLock { reserved.insert(made.index).inserted }
        guard free else { throw BlksnapError(.resourceBusy, "\(made.node) is already in use by this blksnapd") }
        do throws(BlksnapError) {
            // A device disconnected meanwhile is connected afresh under
            // its old name. All its connections died with the old
            // blksnapd: each gets a socket (the count comes from the saved
            // list, which connect checks).
            try connect(made, device, backend: backend, count: made.connections, reconfigure: configured)
        } catch {
            release(made)
            throw error
        }
    }

    public func abandon(_ made: MadeDevice, backend: String) {
        guard driver.isConfigured(made.index) else { return }
        if let shown = driver.backend(of: made.index), shown != backend {
            logger.warning("blksnapd: \(made.node) now serves \(shown); left alone")
            return
        }
        do throws(Errno) {
            try driver.disconnect(index: made.index)
        } catch {
            logger.warning("blksnapd: cannot disconnect \(made.node): \(error)")
        }
    }
}
