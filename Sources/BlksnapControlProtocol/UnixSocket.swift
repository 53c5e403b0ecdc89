import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Why a socket could not be made or reached: the errno, and what was tried.
public struct SocketError: Error, CustomStringConvertible, Sendable, Equatable {
    public var errno: Errno
    public var message: String

    public init(_ errno: Errno, _ message: String) { (self.errno, self.message) = (errno, message) }

    public var description: String { "\(message): \(errno)" }
}

/// The one way blksnap-swift makes and reaches Unix stream sockets (the
/// control socket, the NBD socket), so every one checks the same things:
/// a path that does not fit sockaddr_un is ENAMETOOLONG (never cut short
/// into another path), and every call's result is looked at.
public enum UnixSocket {
    /// The address of `path`, with room for its terminating NUL.
    public static func address(_ path: String) throws(SocketError) -> sockaddr_un {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard !bytes.isEmpty else { throw SocketError(.invalidArgument, "an empty socket path") }
        guard bytes.count < capacity, !bytes.contains(0) else {
            throw SocketError(.fileNameTooLong, "socket path \(path) is longer than \(capacity - 1) bytes")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return address
    }

    /// A listening socket at `path`, mode 0600 (root only), or 0660 and
    /// owned by `group`. A stale socket left at the path (by a daemon that
    /// died; the caller's lock says none is alive) is replaced; any other
    /// file there is EEXIST.
    public static func listen(path: String, group: gid_t? = nil, backlog: Int32 = SOMAXCONN) throws(SocketError) -> Int32 {
        var address = try address(path)
        var st = stat()
        if lstat(path, &st) == 0 {
            guard (st.st_mode & S_IFMT) == S_IFSOCK else { throw SocketError(.fileExists, "\(path) exists and is not a socket") }
            guard unlink(path) == 0 else { throw SocketError(Errno(rawValue: errno), "cannot remove the stale socket \(path)") }
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SocketError(Errno(rawValue: errno), "cannot make a socket for \(path)") }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0 else {
            let e = Errno(rawValue: errno)
            close(fd)
            throw SocketError(e, "cannot bind \(path)")
        }
        // Nobody can connect before listen(), so setting the mode after
        // bind made the file under the umask leaves no window.
        let restricted = group.map { chown(path, 0, $0) == 0 && chmod(path, 0o660) == 0 } ?? (chmod(path, 0o600) == 0)
        guard restricted else {
            let e = Errno(rawValue: errno)
            close(fd)
            unlink(path)
            throw SocketError(e, "cannot restrict \(path) to \(group.map { "root and group \($0)" } ?? "root")")
        }
        guard Glibc.listen(fd, backlog) == 0 else {
            let e = Errno(rawValue: errno)
            close(fd)
            unlink(path)
            throw SocketError(e, "cannot listen on \(path)")
        }
        return fd
    }

    /// A connected socket to the listener at `path`.
    public static func connect(path: String) throws(SocketError) -> Int32 {
        var address = try address(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SocketError(Errno(rawValue: errno), "cannot make a socket for \(path)") }
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else {
            let e = Errno(rawValue: errno)
            close(fd)
            throw SocketError(e, "cannot connect to \(path)")
        }
        return fd
    }
}
