import CBlksnapLinux
#if canImport(Glibc)
import Glibc
#endif

/// Who is at the other end of a connected Unix socket (SO_PEERCRED), and
/// whether blksnapd's sockets let them in.
///
/// The sockets' file modes already keep others out; the check is the
/// second wall, for a socket whose mode or directory was loosened by hand:
/// the control socket then still answers EACCES, and the NBD socket hangs
/// up before the handshake, so no export is ever read by someone the
/// policy does not name.
public struct PeerCredentials: Sendable, Equatable, CustomStringConvertible {
    public var pid: pid_t
    public var uid: uid_t
    public var gid: gid_t

    public init(pid: pid_t, uid: uid_t, gid: gid_t) {
        (self.pid, self.uid, self.gid) = (pid, uid, gid)
    }

    /// The peer of `fd`, or nil when the kernel cannot say (not a Unix
    /// socket): callers refuse such a peer.
    public static func of(_ fd: Int32) -> PeerCredentials? {
        var pid: pid_t = 0, uid: uid_t = .max, gid: gid_t = .max
        guard blksnap_peer_credentials(fd, &pid, &uid, &gid) == 0 else { return nil }
        return PeerCredentials(pid: pid, uid: uid, gid: gid)
    }

    public var description: String { "pid \(pid) uid \(uid) gid \(gid)" }
}

/// Root, plus an optional group (blksnapd `--nbd-group`) whose members,
/// by primary or supplementary group, may also connect.
public struct PeerPolicy: Sendable {
    public var group: gid_t?

    public static let rootOnly = PeerPolicy(group: nil)

    public init(group: gid_t?) { self.group = group }

    /// Whether the peer of `fd` may use the socket.
    public func allows(_ fd: Int32, _ peer: PeerCredentials?) -> Bool {
        guard let peer else { return false }
        if peer.uid == 0 { return true }
        guard let group else { return false }
        return peer.gid == group || blksnap_peer_in_group(fd, group) == 1
    }

    public var description: String {
        group.map { "root and group \($0)" } ?? "root only"
    }
}
