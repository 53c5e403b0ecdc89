import BlksnapEngine
import BlksnapFuseTakeOver
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

/// The CUSE_INIT a new libfuse session on a kept connection is handed
/// (`TakeOverMessages`): the kernel sends CUSE_INIT once per connection,
/// and libfuse answers nothing else before it. The device itself stays as
/// the kernel registered it.
struct CUSEInit: Equatable, Sendable {
    var major: UInt32
    var minor: UInt32

    static let prefix = "blksnap-cuse"

    var name: String { TakeOverMessages.name(prefix: Self.prefix, [major, minor]) }

    init(major: UInt32, minor: UInt32) {
        (self.major, self.minor) = (major, minor)
    }

    init?(name: String) {
        guard let v = TakeOverMessages.values(in: name, prefix: Self.prefix, count: 2), v[0] == 7, v[1] >= 11 else {
            return nil
        }
        self.init(major: v[0], minor: v[1])
    }

    static let opcode: UInt32 = 4096

    /// fuse_in_header (40 bytes) and cuse_init_in (16 bytes).
    var request: [UInt8] {
        TakeOverMessages.initRequest(opcode: Self.opcode, body: [major, minor, 0, UInt32(CUSE_UNRESTRICTED_IOCTL)])
    }

    /// FUSE_NOTIFY_RESEND, written on the connection. Nil when sent; else
    /// the errno (EINVAL from a kernel without it).
    static func resend(on fd: Int32) -> Int32? {
        let message = TakeOverMessages.resendNotification
        let sent = message.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        return sent == message.count ? nil : errno
    }
}
