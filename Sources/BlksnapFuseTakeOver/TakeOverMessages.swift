/// The messages blksnapd writes itself on a FUSE or CUSE connection that a
/// blksnapd before it set up (the device filesystem's, /dev/blksnap's):
/// libfuse has neither.
///
/// A new libfuse session on an existing connection still expects the
/// kernel's INIT (FUSE_INIT, CUSE_INIT), which the kernel sends once per
/// connection. So the session is handed one made here from what the
/// kernel said the first time, carried in the kept connection's name. It
/// sets up only libfuse's side (protocol version, buffer size); libfuse's
/// reply goes to a request id the kernel never issued, and the kernel
/// refuses it with ENOENT, which libfuse passes over in silence.
public enum TakeOverMessages {
    /// Even (not an interrupt), below FUSE_UNIQUE_RESEND (bit 63) and far
    /// above any id the kernel counts up to: it matches no request.
    public static let unique: UInt64 = 0x7fff_ffff_ffff_fff0

    /// An INIT as the kernel lays it out: fuse_in_header (40 bytes: the
    /// length, `opcode`, `unique`, no node, no caller) then `body`, the
    /// opcode's own struct (fuse_init_in, cuse_init_in) as 32-bit words.
    public static func initRequest(opcode: UInt32, body: [UInt32]) -> [UInt8] {
        var bytes: [UInt8] = []
        func put32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
        func put64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
        put32(UInt32(40 + 4 * body.count))
        put32(opcode)
        put64(unique)
        put64(0)                                    // nodeid
        put32(0); put32(0); put32(0)                // uid, gid, pid
        put32(0)                                    // total_extlen, padding
        for word in body { put32(word) }
        return bytes
    }

    /// FUSE_NOTIFY_RESEND (Linux 6.9): a fuse_out_header with unique 0 and
    /// the notification code 7 as its error. The kernel queues again every
    /// request a server had read and not answered; an older kernel refuses
    /// the unknown code with EINVAL.
    public static let resendNotification: [UInt8] = {
        var bytes: [UInt8] = []
        withUnsafeBytes(of: UInt32(16).littleEndian) { bytes += $0 }
        withUnsafeBytes(of: Int32(7).littleEndian) { bytes += $0 }
        withUnsafeBytes(of: UInt64(0).littleEndian) { bytes += $0 }
        return bytes
    }()

    /// A kept connection's name: `prefix` and what the kernel said in its
    /// INIT, which systemd accepts as FDNAME (no colon, printable, short).
    public static func name(prefix: String, _ values: [UInt32]) -> String {
        ([prefix] + values.map { String($0) }).joined(separator: "-")
    }

    /// The `count` values of a name `name(prefix:_:)` made; nil for any
    /// other name.
    public static func values(in name: String, prefix: String, count: Int) -> [UInt32]? {
        guard name.hasPrefix(prefix + "-") else { return nil }
        let parts = name.dropFirst(prefix.count + 1).split(separator: "-")
        let values = parts.compactMap { UInt32($0) }
        return parts.count == count && values.count == count ? values : nil
    }
}
