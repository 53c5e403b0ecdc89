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

        public init() {}
    }

    public let configuration: Configuration
    let machine: IoctlStateMachine
    private let control: Control

    private let lock = Lock()
    private let changed = Condition()
    private var session: OpaquePointer?
    private var loopThread: pthread_t?
    private var initialized = false
    private var loopEnded = false
    private var loopResult: Int32 = 0
    private var stopping = false

    public init(control: Control, configuration: Configuration = Configuration()) {
        self.control = control
        self.configuration = configuration
        machine = IoctlStateMachine(control: control)
    }

    public var devicePath: String { "/dev/" + configuration.name }

    /// Whether the session is serving requests.
    public var isRunning: Bool { lock.withLock { session != nil && initialized && !loopEnded } }

    /// Registers the device and serves it on libfuse's threads.
    public func start() throws(BlksnapError) {
        try lock.withLock { () throws(BlksnapError) in
            guard session == nil else { throw BlksnapError(.resourceBusy, "\(devicePath) is served already") }
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

        SessionLoop.installWakeHandler(configuration.wakeSignal)
        lock.withLock {
            self.session = session
            initialized = false
            loopEnded = false
            stopping = false
        }
        do {
            try startLoopThread(session)
        } catch {
            fuse_session_destroy(session)
            lock.withLock { self.session = nil }
            throw error
        }

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
        control.engine.logger.info("blksnap-cuse: serving \(devicePath)")
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
