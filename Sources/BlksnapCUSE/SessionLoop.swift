import CFuse3
#if canImport(Glibc)
import Glibc
#endif

/// libfuse's multithreaded session loop, and how to end it.
///
/// Each request runs on a worker thread and libfuse starts another while
/// none is idle, up to `maxThreads`: a WAIT_EVENT sleeping for its timeout
/// holds one worker and never the other callers. The loop's own thread
/// only waits for the workers; after fuse_session_exit, a signal (with a
/// handler that does nothing, and no SA_RESTART) interrupts that wait so
/// the loop notices, cancels the idle workers and joins the busy ones.
enum SessionLoop {
    /// Runs until the session exits; libfuse's result (0, or an errno).
    static func run(_ session: OpaquePointer, maxThreads: UInt32, wakeSignal: Int32) -> Int32 {
        var wake = sigset_t()
        sigemptyset(&wake)
        sigaddset(&wake, wakeSignal)
        pthread_sigmask(SIG_UNBLOCK, &wake, nil)

        // The thread limit exists only in the 3.12 interface, which our
        // FUSE_USE_VERSION (35) does not declare: found at run time.
        if let loop = loop312, let config = fuse_loop_cfg_create() {
            defer { fuse_loop_cfg_destroy(config) }
            fuse_loop_cfg_set_max_threads(config, maxThreads)
            return loop(session, OpaquePointer(config))
        }
        var config = fuse_loop_config(clone_fd: 0, max_idle_threads: 10)
        return fuse_session_loop_mt_32(session, &config)
    }

    /// Makes `signal` interrupt blocking waits without doing anything else.
    static func installWakeHandler(_ signal: Int32) {
        var action = sigaction()
        action.__sigaction_handler.sa_handler = { _ in }
        sigemptyset(&action.sa_mask)
        action.sa_flags = 0
        sigaction(signal, &action, nil)
    }

    private typealias Loop312 = @convention(c) (OpaquePointer?, OpaquePointer?) -> Int32

    private static let loop312: Loop312? = {
        guard let symbol = dlsym(nil, "fuse_session_loop_mt_312") else { return nil }
        return unsafeBitCast(symbol, to: Loop312.self)
    }()
}
