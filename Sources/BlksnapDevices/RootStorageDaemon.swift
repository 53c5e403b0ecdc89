import BlksnapABI
import BlksnapEngine
import CBlksnapLinux
import Logging
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// blksnapd as the storage daemon of the root filesystem, started in the
/// initramfs (`--root-storage-daemon`, by the initramfs-tools script) and
/// kept for the machine's whole life, as systemd's convention for root
/// storage daemons asks (systemd.io/ROOT_STORAGE_DAEMONS): its argv[0]
/// starts with '@', so neither the switch to the real root nor the final
/// killing at shutdown touches it, and a signal that would stop it while
/// it serves "/" is refused.
///
/// After the switch to the real root its view of the filesystem is the
/// emptied initramfs: /dev, /proc and /run were moved away. Told to join
/// (SIGHUP, sent by `blksnapd --join-root-daemon`, which the service unit
/// runs), it enters the root of the process that sent the signal, through
/// a /proc descriptor it opened before the switch, and routes the declared
/// devices it could not reach in the initramfs (files on the real root).
/// The service unit's own blksnapd is then not started: there is one
/// blksnapd per machine, and this one owns the control socket, CUSE device
/// and devices, all of which already live in the moved /run and /dev.
public final class RootStorageDaemon {
    let logger: Logger
    /// O_PATH, which Glibc's module map leaves out.
    static let pathOnly: Int32 = 0o10000000
    /// /proc as the initramfs mounted it: the way into the real root.
    private let proc: Int32

    /// The file the daemon writes once it joined, holding the pid that asked.
    public static func joinedFile(_ stateDir: String) -> String { stateDir + "/root-joined" }

    public init(logger: Logger) {
        self.logger = logger
        // The convention: argv[0][0] = '@', the comm name left as it is.
        if let argv0 = CommandLine.unsafeArgv[0], argv0.pointee != 0 { argv0.pointee = 0x40 }
        proc = open("/proc", Self.pathOnly | O_DIRECTORY | O_CLOEXEC)
        if proc < 0 { logger.error("blksnapd: cannot open /proc (\(String(cString: strerror(errno)))); it cannot join the real root later") }
    }

    /// Enters the root directory of `pid` (the real root, after the switch).
    public func join(rootOf pid: pid_t) throws(BlksnapError) {
        guard proc >= 0 else { throw BlksnapError(.noSuchFileOrDirectory, "no /proc descriptor to reach the real root through") }
        let root = openat(proc, "\(pid)/root", Self.pathOnly | O_DIRECTORY | O_CLOEXEC)
        guard root >= 0 else { throw BlksnapError(Errno(rawValue: errno), "cannot open the root of process \(pid)") }
        defer { close(root) }
        guard fchdir(root) == 0, chroot(".") == 0, chdir("/") == 0 else {
            throw BlksnapError(Errno(rawValue: errno), "cannot enter the root of process \(pid)")
        }
    }

    /// What the root daemon does on SIGHUP from `pid`: join its root, route
    /// what is declared there, and say so in the joined file.
    public func joined(by pid: pid_t, dataPlane: DataPlane, configDir: String, stateDir: String) {
        do throws(BlksnapError) {
            try join(rootOf: pid)
            let declared = try DeclaredDevices.load(directory: configDir)
            let states = dataPlane.route(declared: declared)
            let routed = states.filter { $0.state == "routed" }.count
            logger.notice("blksnapd: joined the real root (asked by process \(pid)); \(routed) of \(states.count) declared device(s) routed")
        } catch {
            logger.error("blksnapd: cannot join the real root: \(error.message)")
        }
        // Written either way: the asker must not wait for ever; the log says why.
        let file = Self.joinedFile(stateDir)
        unlink(file)
        _ = try? DurableFile.replace(file, with: Array("\(pid)\n".utf8), mode: 0o644)
    }

    /// Whether a stop signal must be refused: "/" is on a device it serves,
    /// its own or PID 1's (before it joined, its own is the initramfs).
    public func refusesStop(_ dataPlane: DataPlane) -> Bool {
        var st = stat()
        let initRoot = proc >= 0 && fstatat(proc, "1/root/", &st, 0) == 0
            ? DevId(major: blksnap_major(st.st_dev), minor: blksnap_minor(st.st_dev)) : nil
        guard dataPlane.servesRoot(orDevice: initRoot) else { return false }
        logger.warning("blksnapd: the root filesystem is on a device this root storage daemon serves; it keeps serving (it ends with the machine)")
        return true
    }
}

/// `blksnapd --join-root-daemon`, run by the service unit before it starts
/// a blksnapd of its own (ExecCondition=): where a root storage daemon
/// holds the state directory, it is told to join the real root, and the
/// unit is skipped (exit 1) once it has; else the unit goes on (exit 0).
public enum JoinRootDaemon {
    private static func say(_ text: String) {
        let line = Array("blksnapd: \(text)\n".utf8)
        _ = line.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    }

    public static func run(stateDir: String, timeoutSeconds: Int) -> Int32 {
        let lockPath = stateDir + "/blksnapd.lock"
        let fd = open(lockPath, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return 0 }
        defer { close(fd) }
        // A lock nobody holds: no daemon runs; the unit starts one.
        if flock(fd, LOCK_SH | LOCK_NB) == 0 { return 0 }
        var buffer = [UInt8](repeating: 0, count: 32)
        let n = read(fd, &buffer, buffer.count)
        guard n > 0, let pid = pid_t(String(decoding: buffer[..<n], as: UTF8.self).split(separator: "\n").first ?? "") else {
            return 0
        }
        guard let cmdline = try? DurableFile.read("/proc/\(pid)/cmdline", atMost: 1), cmdline.first == 0x40 else {
            // An ordinary blksnapd runs already: the unit's own start says so.
            return 0
        }
        let joined = RootStorageDaemon.joinedFile(stateDir)
        unlink(joined)
        guard kill(pid, SIGHUP) == 0 else {
            say("cannot signal the root storage daemon (pid \(pid)): \(String(cString: strerror(errno)))")
            return 255
        }
        let me = "\(getpid())"
        for _ in 0..<(timeoutSeconds * 10) {
            if let text = try? DurableFile.read(joined, atMost: 32),
               String(decoding: text, as: UTF8.self).split(separator: "\n").first.map(String.init) == me {
                say("the root storage daemon (pid \(pid)) serves this machine and has joined the real root; no second blksnapd is started")
                return 1
            }
            usleep(100_000)
        }
        say("the root storage daemon (pid \(pid)) did not join the real root within \(timeoutSeconds) s")
        return 255
    }
}
