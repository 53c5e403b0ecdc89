#if canImport(Glibc)
import Glibc
#endif

/// Where blksnap-swift's other pieces are, relative to the running binary:
/// the same layout holds in the build tree (.build/release), in an
/// installed prefix (bin, sbin, lib/blksnap) and under a DESTDIR, so nothing
/// depends on a fixed /usr/local.
public enum Companion {
    /// The folder of the running executable, links resolved.
    public static var executableDirectory: String {
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        guard n > 0 else { return "." }
        let exe = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return directory(of: exe)
    }

    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    /// The candidates for the preload library, in order: beside the binary,
    /// the build tree's preload folder (one or two levels up, since
    /// .build/release links to .build/<triple>/release), an installed
    /// prefix's lib/blksnap, then /usr/local and /usr.
    public static func preloadCandidates(from dir: String) -> [String] {
        let name = "libblksnap-preload.so"
        return [dir + "/" + name, dir + "/../preload/" + name, dir + "/../../preload/" + name,
                dir + "/../lib/blksnap/" + name, "/usr/local/lib/blksnap/" + name, "/usr/lib/blksnap/" + name]
    }

    /// How to write `tool` in advice to a person: its bare name when `PATH`
    /// finds that very file, else its full path beside this binary (or in
    /// the prefix's bin), else the bare name.
    public static func command(_ tool: String, from dir: String = executableDirectory,
                               path: String? = getenv("PATH").map { String(cString: $0) }) -> String {
        let places: [String] = [dir + "/" + tool, directory(of: dir) + "/bin/" + tool]
        let here = places.first { access($0, X_OK) == 0 }
        guard let here else { return tool }
        let onPath = (path ?? "").split(separator: ":").map { String($0) + "/" + tool }.first { (p: String) in access(p, X_OK) == 0 }
        if let onPath, sameFile(onPath, here) { return tool }
        return canonical(here)
    }

    static func sameFile(_ a: String, _ b: String) -> Bool {
        var sa = stat(), sb = stat()
        return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino
    }

    static func canonical(_ path: String) -> String {
        guard let resolved = realpath(path, nil) else { return path }
        defer { free(resolved) }
        return String(cString: resolved)
    }
}
