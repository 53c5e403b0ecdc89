import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Whole-file writes that a crash or power loss cannot tear: the bytes go
/// to `PATH.new`, are fsync'd, renamed over `PATH`, and the directory is
/// fsync'd, so `PATH` holds either the old contents or the new.
public enum DurableFile {
    public static func replace(_ path: String, with bytes: [UInt8], mode: mode_t = 0o600) throws(BlksnapError) {
        let temporary = path + ".new"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode)
        guard fd >= 0 else { throw BlksnapError(Errno(rawValue: errno), "cannot write \(temporary)") }
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + done, $0.count - done) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                let e = errno
                close(fd)
                unlink(temporary)
                throw BlksnapError(Errno(rawValue: e), "cannot write \(temporary)")
            }
            done += n
        }
        guard fsync(fd) == 0 else {
            let e = errno
            close(fd)
            unlink(temporary)
            throw BlksnapError(Errno(rawValue: e), "cannot fsync \(temporary)")
        }
        close(fd)
        guard rename(temporary, path) == 0 else {
            let e = errno
            unlink(temporary)
            throw BlksnapError(Errno(rawValue: e), "cannot replace \(path)")
        }
        syncDirectory(of: path)
    }

    /// Makes a rename or unlink in `path`'s directory durable.
    public static func syncDirectory(of path: String) {
        let dir = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
        let fd = open(dir.isEmpty ? "/" : dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { return }
        fsync(fd)
        close(fd)
    }

    /// Removes `path` durably; a missing file is fine.
    public static func remove(_ path: String) throws(BlksnapError) {
        guard unlink(path) == 0 || errno == ENOENT else { throw BlksnapError(Errno(rawValue: errno), "cannot remove \(path)") }
        syncDirectory(of: path)
    }

    /// At most `limit` bytes of `path` (one more than expected tells a file
    /// that is too long), so a huge or foreign file is never read whole.
    public static func read(_ path: String, atMost limit: Int) throws(BlksnapError) -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw BlksnapError(Errno(rawValue: errno), "cannot open \(path)") }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: limit)
        var done = 0
        while done < limit {
            let n = bytes.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress! + done, limit - done) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw BlksnapError(Errno(rawValue: errno), "cannot read \(path)") }
            if n == 0 { break }
            done += n
        }
        return Array(bytes[0..<done])
    }
}
