import BlksnapEngine
import CFuse3
#if canImport(Glibc)
import Glibc
#endif

/// The CUSE connection (an open /dev/cuse) of /dev/blksnap kept outside
/// blksnapd, as the device filesystem's FUSE connection is: the kernel
/// removes /dev/blksnap and fails the callers only when the last
/// descriptor of its /dev/cuse closes, so while a duplicate lives
/// elsewhere (blksnapd's keeper, systemd's file descriptor store) a tool
/// that holds /dev/blksnap open across a kill -9 of blksnapd is answered
/// by the next one.
public struct KeptSession: Sendable {
    public var name: String
    public var fd: Int32

    public init(name: String, fd: Int32) {
        (self.name, self.fd) = (name, fd)
    }
}

/// Where the kept duplicate lives: blksnapd hands it the session's
/// descriptor once the kernel registered the device, and takes it back
/// at a clean stop, so that the stop removes /dev/blksnap.
public struct SessionKeeper: Sendable {
    public var kind: String
    public var hold: @Sendable (_ name: String, _ fd: Int32) throws(BlksnapError) -> Void
    public var drop: @Sendable (_ name: String) -> Void

    public init(kind: String, hold: @escaping @Sendable (String, Int32) throws(BlksnapError) -> Void,
                drop: @escaping @Sendable (String) -> Void) {
        (self.kind, self.hold, self.drop) = (kind, hold, drop)
    }
}

/// The CUSE_INIT a new libfuse session on a kept connection is handed:
/// the kernel sends CUSE_INIT once per connection, and libfuse answers
/// nothing else before it. It sets up only libfuse's side (protocol
/// version, buffer size); the device itself stays as the kernel
/// registered it. libfuse's reply goes to a request id the kernel never
/// issued, which the kernel refuses with ENOENT and libfuse passes over
/// in silence.
struct CUSEInit: Equatable, Sendable {
    var major: UInt32
    var minor: UInt32

    static let prefix = "blksnap-cuse"

    /// A name systemd accepts as FDNAME (no colon, printable, short).
    var name: String { "\(Self.prefix)-\(major)-\(minor)" }

    init(major: UInt32, minor: UInt32) {
        (self.major, self.minor) = (major, minor)
    }

    init?(name: String) {
        let parts = name.split(separator: "-")
        guard name.hasPrefix(Self.prefix + "-"), parts.count == 4,
              let major = UInt32(parts[2]), let minor = UInt32(parts[3]), major == 7, minor >= 11 else { return nil }
        self.init(major: major, minor: minor)
    }

    static let opcode: UInt32 = 4096
    /// Even (not an interrupt), below FUSE_UNIQUE_RESEND (bit 63) and far
    /// above any id the kernel counts up to: it matches no request.
    static let unique: UInt64 = 0x7fff_ffff_ffff_fff0

    /// fuse_in_header (40 bytes) and cuse_init_in (16 bytes).
    var request: [UInt8] {
        var bytes: [UInt8] = []
        func put32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
        func put64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
        put32(56)
        put32(Self.opcode)
        put64(Self.unique)
        put64(0)                                    // nodeid
        put32(0); put32(0); put32(0)                // uid, gid, pid
        put32(0)                                    // total_extlen, padding
        put32(major); put32(minor)
        put32(0)                                    // unused
        put32(UInt32(CUSE_UNRESTRICTED_IOCTL))
        return bytes
    }

    /// FUSE_NOTIFY_RESEND (Linux 6.9), written on the connection: the
    /// kernel queues again every request a server had read and not
    /// answered. Nil when sent; else the errno (EINVAL from a kernel
    /// without it).
    static func resend(on fd: Int32) -> Int32? {
        // fuse_out_header: length 16, the notification code 7 as its error, unique 0.
        var header: (UInt32, Int32, UInt64) = (UInt32(16).littleEndian, Int32(7).littleEndian, 0)
        let sent = withUnsafeBytes(of: &header) { write(fd, $0.baseAddress, 16) }
        return sent == 16 ? nil : errno
    }
}
