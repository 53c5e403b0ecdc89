import BlksnapFuseTakeOver

/// The FUSE_INIT a new libfuse session on the device filesystem's kept
/// connection is handed (`TakeOverMessages`), made from what the kernel
/// said the first time.
struct FuseInit: Equatable, Sendable {
    var major: UInt32
    var minor: UInt32
    var maxReadahead: UInt32

    static let prefix = "blksnap-devices"

    var name: String { TakeOverMessages.name(prefix: Self.prefix, [major, minor, maxReadahead]) }

    init(major: UInt32, minor: UInt32, maxReadahead: UInt32) {
        (self.major, self.minor, self.maxReadahead) = (major, minor, maxReadahead)
    }

    init?(name: String) {
        guard let v = TakeOverMessages.values(in: name, prefix: Self.prefix, count: 3), v[0] == 7, v[1] >= 26 else {
            return nil
        }
        self.init(major: v[0], minor: v[1], maxReadahead: v[2])
    }

    static let opcodeInit: UInt32 = 26
    /// FUSE_ASYNC_READ, FUSE_BIG_WRITES, FUSE_ASYNC_DIO, FUSE_PARALLEL_DIROPS,
    /// FUSE_MAX_PAGES (without it libfuse shrinks its buffer below the
    /// 1 MiB writes the kernel was told it may send), FUSE_INIT_EXT.
    static let flags: UInt32 = 1 << 0 | 1 << 5 | 1 << 15 | 1 << 18 | 1 << 22 | 1 << 30

    /// fuse_in_header (40 bytes) and fuse_init_in (64 bytes: then flags2
    /// and 11 unused words).
    var request: [UInt8] {
        TakeOverMessages.initRequest(opcode: Self.opcodeInit,
                                     body: [major, minor, maxReadahead, Self.flags] + [UInt32](repeating: 0, count: 12))
    }

    static var resendNotification: [UInt8] { TakeOverMessages.resendNotification }
}
