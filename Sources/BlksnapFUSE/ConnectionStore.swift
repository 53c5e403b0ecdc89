import BlksnapEngine
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// A FUSE connection (an open /dev/fuse) held by someone other than
/// blksnapd. The kernel aborts a FUSE connection only when the last
/// descriptor of its /dev/fuse closes; while a duplicate lives elsewhere,
/// a blksnapd killed with -9 takes nothing down with it: the mount, the
/// loop devices on its files and the filesystems on those stay, and their
/// requests wait for the next blksnapd.
public struct KeptConnection: Sendable {
    /// Says what it is and how the kernel set it up (`FuseInit.name`).
    public var name: String
    public var fd: Int32
}

/// Where blksnapd keeps its FUSE connections across its own death:
/// systemd's file descriptor store under systemd, else a keeper process.
public protocol ConnectionStore: AnyObject, Sendable {
    /// For logs: "systemd's file descriptor store", "the keeper process".
    var kind: String { get }
    /// Duplicates of what a blksnapd before this one left under names
    /// starting with `prefix` (the device filesystem's, the CUSE device's);
    /// the store keeps its own.
    func take(prefix: String) -> [KeptConnection]
    func hold(_ name: String, fd: Int32) throws(BlksnapError)
    func drop(_ name: String)
    /// A clean stop: nothing kept is wanted any more.
    func close()
}

public enum ConnectionStores {
    /// systemd's store where the service may use one (systemd sets $FDSTORE
    /// to FileDescriptorStoreMax when it is above 0), else our keeper,
    /// listening at `keeperSocket`.
    public static func forThisProcess(keeperSocket: String, logger: Logger) -> any ConnectionStore {
        if let store = SystemdFDStore(logger: logger) { return store }
        return KeeperClient(socketPath: keeperSocket, logger: logger)
    }
}
