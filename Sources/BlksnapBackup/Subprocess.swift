#if canImport(Glibc)
import Glibc
#endif
import SystemPackage
import CBlksnapBackup

/// Runs the real tools (qemu-img, qemu-nbd, sha256sum, mount, blksnapctl)
/// with posix_spawn: arguments as a list, never through a shell.
public enum Subprocess {
    public struct Result: Sendable {
        public var status: Int32
        public var output: String
        public var errorOutput: String
    }

    /// Runs `argv` to the end, capturing stdout and stderr.
    @discardableResult
    public static func run(_ argv: [String]) throws(BackupError) -> Result {
        var outPipe: [Int32] = [-1, -1], errPipe: [Int32] = [-1, -1]
        guard bkp_pipe_cloexec(&outPipe) == 0 else { throw BackupError(lastErrno(), "pipe") }
        guard bkp_pipe_cloexec(&errPipe) == 0 else {
            close(outPipe[0]); close(outPipe[1])
            throw BackupError(lastErrno(), "pipe")
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
        posix_spawn_file_actions_adddup2(&actions, errPipe[1], 2)
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        let pid: pid_t
        do { pid = try spawn(argv, &actions) } catch {
            for fd in outPipe + errPipe { close(fd) }
            throw error
        }
        close(outPipe[1])
        close(errPipe[1])
        // Both pipes drained together so neither can fill and stall the child.
        var out: [UInt8] = [], err: [UInt8] = []
        var fds = [pollfd(fd: outPipe[0], events: Int16(POLLIN), revents: 0),
                   pollfd(fd: errPipe[0], events: Int16(POLLIN), revents: 0)]
        var open = 2
        var buffer = [UInt8](repeating: 0, count: 65536)
        while open > 0 {
            if poll(&fds, 2, -1) < 0 { if Glibc.errno == EINTR { continue }; break }
            for i in 0..<2 where fds[i].fd >= 0 && fds[i].revents != 0 {
                let n = buffer.withUnsafeMutableBytes { read(fds[i].fd, $0.baseAddress, $0.count) }
                if n > 0 {
                    if i == 0 { out += buffer[0..<n] } else { err += buffer[0..<n] }
                } else if n == 0 || Glibc.errno != EINTR {
                    close(fds[i].fd)
                    fds[i].fd = -1
                    open -= 1
                }
            }
        }
        return Result(status: wait(pid), output: String(decoding: out, as: UTF8.self),
                      errorOutput: String(decoding: err, as: UTF8.self))
    }

    /// Runs `argv` and fails with its stderr when it exits non-zero.
    @discardableResult
    public static func check(_ argv: [String]) throws(BackupError) -> String {
        let r = try run(argv)
        guard r.status == 0 else {
            let why = r.errorOutput.split(separator: "\n").suffix(3).joined(separator: "; ")
            throw BackupError(.ioError, "\(argv.prefix(2).joined(separator: " ")) failed (exit \(r.status)): \(why)")
        }
        return r.output
    }

    static func spawn(_ argv: [String], _ actions: inout posix_spawn_file_actions_t) throws(BackupError) -> pid_t {
        var pid: pid_t = 0
        var cargs = argv.map { strdup($0) } + [nil]
        defer { for p in cargs { free(p) } }
        let rc = posix_spawnp(&pid, argv[0], &actions, nil, &cargs, environ)
        guard rc == 0 else {
            throw BackupError(Errno(rawValue: rc), "cannot run \(argv[0])\(rc == ENOENT ? " (is it installed?)" : "")")
        }
        return pid
    }

    /// The exit status (128 + signal for a killed child).
    public static func wait(_ pid: pid_t) -> Int32 {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            if Glibc.errno != EINTR { return -1 }
        }
        if status & 0x7f == 0 { return (status >> 8) & 0xff }
        return 128 + (status & 0x7f)
    }

    /// sha256 of a file: by openssl where it is installed (libcrypto uses
    /// the CPU's SHA instructions, several times faster than coreutils),
    /// else by sha256sum. Both print the hex digest first.
    public static func sha256(_ path: String) throws(BackupError) -> String {
        let out: String
        let candidates: [String] = ["/usr/bin/openssl", "/bin/openssl", "/usr/local/bin/openssl"]
        if let openssl = candidates.first(where: { (p: String) in access(p, X_OK) == 0 }) {
            out = try check([openssl, "dgst", "-sha256", "-r", path])
        } else {
            out = try check(["sha256sum", "--", path])
        }
        guard let hex = out.split(separator: " ").first, hex.count == 64, hex.allSatisfy(\.isHexDigit) else {
            throw BackupError(.ioError, "no sha256 printed for \(path)")
        }
        return String(hex).lowercased()
    }
}
