import BlksnapDevices
import CBlksnapLinux
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// What `KernelNbdDevices` asks of the kernel's nbd driver: the netlink
/// commands and what sysfs shows of a device. `NetlinkNbdDriver` is the
/// kernel's; tests give a fake that records the sockets it is handed.
public protocol NbdDriver: Sendable {
    /// NBD_CMD_CONNECT with `sockets`, one connection each.
    func connect(index: Int, sockets: [Int32], size: UInt64, serverFlags: UInt64,
                 requestTimeout: UInt64, deadTimeout: UInt64, backend: String) throws(Errno)
    /// NBD_CMD_RECONFIGURE: each socket replaces one dead connection.
    func reconfigure(index: Int, sockets: [Int32], deadTimeout: UInt64, backend: String) throws(Errno)
    func disconnect(index: Int) throws(Errno)
    /// Whether the device has a server, live or dead.
    func isConfigured(_ index: Int) -> Bool
    /// The backend identifier the kernel shows for a configured device.
    func backend(of index: Int) -> String?
}

/// The kernel nbd driver over generic netlink (nbd_netlink.c), and sysfs.
public struct NetlinkNbdDriver: NbdDriver {
    /// The most connections one device is given (the netlink message holds them).
    public static let maxSockets = Int(BLKSNAP_NBD_MAX_SOCKETS)

    public init() {}

    private static func check(_ r: Int32) throws(Errno) {
        if r != 0 { throw Errno(rawValue: -r) }
    }

    public func connect(index: Int, sockets: [Int32], size: UInt64, serverFlags: UInt64,
                        requestTimeout: UInt64, deadTimeout: UInt64, backend: String) throws(Errno) {
        try Self.check(sockets.withUnsafeBufferPointer {
            blksnap_nbd_connect(UInt32(index), $0.baseAddress, UInt32($0.count), size, 512, serverFlags,
                                requestTimeout, deadTimeout, backend)
        })
    }

    public func reconfigure(index: Int, sockets: [Int32], deadTimeout: UInt64, backend: String) throws(Errno) {
        try Self.check(sockets.withUnsafeBufferPointer {
            blksnap_nbd_reconfigure(UInt32(index), $0.baseAddress, UInt32($0.count), deadTimeout, backend)
        })
    }

    public func disconnect(index: Int) throws(Errno) {
        try Self.check(blksnap_nbd_disconnect(UInt32(index)))
    }

    public func isConfigured(_ index: Int) -> Bool {
        access("/sys/block/nbd\(index)/pid", F_OK) == 0
    }

    public func backend(of index: Int) -> String? { readAttribute("/sys/block/nbd\(index)/backend") }
}
