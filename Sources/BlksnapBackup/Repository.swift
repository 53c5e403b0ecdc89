#if canImport(Glibc)
import Glibc
#endif
import SystemPackage

/// A directory of backups: `NNNN/` per backup, holding one qcow2 file per
/// device and `manifest.json`. The manifest is written last (fsync, rename,
/// fsync of the directory), so a directory without one is a backup that
/// failed or never finished: `list` shows it as incomplete, never as good,
/// and the next backup removes it.
public struct Repository: Sendable {
    public let path: String

    public init(path: String, create: Bool = false) throws(BackupError) {
        self.path = path.hasSuffix("/") && path.count > 1 ? String(path.dropLast()) : path
        if create { try FileSystem.makeDirectories(self.path) }
        guard FileSystem.isDirectory(self.path) else {
            throw BackupError(.noSuchFileOrDirectory, "no repository at \(path)")
        }
    }

    public static let manifestName = "manifest.json"

    public func directory(_ number: Int) -> String {
        let digits = String(number)
        return path + "/" + String(repeating: "0", count: max(0, 4 - digits.count)) + digits
    }

    public func file(_ number: Int, _ device: Manifest.Device) -> String { directory(number) + "/" + device.file }

    /// The file name a device's qcow2 gets: its name without /dev/ (or the
    /// last part of a path elsewhere), with slashes as dashes.
    public static func fileName(forDevice name: String) -> String {
        var s = Substring(name)
        // /dev/mapper/vg-root keeps its folder; any other path (a stable
        // link to a device, say) its last part.
        if s.hasPrefix("/dev/") { s = s.dropFirst(5) } else if let slash = s.lastIndex(of: "/") { s = s[s.index(after: slash)...] }
        let cleaned = s.map { c -> Character in c == "/" || c == " " ? "-" : c }
        let base = String(cleaned)
        return (base.isEmpty || base.hasPrefix(".") ? "disk" + base : base) + ".qcow2"
    }

    /// Numbered backup directories, with or without a manifest.
    public func numberedDirectories() -> [Int] {
        FileSystem.list(path).compactMap { name in
            name.count >= 4 && name.allSatisfy(\.isNumber) ? Int(name) : nil
        }.sorted()
    }

    /// Every good backup, oldest first; a manifest that cannot be read
    /// counts as a damaged backup and is reported in `damaged`.
    public func backups() -> (good: [Manifest], incomplete: [Int], damaged: [(Int, String)]) {
        var good: [Manifest] = [], incomplete: [Int] = [], damaged: [(Int, String)] = []
        for n in numberedDirectories() {
            let manifest = directory(n) + "/" + Self.manifestName
            guard FileSystem.exists(manifest) else { incomplete.append(n); continue }
            do {
                let m = try Manifest.decode(try FileSystem.readAll(manifest))
                guard m.number == n else { damaged.append((n, "its manifest says backup \(m.number)")); continue }
                good.append(m)
            } catch {
                damaged.append((n, "\(error)"))
            }
        }
        return (good, incomplete, damaged)
    }

    public func goodBackups() -> [Manifest] { backups().good }

    /// Writes a manifest so it appears whole or not at all.
    public func commit(_ manifest: Manifest) throws(BackupError) {
        let dir = directory(manifest.number)
        let bytes: [UInt8]
        do { bytes = try manifest.encoded() } catch { throw BackupError(.invalidArgument, "cannot encode the manifest: \(error)") }
        try FileSystem.writeAtomically(dir + "/" + Self.manifestName, bytes)
    }

    /// Removes a manifest first (the backup stops being listed), then the
    /// directory.
    public func remove(_ number: Int) throws(BackupError) {
        let dir = directory(number)
        let manifest = dir + "/" + Self.manifestName
        if FileSystem.exists(manifest) {
            guard unlink(manifest) == 0 else { throw BackupError(lastErrno(), "cannot remove \(manifest)") }
            FileSystem.syncDirectory(dir)
        }
        try FileSystem.removeTree(dir)
        FileSystem.syncDirectory(path)
    }
}

/// The few file-system calls the tool needs, on Glibc and swift-system.
public enum FileSystem {
    public static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    public static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }

    public static func isBlockDevice(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFBLK
    }

    public static func makeDirectories(_ path: String, mode: mode_t = 0o700) throws(BackupError) {
        var prefix = path.hasPrefix("/") ? "" : "."
        for part in path.split(separator: "/") {
            prefix += "/" + part
            if mkdir(prefix, mode) != 0 && Glibc.errno != EEXIST {
                throw BackupError(lastErrno(), "cannot create \(prefix)")
            }
        }
        guard isDirectory(path) else { throw BackupError(.notDirectory, "\(path) is not a directory") }
    }

    public static func list(_ path: String) -> [String] {
        guard let dir = opendir(path) else { return [] }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }

    public static func readAll(_ path: String, limit: Int = 16 << 20) throws(BackupError) -> [UInt8] {
        do {
            let fd = try FileDescriptor.open(path, .readOnly, options: .closeOnExec)
            defer { try? fd.close() }
            var out: [UInt8] = []
            var buffer = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = try buffer.withUnsafeMutableBytes { try fd.read(into: $0) }
                if n == 0 { return out }
                out += buffer[0..<n]
                guard out.count <= limit else { throw BackupError(.fileTooLarge, "\(path) is larger than \(limit) bytes") }
            }
        } catch let e as BackupError {
            throw e
        } catch {
            throw BackupError((error as? Errno) ?? .ioError, "cannot read \(path)")
        }
    }

    /// Writes `path.tmp`, fsyncs it, renames it over `path`, fsyncs the
    /// directory: readers see the old file or the new one, never half.
    public static func writeAtomically(_ path: String, _ bytes: [UInt8]) throws(BackupError) {
        let tmp = path + ".tmp"
        do {
            let fd = try FileDescriptor.open(tmp, .writeOnly, options: [.create, .truncate, .closeOnExec],
                                             permissions: [.ownerReadWrite])
            do {
                _ = try fd.closeAfter {
                    _ = try bytes.withUnsafeBytes { try fd.writeAll($0) }
                    guard fsync(fd.rawValue) == 0 else { throw lastErrno() }
                }
            }
        } catch {
            unlink(tmp)
            throw BackupError((error as? Errno) ?? .ioError, "cannot write \(tmp)")
        }
        guard rename(tmp, path) == 0 else {
            let e = lastErrno()
            unlink(tmp)
            throw BackupError(e, "cannot rename \(tmp) to \(path)")
        }
        syncDirectory(parent(of: path))
    }

    public static func parent(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    public static func syncDirectory(_ path: String) {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { return }
        fsync(fd)
        close(fd)
    }

    public static func removeTree(_ path: String) throws(BackupError) {
        guard exists(path) else { return }
        if isDirectory(path) {
            for name in list(path) { try removeTree(path + "/" + name) }
            guard rmdir(path) == 0 else { throw BackupError(lastErrno(), "cannot remove \(path)") }
        } else {
            guard unlink(path) == 0 else { throw BackupError(lastErrno(), "cannot remove \(path)") }
        }
    }

    public static func fileSize(_ path: String) -> UInt64? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return UInt64(st.st_size)
    }
}
