/// The two messages blksnapd writes itself on a FUSE connection that a
/// blksnapd before it set up: libfuse has neither.
///
/// A new libfuse session on an existing connection still expects the
/// kernel's FUSE_INIT, which the kernel sends once per connection. So the
/// session is handed a FUSE_INIT made here from what the kernel said the
/// first time (carried in the kept connection's name). It sets up only
/// libfuse's side (protocol version, buffer size); libfuse's reply goes
/// to a request id the kernel never issued, and the kernel refuses it
/// with ENOENT, which libfuse passes over in silence.
struct FuseInit: Equatable, Sendable {
    var major: UInt32
    var minor: UInt32
    var maxReadahead: UInt32

    static let prefix = "blksnap-devices"

    /// A name systemd accepts as FDNAME (no colon, printable, short).
    var name: String { "\(Self.prefix)-\(major)-\(minor)-\(maxReadahead)" }

    init(major: UInt32, minor: UInt32, maxReadahead: UInt32) {
        (self.major, self.minor, self.maxReadahead) = (major, minor, maxReadahead)
    }

    init?(name: String) {
        let parts = name.split(separator: "-")
        guard name.hasPrefix(Self.prefix + "-"), parts.count == 5,
              let major = UInt32(parts[2]), let minor = UInt32(parts[3]), let readahead = UInt32(parts[4]),
              major == 7, minor >= 26 else { return nil }
        self.init(major: major, minor: minor, maxReadahead: readahead)
    }

    static let opcodeInit: UInt32 = 26
    /// Even (not an interrupt), below FUSE_UNIQUE_RESEND (bit 63) and far
    /// above any id the kernel counts up to: it matches no request.
    static let unique: UInt64 = 0x7fff_ffff_ffff_fff0
    /// FUSE_ASYNC_READ, FUSE_BIG_WRITES, FUSE_ASYNC_DIO, FUSE_PARALLEL_DIROPS,
    /// FUSE_MAX_PAGES (without it libfuse shrinks its buffer below the
    /// 1 MiB writes the kernel was told it may send), FUSE_INIT_EXT.
    static let flags: UInt32 = 1 << 0 | 1 << 5 | 1 << 15 | 1 << 18 | 1 << 22 | 1 << 30

    /// fuse_in_header (40 bytes) and fuse_init_in (64 bytes).
    var request: [UInt8] {
        var bytes: [UInt8] = []
        func put32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
        func put64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
        put32(104)
        put32(Self.opcodeInit)
        put64(Self.unique)
        put64(0)                                    // nodeid
        put32(0); put32(0); put32(0)                // uid, gid, pid
        put32(0)                                    // total_extlen, padding
        put32(major); put32(minor); put32(maxReadahead); put32(Self.flags)
        put32(0)                                    // flags2
        for _ in 0..<11 { put32(0) }
        return bytes
    }

    /// FUSE_NOTIFY_RESEND (Linux 6.9): a fuse_out_header with unique 0 and
    /// the notification code 7 as its error. The kernel queues again every
    /// request a server had read and not answered; an older kernel refuses
    /// the unknown code with EINVAL.
    static let resendNotification: [UInt8] = {
        var bytes: [UInt8] = []
        withUnsafeBytes(of: UInt32(16).littleEndian) { bytes += $0 }
        withUnsafeBytes(of: Int32(7).littleEndian) { bytes += $0 }
        withUnsafeBytes(of: UInt64(0).littleEndian) { bytes += $0 }
        return bytes
    }()
}
