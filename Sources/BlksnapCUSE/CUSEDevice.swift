import BlksnapEngine
import CFuse3
#if canImport(Glibc)
import Glibc
#endif

/// /dev/blksnap as a CUSE character device: the kernel forwards each
/// open, release and ioctl of the node to this process, which answers them
/// through `IoctlStateMachine` and the shared dispatcher.
///
/// `start` registers the device and returns once its node is there;
/// `stop` ends the session, which makes the kernel remove the node, and
/// touches nothing else. Both may be called from any thread.
public final class CUSEDevice: @unchecked Sendable {
    public struct Configuration: Sendable {
        /// The node's name under /dev (the kernel's DEVNAME).
        public var name = "blksnap"
        public var cusePath = "/dev/cuse"
        /// What the module's node has (ABI-v1.md); also the kernel's
        /// default for CUSE nodes, enforced in case udev rules differ.
        public var mode: mode_t = 0o600
        /// Most requests served at once; each sleeping WAIT_EVENT holds one.
        public var maxThreads: UInt32 = 64
        /// How long `start` waits for the kernel to accept the device.
        public var readyTimeoutMs = 5000
        /// Interrupts the session loop's wait when stopping (see `SessionLoop`).
        public var wakeSignal: Int32 = SIGUSR2
        /// Where the requests being answered are counted (`InFlightRecord`),
        /// for the blksnapd after this one; nil: not counted, and a kept
        /// connection is taken over only where the kernel sends its
        /// unanswered requests again.
        public var inFlightPath: String?

        public init() {}
    }

    public let configuration: Configuration
    let machine: IoctlStateMachine
    private let control: Control
    private let keeper: SessionKeeper?
    private(set) var inFlight: InFlightRecord?

    private let lock = Lock()
    private let changed = Condition()
    private var session: OpaquePointer?
    private var loopThread: pthread_t?
    private var initialized = false
    private var loopEnded = false
    private var loopResult: Int32 = 0
    private var stopping = false
    /// What the kernel said in CUSE_INIT: the name the connection is kept under.
    private var said: CUSEInit?
    /// The name the keeper holds the connection under, once it does.
    private var keptName: String?

    /// `keeper`: who keeps a duplicate of the connection, so that
    /// /dev/blksnap and its open descriptors outlive a kill -9 (nil: the
    /// device dies with this process).
    public init(control: Control, configuration: Configuration = Configuration(), keeper: SessionKeeper? = nil) {
        self.control = control
        self.configuration = configuration
        self.keeper = keeper
        machine = IoctlStateMachine(control: control)
    }

    /// Names of kept connections that are this device's, for the store's take.
    public static let keptPrefix = CUSEInit.prefix

    public var devicePath: String { "/dev/" + configuration.name }

    /// Whether the session is serving requests.
    public var isRunning: Bool { lock.withLock { session != nil && initialized && !loopEnded } }

    /// Registers the device and serves it on libfuse's threads; or, given
    /// `kept` (the connection a blksnapd that died left with the keeper),
    /// serves that one: /dev/blksnap stays, and a tool that held it open
    /// across the crash is answered. Where that cannot be done safely
    /// (`adopt`), the kept connection is let go (its callers get an error
    /// and the node goes) and a new device is registered.
    public func start(adopting kept: KeptSession? = nil) throws(BlksnapError) {
        try lock.withLock { () throws(BlksnapError) in
            guard session == nil else { throw BlksnapError(.resourceBusy, "\(devicePath) is served already") }
        }
        if let path = configuration.inFlightPath {
            do throws(BlksnapError) {
                inFlight = try InFlightRecord(path: path)
            } catch {
                control.engine.logger.warning("blksnap-cuse: \(error); requests of \(devicePath) are not counted")
            }
        }
        if let kept {
            do throws(BlksnapError) {
                try adopt(kept)
                return
            } catch {
                control.engine.logger.warning("blksnap-cuse: \(error)")
                letGo(kept)
            }
        }
        let cuse = configuration.cusePath
        guard access(cuse, F_OK) == 0 else {
            throw BlksnapError(.noSuchFileOrDirectory,
                               "no \(cuse): this kernel has no CUSE; use the preload shim (--mode shim)")
        }
        // The kernel would refuse a second device of the same name only
        // after accepting our session; say why up front instead.
        guard access(devicePath, F_OK) != 0 else {
            throw BlksnapError(.fileExists, "\(devicePath) exists: the blksnap module or another blksnapd serves it")
        }
        let fd = open(cuse, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw BlksnapError(.init(rawValue: errno), "cannot open \(cuse)") }
        guard let session = makeSession(fd) else {
            close(fd)
            throw BlksnapError(.noMemory, "libfuse could not create the CUSE session")
        }

        install(session)
        try startLoop(session)

        let deadline = monotonicNanoseconds() + UInt64(configuration.readyTimeoutMs) * 1_000_000
        let accepted = lock.withLock { () -> Bool in
            while !initialized && !loopEnded {
                if !changed.wait(lock, untilMonotonic: deadline) { break }
            }
            return initialized && !loopEnded
        }
        guard accepted, waitForNode(until: deadline) else {
            let result = lock.withLock { loopResult }
            stop()
            throw BlksnapError(.init(rawValue: result != 0 ? abs(result) : EIO),
                               "the kernel did not bring up \(devicePath) through \(cuse)")
        }
        keepConnection()
        control.engine.logger.info("blksnap-cuse: serving \(devicePath)")
    }

    /// Hands the keeper a duplicate of the connection, under a name that
    /// says what the kernel said in CUSE_INIT.
    private func keepConnection() {
        guard let keeper else { return }
        guard let (name, fd) = lock.withLock({ () -> (String, Int32)? in
            guard let session, let said else { return nil }
            return (said.name, fuse_session_fd(session))
        }) else { return }
        do throws(BlksnapError) {
            try keeper.hold(name, fd)
            lock.withLock { keptName = name }
            control.engine.logger.info("blksnap-cuse: \(keeper.kind) keeps the connection of \(devicePath), so it outlives a crash of blksnapd")
        } catch {
            control.engine.logger.warning("blksnap-cuse: \(error); a crash of blksnapd will take \(devicePath) with it")
        }
    }

    /// Serves `kept`, the connection of a blksnapd that died. Requests the
    /// dead one had read and not answered are sent again by the kernel
    /// (FUSE_NOTIFY_RESEND, Linux 6.9). A kernel without it would leave
    /// their callers waiting for ever, which is worse than an error: there
    /// the connection is taken over only when the dead one was answering
    /// nothing (`InFlightRecord`), else this throws and `start` lets it go.
    private func adopt(_ kept: KeptSession) throws(BlksnapError) {
        guard let initial = CUSEInit(name: kept.name) else {
            throw BlksnapError(.invalidArgument, "a kept connection named \(kept.name) is not \(devicePath)'s")
        }
        var p = pollfd(fd: kept.fd, events: 0, revents: 0)
        guard poll(&p, 1, 0) == 0 else {
            throw BlksnapError(.operationNotSupportedByDevice, "the kept connection of \(devicePath) is gone")
        }
        let resent: Bool
        if let refused = CUSEInit.resend(on: kept.fd) {
            let unanswered = inFlight?.previous
            guard unanswered == 0 else {
                throw BlksnapError(.notSupported, """
                    this kernel cannot send requests again (FUSE_NOTIFY_RESEND, Linux 6.9; it answered \
                    \(String(cString: strerror(refused)))) and the blksnapd that died was answering \
                    \(unanswered.map { String($0) } ?? "an unknown number of") request(s) of \(devicePath); \
                    their callers would wait for ever, so the connection is let go: they and every \
                    descriptor of \(devicePath) open before the crash get an error, and a new \(devicePath) is made
                    """)
            }
            resent = false
        } else {
            resent = true
        }
        // The session owns (and closes) a duplicate; `kept.fd` is closed
        // once taken over, or by `letGo`.
        let fd = dup(kept.fd)
        guard fd >= 0 else { throw BlksnapError(.init(rawValue: errno), "cannot duplicate the kept connection of \(devicePath)") }
        guard let session = makeSession(fd) else {
            close(fd)
            throw BlksnapError(.noMemory, "libfuse could not take over the CUSE session of \(devicePath)")
        }
        install(session, keptName: kept.name)
        // Before any request is read: libfuse answers nothing before INIT.
        var request = initial.request
        request.withUnsafeMutableBytes { cfuse3_process_request(session, $0.baseAddress, $0.count) }
        guard lock.withLock({ initialized }) else {
            lock.withLock { self.session = nil; keptName = nil }
            fuse_session_destroy(session)
            throw BlksnapError(.protocolError, "libfuse refused the CUSE_INIT made for the kept connection \(kept.name)")
        }
        try startLoop(session)
        close(kept.fd)
        control.engine.logger.notice("""
            blksnap-cuse: took over \(devicePath) from a blksnapd that died; \
            \(resent ? "the kernel sends again what it had read and not answered" : "none of its requests was in flight")
            """)
    }

    /// Closes a kept connection that is not taken over: once the keeper
    /// closes its duplicate too, the kernel fails the requests waiting on
    /// it and removes the node, which a new device may then take.
    private func letGo(_ kept: KeptSession) {
        keeper?.drop(kept.name)
        close(kept.fd)
        let deadline = monotonicNanoseconds() + 5_000_000_000
        while access(devicePath, F_OK) == 0 && monotonicNanoseconds() < deadline { usleep(20_000) }
    }

    /// Ends the session: in-flight requests finish (a WAIT_EVENT within
    /// its timeout), then the kernel removes the node.
    public func stop() {
        let owned = lock.withLock { () -> (OpaquePointer, pthread_t)? in
            guard let session, let loopThread, !stopping else { return nil }
            stopping = true
            return (session, loopThread)
        }
        guard let (session, thread) = owned else {
            // Another caller is stopping it: wait until it is done.
            lock.withLock { while stopping { changed.wait(lock) } }
            return
        }
        fuse_session_exit(session)
        lock.withLock {
            // Re-sent: the first may land just before the loop starts waiting.
            while !loopEnded {
                pthread_kill(thread, configuration.wakeSignal)
                _ = changed.wait(lock, untilMonotonic: monotonicNanoseconds() + 50_000_000)
            }
        }
        pthread_join(thread, nil)
        // The kept duplicate first, so that closing ours ends the connection.
        if let name = lock.withLock({ keptName }) { keeper?.drop(name) }
        // Closes /dev/cuse: the kernel then drops /dev/blksnap.
        fuse_session_destroy(session)
        lock.withLock {
            self.session = nil
            loopThread = nil
            stopping = false
            changed.broadcast()
        }
        control.engine.logger.info("blksnap-cuse: \(devicePath) is gone")
    }

    // MARK: session

    private func makeSession(_ fd: Int32) -> OpaquePointer? {
        let program = strdup("blksnapd")
        let devname = strdup("DEVNAME=\(configuration.name)")
        defer {
            free(program)
            free(devname)
        }
        var argv: [UnsafeMutablePointer<CChar>?] = [program, nil]
        var devinfo: [UnsafePointer<CChar>?] = [UnsafePointer(devname)]
        var ops = CUSEOperations.table()
        let userdata = Unmanaged.passUnretained(self).toOpaque()
        // libfuse copies the device info and the operations.
        let session = argv.withUnsafeMutableBufferPointer { argvBuffer in
            devinfo.withUnsafeMutableBufferPointer { devinfoBuffer -> OpaquePointer? in
                var args = fuse_args(argc: 1, argv: argvBuffer.baseAddress, allocated: 0)
                defer { fuse_opt_free_args(&args) }
                var info = cuse_info(dev_major: 0, dev_minor: 0, dev_info_argc: 1,
                                     dev_info_argv: devinfoBuffer.baseAddress,
                                     flags: UInt32(CUSE_UNRESTRICTED_IOCTL))
                return cuse_lowlevel_new(&args, &info, &ops, userdata)
            }
        }
        guard let session else { return nil }
        // "/dev/fd/N" hands libfuse a channel we opened ourselves, so the
        // errors of opening /dev/cuse are ours to report.
        guard fuse_session_mount(session, "/dev/fd/\(fd)") == 0 else {
            fuse_session_destroy(session)
            return nil
        }
        return session
    }

    /// Makes `session` the device's, not yet serving.
    private func install(_ session: OpaquePointer, keptName: String? = nil) {
        SessionLoop.installWakeHandler(configuration.wakeSignal)
        lock.withLock {
            self.session = session
            initialized = false
            loopEnded = false
            stopping = false
            self.keptName = keptName
        }
    }

    /// Serves the installed session; on failure it is the device's no more.
    private func startLoop(_ session: OpaquePointer) throws(BlksnapError) {
        do throws(BlksnapError) {
            try startLoopThread(session)
        } catch {
            lock.withLock { self.session = nil; keptName = nil }
            fuse_session_destroy(session)
            throw error
        }
    }

    private func startLoopThread(_ session: OpaquePointer) throws(BlksnapError) {
        final class Start {
            let device: CUSEDevice
            let session: OpaquePointer
            init(_ device: CUSEDevice, _ session: OpaquePointer) { (self.device, self.session) = (device, session) }
        }
        let start = Unmanaged.passRetained(Start(self, session)).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { raw in
            let start = Unmanaged<Start>.fromOpaque(raw!).takeRetainedValue()
            start.device.runLoop(start.session)
            return nil
        }, start)
        guard rc == 0 else {
            Unmanaged<Start>.fromOpaque(start).release()
            throw BlksnapError(.init(rawValue: rc), "cannot start the CUSE session thread")
        }
        lock.withLock { loopThread = thread }
    }

    private func runLoop(_ session: OpaquePointer) {
        let result = SessionLoop.run(session, maxThreads: configuration.maxThreads,
                                     wakeSignal: configuration.wakeSignal)
        lock.withLock {
            loopResult = result
            loopEnded = true
            changed.broadcast()
        }
        if !lock.withLock({ stopping }) {
            control.engine.logger.error("blksnap-cuse: the session of \(devicePath) ended (\(result))")
        }
    }

    /// CUSE_INIT arrived (the kernel's, or the one made for a kept connection).
    func sessionSaid(major: UInt32, minor: UInt32) {
        lock.withLock { said = CUSEInit(major: major, minor: minor) }
    }

    /// CUSE_INIT answered: the kernel is registering the device.
    func sessionInitialized() {
        lock.withLock {
            initialized = true
            changed.broadcast()
        }
    }

    /// Waits for devtmpfs to create the node, then gives it the module's
    /// mode and owner. False if the session died meanwhile (the kernel
    /// refused the device); a node that never shows up (no devtmpfs) is
    /// only logged: the device itself is registered.
    private func waitForNode(until deadline: UInt64) -> Bool {
        var st = stat()
        while stat(devicePath, &st) != 0 || (st.st_mode & S_IFMT) != S_IFCHR {
            if lock.withLock({ loopEnded }) { return false }
            guard monotonicNanoseconds() < deadline else {
                control.engine.logger.warning("blksnap-cuse: \(devicePath) did not appear; is devtmpfs mounted on /dev?")
                return true
            }
            usleep(10_000)
        }
        if lock.withLock({ loopEnded }) { return false }
        if st.st_mode & 0o7777 != configuration.mode { chmod(devicePath, configuration.mode) }
        if st.st_uid != 0 || st.st_gid != 0 { chown(devicePath, 0, 0) }
        return true
    }
}
