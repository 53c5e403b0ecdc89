import ArgumentParser
import BlksnapABI
import BlksnapCUSE
import BlksnapControlProtocol
import BlksnapDevices
import BlksnapEngine
import BlksnapFUSE
import BlksnapKernelNBD
import BlksnapLibnbd
import BlksnapNBD
import BlksnapService
import BlksnapControlServer
import CBlksnapABI
import FoundationEssentials
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// blksnapd: the blksnap engine as a daemon. It needs no configuration
/// file: the module's parameters are options with the module's defaults.
@main
struct Blksnapd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "blksnapd",
        abstract: "The blksnap snapshot and change-tracking engine, in user space.",
        discussion: """
            Serves the blksnap v1 interface without a kernel module. State lives \
            under --state-dir (default /run/blksnap). Stop it with SIGINT or \
            SIGTERM: snapshots are destroyed, original devices keep their data, \
            and every CBT map is saved. \
            Started by systemd (blksnapd.service, Type=notify), it reports ready \
            on $NOTIFY_SOCKET once it serves and every declared device is routed, \
            and stopping when a signal comes.

            Declared devices: every *.conf file of --config-dir (default \
            /etc/blksnap), read in name order, holds one device per line, \
            routed at every start before blksnapd is ready:

              # NAME   BACKING                          [size=BYTES] [live]
              vm1      /var/lib/disks/vm1.img           size=10G
              data     /dev/sdb
              remote   nbd+unix:///disk?socket=/run/qsd.sock
              lv       /dev/vg0/data                    live

            NAME (letters, digits, '.', '_', '-'; at most 64) gets the stable \
            link /dev/disk/by-blksnap/NAME. BACKING is an absolute path or an \
            NBD URI, without spaces; size= (bytes, or K, M, G, T) is the size it \
            must have. `live` routes a device-mapper device (an LVM volume) in \
            place, mounted or not, as `blksnapctl attach --live` does (kernel NBD \
            only); on a clean stop it gets its own table back, and the next start \
            routes it again. `blksnapctl attach --name NAME --persist BACKING` \
            (with or without --live) appends a line to devices.conf, `blksnapctl detach --forget NAME` removes it. \
            A malformed file stops blksnapd with its name and line; a missing \
            or resized backing is skipped (blksnapctl status says why).

            Change tracking survives restarts, reboots and crashes: each \
            device's CBT map is saved in --cbt-dir (default /var/lib/blksnap) \
            and restored when the same backing is attached again.

            Examples:
              blksnapd                                   # defaults; run as root
              blksnapd --diff-storage-minimum 262144 --log-level debug
              blksnapd --devices fuse --mode shim        # FUSE+loop devices, preload shim
              blksnapd --metrics 127.0.0.1:9177          # Prometheus text at /metrics
              blksnapd --nbd-tcp 127.0.0.1:10809         # NBD exports over TCP too
              blksnapd --config-dir /etc/blksnap --cbt-dir /var/lib/blksnap
              systemctl start blksnapd                   # as installed by tools/install
            """)

    @Option(help: "Directory of the declared-device files (*.conf).")
    var configDir = "/etc/blksnap"

    @Option(help: "Directory where CBT maps and write-intent records are kept across restarts ('none': not kept, as with the module).")
    var cbtDir = "/var/lib/blksnap"

    @Option(help: "Seconds between saves of every CBT map; a crash marks as written at most the regions written since the last one.")
    var cbtSaveInterval: UInt64 = 60

    @Option(help: "Directory for the lock file and sockets.")
    var stateDir = "/run/blksnap"

    enum Mode: String, ExpressibleByArgument, CaseIterable {
        case auto, cuse, shim
    }

    @Option(help: """
        How tools reach /dev/blksnap: cuse (a real character device; needs /dev/cuse), \
        shim (the preload library over the control socket), or auto (cuse where \
        /dev/cuse exists, else shim). The control socket serves in every mode.
        """)
    var mode: Mode = .auto

    enum Devices: String, ExpressibleByArgument, CaseIterable {
        case auto, nbd, fuse
    }

    @Option(help: """
        What routed devices and images are: nbd (kernel NBD devices; needs the nbd \
        driver, loaded with max_part=0), fuse (a FUSE file with a loop device on it), \
        or auto (nbd where the driver is loaded, else fuse).
        """)
    var devices: Devices = .auto

    @Option(help: """
        Kernel NBD devices: seconds a request may wait for blksnapd's reply before the \
        kernel drops the connection and sends it again on a new one (blksnapd makes one \
        at once). Requests in flight when blksnapd dies wait this long.
        """)
    var nbdRequestTimeout: UInt64 = 30

    @Option(help: """
        Kernel NBD devices: seconds the kernel holds the requests of a device whose \
        blksnapd died; a blksnapd started again within them takes the device over.
        """)
    var nbdDeadTimeout: UInt64 = 60

    @Option(help: """
        Kernel NBD devices: connections (sockets, each with its own server threads) per \
        device, 1 to 16; the kernel sends each CPU's requests on one of them. Default: one \
        per CPU, at most 4. A device reclaimed after a crash keeps the count it was made with.
        """)
    var nbdConnections: Int?

    @Option(help: "Sectors asked for at snapshot creation and in each low-free-space event (module: diff_storage_minimum).")
    var diffStorageMinimum: UInt64 = EngineSettings().diffStorageMinimum

    @Option(help: "Smallest tracking block, as a power of two in bytes.")
    var trackingBlockMinimumShift: Int = EngineSettings().trackingBlockMinimumShift

    @Option(help: "Most tracking blocks per device; blocks grow until the count fits.")
    var trackingBlockMaximumCount: UInt64 = EngineSettings().trackingBlockMaximumCount

    @Option(help: "Smallest chunk (the copy-on-write unit), as a power of two in bytes.")
    var chunkMinimumShift: Int = EngineSettings().chunkMinimumShift

    @Option(help: "Most chunks per device; chunks grow until the count fits.")
    var chunkMaximumCount: UInt64 = EngineSettings().chunkMaximumCount

    @Option(help: "Chunk buffers kept for reuse per device.")
    var chunkMaximumInCache: Int = EngineSettings().chunkMaximumInCache

    @Option(help: "Also serve NBD over TCP at HOST:PORT (default: only the Unix socket nbd.sock in --state-dir).")
    var nbdTcp: String?

    @Option(help: """
        A group whose members may also read the NBD exports through nbd.sock \
        (the socket becomes mode 0660 in that group). Default: root only.
        """)
    var nbdGroup: String?

    @Option(help: ArgumentHelp("""
        Serve Prometheus metrics over HTTP at HOST:PORT, path /metrics (off by default). \
        HOST is a numeric address: 127.0.0.1 or [::1] for this machine only; 0.0.0.0 \
        or [::] only if you mean every interface.
        """, valueName: "host:port"))
    var metrics: String?

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    @Flag(help: """
        Run as the root filesystem's storage daemon, started in the initramfs \
        (the initramfs-tools script does): argv[0] starts with '@' (systemd's \
        convention), a stop signal is refused while "/" is on a routed device, \
        and SIGHUP makes it join the real root of the process that sent it.
        """)
    var rootStorageDaemon = false

    @Flag(help: """
        Where a root storage daemon holds --state-dir, tell it to join the real \
        root, wait until it has, and exit 1 (the unit's ExecCondition= then skips \
        starting a second blksnapd); exit 0 where none runs.
        """)
    var joinRootDaemon = false

    /// The keeper of the FUSE connections (FuseConnectionKeeper), which
    /// blksnapd starts itself; not for people.
    @Flag(name: .customLong(String(FuseConnectionKeeper.option.dropFirst(2))), help: .hidden)
    var keepFuseConnections = false

    var settings: EngineSettings {
        var s = EngineSettings()
        s.diffStorageMinimum = diffStorageMinimum
        s.trackingBlockMinimumShift = trackingBlockMinimumShift
        s.trackingBlockMaximumCount = trackingBlockMaximumCount
        s.chunkMinimumShift = chunkMinimumShift
        s.chunkMaximumCount = chunkMaximumCount
        s.chunkMaximumInCache = chunkMaximumInCache
        return s
    }

    func validate() throws {
        guard (9...26).contains(trackingBlockMinimumShift), (9...26).contains(chunkMinimumShift) else {
            throw ValidationError("shifts must lie between 9 (512 bytes) and 26 (64 MiB)")
        }
        guard (1...86400).contains(cbtSaveInterval) else { throw ValidationError("--cbt-save-interval lies between 1 and 86400 seconds") }
        guard nbdRequestTimeout >= 1, nbdDeadTimeout >= 1 else { throw ValidationError("NBD timeouts are at least 1 second") }
        if let nbdConnections, !(1...NetlinkNbdDriver.maxSockets).contains(nbdConnections) {
            throw ValidationError("--nbd-connections lies between 1 and \(NetlinkNbdDriver.maxSockets)")
        }
        guard diffStorageMinimum >= 16 else { throw ValidationError("--diff-storage-minimum is too small") }
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("unknown log level \(logLevel)") }
        if let metrics {
            do { _ = try ListenAddress(parsing: metrics) } catch { throw ValidationError("--metrics \(error)") }
        }
    }

    /// Swift on Linux reads a program's arguments from /proc/self/cmdline:
    /// where /proc is not mounted (a chroot, an initramfs before its init
    /// mounts it) they read as none, and blksnapd would start with its
    /// defaults whatever it was told (--root-storage-daemon, --state-dir).
    static func main() {
        guard access("/proc/self/cmdline", R_OK) == 0 else {
            let why = "blksnapd: cannot read its own arguments: /proc is not mounted (Swift reads them from /proc/self/cmdline); mount it first (mount -t proc proc /proc)\n"
            _ = why.withCString { write(2, $0, strlen($0)) }
            Glibc.exit(71)  // EX_OSERR
        }
        main(nil)
    }

    func run() throws {
        // stderr always; the SETLOG file too once a tool asks for one.
        let logFile = LogFile()
        LoggingSystem.bootstrap { label in
            MultiplexLogHandler([StreamLogHandler.standardError(label: label), LogFileHandler(file: logFile)])
        }
        var logger = Logger(label: "blksnapd")
        logger.logLevel = Logger.Level(rawValue: logLevel)!
        if keepFuseConnections { FuseConnectionKeeper.serve(listening: 3, logger: logger) }
        if joinRootDaemon { Glibc.exit(JoinRootDaemon.run(stateDir: stateDir, timeoutSeconds: 120)) }
        let rootDaemon = rootStorageDaemon ? RootStorageDaemon(logger: logger) : nil

        let state = try StateDirectory(path: stateDir)
        defer { state.release() }
        // A malformed declaration stops blksnapd before anything is made.
        let declared = try DeclaredDevices.load(directory: configDir)

        // Signals are taken synchronously so shutdown runs on this thread,
        // never inside a signal handler.
        var signals = sigset_t()
        sigemptyset(&signals)
        sigaddset(&signals, SIGINT)
        sigaddset(&signals, SIGTERM)
        sigaddset(&signals, SIGHUP)
        pthread_sigmask(SIG_BLOCK, &signals, nil)

        // Every routed device and image is also an NBD export, named as its
        // kernel device (loop64, nbd15, blksnap-image0), with the CBT context.
        let nbd = try Server(exports: [], logger: logger)
        let nbdSocket = stateDir + "/nbd.sock"
        if let nbdGroup {
            guard let group = getgrnam(nbdGroup) else { throw ValidationError("--nbd-group: no group named \(nbdGroup)") }
            nbd.policy = PeerPolicy(group: group.pointee.gr_gid)
            // The group must reach the socket: it may pass through the
            // state directory, not list it; control.sock stays 0600.
            guard chown(stateDir, 0, group.pointee.gr_gid) == 0, chmod(stateDir, 0o710) == 0 else {
                throw ValidationError("--nbd-group: cannot open \(stateDir) to group \(nbdGroup): \(String(cString: strerror(errno)))")
            }
        }
        try nbd.listen(unixSocket: nbdSocket, group: nbd.policy.group)
        if let nbdTcp {
            let address: ListenAddress
            do { address = try ListenAddress(parsing: nbdTcp, anyPort: true) } catch {
                throw ValidationError("--nbd-tcp takes HOST:PORT, e.g. 127.0.0.1:10809 or [::1]:10809: \(error)")
            }
            _ = try nbd.listen(tcpHost: address.host, port: address.port)
        }
        defer { nbd.stop() }

        // Routed devices and images: kernel NBD devices where the kernel
        // has them, else FUSE files with loop devices on them.
        let useNbd = devices == .nbd || (devices == .auto && KernelNbdDevices.available)
        // Who keeps the FUSE connections (the device filesystem's, the CUSE
        // /dev/blksnap's) across a crash of blksnapd.
        let connectionStore = ConnectionStores.forThisProcess(keeperSocket: stateDir + "/fuse-keeper.sock", logger: logger)
        defer { connectionStore.close() }
        let maker: any DeviceMaker
        if useNbd {
            let nbdDevices = KernelNbdDevices(server: nbd, logger: logger)
            nbdDevices.requestTimeout = nbdRequestTimeout
            nbdDevices.deadConnectionTimeout = nbdDeadTimeout
            if let nbdConnections { nbdDevices.connectionsPerDevice = nbdConnections }
            maker = nbdDevices
        } else {
            maker = FuseLoopDevices(mountpoint: stateDir + "/devices", logger: logger, store: connectionStore)
        }
        // devices.json: what a blksnapd started after this one was killed
        // finds and serves again (kernel NBD) or undoes.
        let dataPlane = DataPlane(maker: maker, logger: logger, listPath: stateDir + "/devices.json",
                                  openURI: { uri throws(BlksnapError) in try NbdBlockDevice(uri: uri) },
                                  cbtDirectory: cbtDir == "none" ? nil : cbtDir, cbtSyncIntervalSeconds: Int64(cbtSaveInterval), devDirectory: "/dev")
        let engine = Engine(settings: settings, hooks: dataPlane, logger: logger, logFile: logFile)
        let exports = DeviceExports(server: nbd, socketPath: nbdSocket, engine: engine, logger: logger)
        dataPlane.onDevice = { event in
            switch event {
            case .added(let name, let device, let devId, let original):
                exports.add(name: name, device: device, devId: devId, original: original)
            case .removed(let name):
                exports.remove(name: name)
            }
        }
        try dataPlane.start(engine: engine)
        defer { dataPlane.stop() }
        let declaredStates = dataPlane.route(declared: declared)
        let saver = CbtSaver()
        saver.start(engine: engine, intervalSeconds: cbtSaveInterval)
        defer { saver.stop() }

        let control = Control(engine: engine)
        let server = ControlServer(path: stateDir + "/control.sock", control: control, logger: logger)
        let status: @Sendable () -> DaemonStatus = { [weak engine] in
            var status = DaemonStatus(engine: engine?.status() ?? EngineStatus(devices: [], trackers: [], snapshots: []))
            status.exports = exports.all
            DeviceRequests.describe(&status, dataPlane, engine)
            return status
        }
        server.status = status
        let requestLogger = logger
        let configDir = configDir
        server.deviceRequests = { type, payload in
            DeviceRequests.answer(type, payload, dataPlane, configDir: configDir, logger: requestLogger)
        }
        try server.start()
        defer { server.stop() }

        var cuse: CUSEDevice?
        let wantCUSE = mode == .cuse || (mode == .auto && access("/dev/cuse", F_OK) == 0)
        if wantCUSE {
            var configuration = CUSEDevice.Configuration()
            configuration.inFlightPath = stateDir + "/cuse-inflight"
            let store = connectionStore
            let device = CUSEDevice(control: control, configuration: configuration,
                                    keeper: SessionKeeper(kind: store.kind, hold: { name, fd throws(BlksnapError) in try store.hold(name, fd: fd) },
                                                          drop: { store.drop($0) }))
            // The first kept connection is taken over; any other is stale.
            var kept = connectionStore.take(prefix: CUSEDevice.keptPrefix).map { KeptSession(name: $0.name, fd: $0.fd) }
            let adopting = kept.isEmpty ? nil : kept.removeFirst()
            for stale in kept { store.drop(stale.name); close(stale.fd) }
            do {
                try device.start(adopting: adopting)
                cuse = device
                logger.info("blksnapd: serving \(device.devicePath) through CUSE")
            } catch {
                guard mode == .auto else { throw error }
                logger.warning("blksnapd: no CUSE device (\(error)); tools reach blksnapd through the preload shim")
            }
        } else {
            logger.info("blksnapd: no /dev/cuse; run tools with `\(Companion.command("blksnapctl")) exec -- TOOL` (the preload shim)")
        }
        defer { cuse?.stop() }

        let metricsServer = try metrics.map { text in
            let responder = HTTPResponder(handler: MetricsExporter(engine: engine, status: status).handler)
            let address = try ListenAddress(parsing: text)
            let port = try responder.start(address)
            logger.info("blksnapd: metrics at http://\(ListenAddress(family: address.family, host: address.host, port: port))/metrics")
            return responder
        }
        defer { metricsServer?.stop() }
        // Ready: every declared device is routed (or skipped, with why).
        let routedCount = declaredStates.filter { $0.state == "routed" }.count
        logger.info("blksnapd: engine ready (diff-storage-minimum \(settings.diffStorageMinimum) sectors, state in \(stateDir), \(routedCount) of \(declaredStates.count) declared device(s) routed)")
        // Only now may systemd start what is ordered after us (fstab's
        // mounts, which may name /dev/disk/by-blksnap/NAME).
        let notify = SystemdNotify()
        do { try notify.ready(status: "serving \(engine.routedDevices.count) routed device(s)") } catch {
            logger.warning("blksnapd: \(error)")
        }

        var received: Int32 = 0
        while true {
            var info = siginfo_t()
            received = sigwaitinfo(&signals, &info)
            if received < 0 { continue }
            if received == SIGHUP {
                if let rootDaemon {
                    rootDaemon.joined(by: info._sifields._kill.si_pid, dataPlane: dataPlane, configDir: configDir, stateDir: stateDir)
                } else {
                    logger.info("blksnapd: SIGHUP ignored (only a root storage daemon joins a root)")
                }
                continue
            }
            if let rootDaemon, rootDaemon.refusesStop(dataPlane) { continue }
            break
        }
        logger.info("blksnapd: signal \(received), shutting down")
        do { try notify.stopping(status: "destroying snapshots, stopping devices") } catch {
            logger.warning("blksnapd: \(error)")
        }
        cuse?.stop()
        cuse = nil
        engine.destroyAll()
        logger.info("blksnapd: stopped; every original device is intact")
    }
}
