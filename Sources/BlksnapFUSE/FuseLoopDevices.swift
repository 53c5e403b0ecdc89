import BlksnapABI
import BlksnapDevices
import BlksnapEngine
import CFuse3
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// Block devices on kernels without NBD: a file of the device filesystem
/// plus a loop device with direct I/O on it. Routed devices take loop
/// indices from `routedBase` upwards, images the lowest free index, so the
/// first image of a fresh machine is loop0 (/dev/blksnap-image0).
///
/// The FUSE connection is kept outside blksnapd too (`ConnectionStore`),
/// so a blksnapd started after one that was killed takes it over: the
/// same files under the same inode numbers (a file's is its loop index
/// plus 2), and the requests the dead one never answered sent again.
public final class FuseLoopDevices: DeviceMaker, @unchecked Sendable {
    public let filesystem: DeviceFilesystem
    public let routedBase: Int
    public var kind: String { "FUSE+loop" }
    let store: any ConnectionStore
    private let lock = Lock()
    private var files: [Int: String] = [:]
    /// Routed indices whose removal waits for their last user.
    private var unremoved = Set<Int>()
    /// The filesystem is the connection of a blksnapd that died.
    private var adopted = false
    /// Dead devices to unbind once the filesystem serves again.
    private var unbindAfterResume: [Int] = []
    /// The store holds the connection (kept at start, or taken over).
    private var kept = false
    /// Devices left to the next blksnapd at a clean stop.
    private var left = Set<Int>()

    let logger: Logger

    /// `store` defaults to systemd's where the unit has one, else the
    /// keeper, listening beside the mount point (fuse-keeper.sock).
    public init(mountpoint: String, routedBase: Int = 64, logger: Logger, store: (any ConnectionStore)? = nil) {
        filesystem = DeviceFilesystem(mountpoint: mountpoint, logger: logger)
        self.routedBase = routedBase
        self.logger = logger
        let stateDir = mountpoint.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
        self.store = store ?? ConnectionStores.forThisProcess(keeperSocket: stateDir + "/fuse-keeper.sock", logger: logger)
    }

    static func ino(_ index: Int) -> fuse_ino_t { fuse_ino_t(index) + 2 }

    public func start() throws(BlksnapError) {
        if takeOver() { return }
        if filesystem.isStale {
            // A blksnapd killed while serving: its loop devices read a dead
            // FUSE file and fail every request. Unbind them (the kernel does
            // it when their last user closes them) and take the mount away.
            for index in LoopDevice.bound(toFilesUnder: filesystem.mountpoint + "/") {
                LoopDevice.detach(index)
                logger.warning("blksnapd: \(LoopDevice.path(index)) was served by a blksnapd that died; it fails every request and is unbound once nothing holds it")
            }
            filesystem.detachStaleMount()
        }
        try filesystem.start()
        keepConnection()
    }

    /// Gives the store a duplicate of the connection once the kernel's
    /// FUSE_INIT is answered (its name says what the kernel said there).
    private func keepConnection() {
        guard let connection = filesystem.connection(waitingUpTo: 5) else {
            logger.warning("blksnapd: the kernel never sent FUSE_INIT; a crash of blksnapd will fail its devices")
            return
        }
        do throws(BlksnapError) {
            try store.hold(connection.name, fd: connection.fd)
            lock.withLock { kept = true }
            logger.info("blksnapd: \(store.kind) keeps the device filesystem's FUSE connection, so a crash of blksnapd fails no request")
        } catch {
            logger.warning("blksnapd: \(error); a crash of blksnapd will fail its devices")
        }
    }

    /// Takes over the connection a blksnapd that died left in the store;
    /// false when there is none. Where the kernel cannot send requests
    /// again, the connection is let go: closing its last descriptor aborts
    /// it, and every request fails as a dead server's do.
    private func takeOver() -> Bool {
        var took = false
        for kept in store.take(prefix: FuseInit.prefix) {
            guard !took, FuseInit(name: kept.name) != nil, DeviceFilesystem.isAlive(kept.fd) else {
                if FuseInit(name: kept.name) != nil { store.drop(kept.name) }
                close(kept.fd)
                continue
            }
            do throws(BlksnapError) {
                try filesystem.adopt(kept)
                took = true
            } catch {
                logger.warning("blksnapd: \(error); the devices of the blksnapd that died fail their requests")
                store.drop(kept.name)
                close(kept.fd)
            }
        }
        lock.withLock { (adopted, kept) = (took, took) }
        return took
    }

    /// Serves a taken-over connection once its files are back, then
    /// unbinds the devices nobody serves again.
    public func resume() {
        guard lock.withLock({ adopted }) else { return }
        filesystem.serve()
        for index in lock.withLock({ () -> [Int] in defer { unbindAfterResume = [] }; return unbindAfterResume }) {
            LoopDevice.detach(index)
        }
    }

    /// Only where the store keeps the connection and the kernel can send
    /// again what was read and left unanswered (FUSE_NOTIFY_RESEND,
    /// protocol 7.40, Linux 6.9): the next blksnapd takes the connection
    /// over as after a crash.
    public func leave(_ made: MadeDevice) -> Bool {
        guard lock.withLock({ kept }), let name = filesystem.connection?.name,
              let initial = FuseInit(name: name), initial.minor >= 40,
              let file = lock.withLock({ files[made.index] }), filesystem.hold(name: file) else { return false }
        lock.withLock { _ = left.insert(made.index) }
        return true
    }

    public func stop() {
        if !lock.withLock({ left.isEmpty }) {
            // As a crash would: the store keeps the connection, and the
            // mount, the loop devices left and their held requests stay
            // for the blksnapd that takes it over.
            store.close()
            logger.notice("blksnapd: \(store.kind) keeps the device filesystem's FUSE connection for the next blksnapd; the requests of the devices left wait for it with no timeout, as after a crash: start blksnapd again (to fail them instead, end the keeper process, or stop the unit so that systemd closes its store)")
            return
        }
        // The kept duplicate goes first, so that the unmount ends the connection.
        if let name = filesystem.connection?.name { store.drop(name) }
        filesystem.stop()
        store.close()
        rmdir(filesystem.mountpoint)   // made by start; empty once unmounted
    }

    public func reserve(image: Bool) throws(BlksnapError) -> MadeDevice {
        if !image {
            // Indices given back while still open (a mounted device that
            // was detached or died with its server) are free by now.
            lock.withLock { unremoved = unremoved.filter { !LoopDevice.remove($0) } }
        }
        let index = image ? try LoopDevice.lowestFree() : try LoopDevice.addFree(atOrAbove: routedBase)
        let devId = try LoopDevice.ensureNode(index)
        return MadeDevice(name: "loop\(index)", node: LoopDevice.path(index), devId: devId, index: index)
    }

    public func bind(_ made: MadeDevice, to device: any BlockDevice, backend: String) throws(BlksnapError) {
        let name = made.name
        let file = try filesystem.add(name: name, ino: Self.ino(made.index), device: device)
        do throws(BlksnapError) {
            _ = try LoopDevice.attach(made.index, file: file, readOnly: false)
        } catch {
            filesystem.remove(name: name)
            throw error
        }
        lock.withLock { files[made.index] = name }
    }

    public func unbind(_ made: MadeDevice) {
        LoopDevice.detach(made.index)
        if let name = lock.withLock({ files.removeValue(forKey: made.index) }) { filesystem.remove(name: name) }
    }

    /// Routed devices' loop indices were added for them and go away; image
    /// indices are the kernel's free pool and stay.
    public func release(_ made: MadeDevice) {
        if made.index >= routedBase, !LoopDevice.remove(made.index) {
            lock.withLock { _ = unremoved.insert(made.index) }
        }
    }

    // MARK: after a crash

    /// Serves the file the loop device still holds open, under the inode
    /// number it had. A loop device cannot be moved to another file, so
    /// without a taken-over connection (the kernel aborted it) there is
    /// nothing to serve.
    public func reclaim(_ made: MadeDevice, as device: any BlockDevice, backend: String) throws(BlksnapError) {
        guard lock.withLock({ adopted }) else {
            throw BlksnapError(.notSupported, "a FUSE+loop device cannot outlive the blksnapd that served it")
        }
        let path = filesystem.mountpoint + "/" + made.name
        guard readAttribute("/sys/block/loop\(made.index)/loop/backing_file") == path else {
            throw BlksnapError(.noSuchAddressOrDevice, "\(made.node) is no longer bound to \(path)")
        }
        _ = try filesystem.add(name: made.name, ino: Self.ino(made.index), device: device)
        lock.withLock { files[made.index] = made.name }
    }

    /// Unbinds a dead device still bound to a file of ours (after a
    /// taken-over connection serves again: unbinding waits for the
    /// device's requests); routed indices were added for them and go once
    /// free.
    public func abandon(_ made: MadeDevice, backend: String) {
        let backing = readAttribute("/sys/block/loop\(made.index)/loop/backing_file")
        if backing?.hasPrefix(filesystem.mountpoint + "/") == true {
            lock.withLock {
                if adopted { unbindAfterResume.append(made.index) } else { LoopDevice.detach(made.index) }
            }
        }
        release(made)
    }
}
