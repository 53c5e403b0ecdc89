import BlksnapABI
import BlksnapEngine
import CBlksnapLinux
import Logging
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Routed devices and snapshot images as kernel block devices, whatever
/// the kernel offers (a `DeviceMaker`): `blksnapctl attach` and `detach`,
/// and the engine's `SnapshotHooks` (quiesce before TAKE, images as
/// devices after it).
public final class DataPlane: SnapshotHooks, @unchecked Sendable {
    public struct Attached: Sendable, Equatable, Codable {
        public var node: String
        public var devId: String
        public var backing: String
        public var sizeBytes: UInt64
    }

    /// A block device this plane made or removed, for whoever also exports
    /// it (blksnapd's NBD server), named as the kernel names it.
    public enum DeviceEvent: Sendable {
        case added(name: String, device: any BlockDevice, devId: DevId, original: DevId?)
        case removed(name: String)
    }

    /// Called after a device appears and before it goes.
    public var onDevice: (@Sendable (DeviceEvent) -> Void)?

    public let maker: any DeviceMaker
    let logger: Logger
    private let lock = Lock()
    private weak var engine: Engine?
    private var routed: [DevId: (made: MadeDevice, backing: String)] = [:]
    private var images: [ObjectIdentifier: (made: MadeDevice, nodes: [String])] = [:]

    public init(maker: any DeviceMaker, logger: Logger) {
        self.maker = maker
        self.logger = logger
    }

    /// Starts the maker; `engine` is the one these hooks serve.
    public func start(engine: Engine) throws(BlksnapError) {
        lock.withLock { self.engine = engine }
        try maker.start()
        logger.info("blksnapd: routed devices and images are \(maker.kind) devices")
    }

    /// Removes every device it made.
    public func stop() {
        let (all, imgs) = lock.withLock { (Array(routed.values), Array(images.values)) }
        for i in imgs { removeImageDevice(i.made, nodes: i.nodes) }
        for r in all {
            if let m = Quiesce.mountpoints(of: r.made.devId).first {
                logger.warning("blksnapd: \(r.made.node) is still mounted on \(m); it fails from now on")
            }
            maker.unbind(r.made)
            maker.release(r.made)
            try? engine?.unroute(r.made.devId)
        }
        maker.stop()
    }

    // MARK: attach and detach

    /// Routes a regular file (created and grown to `size` when asked) or a
    /// block device (opened O_EXCL, so a mounted or held disk is refused).
    public func attach(backingPath: String, size: UInt64? = nil) throws(BlksnapError) -> Attached {
        var st = stat()
        if stat(backingPath, &st) != 0, errno == ENOENT, size != nil {
            // A new image file: created here, grown below.
            let fd = open(backingPath, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0o600)
            if fd >= 0 { close(fd) }
        }
        guard stat(backingPath, &st) == 0 else {
            throw BlksnapError(Errno(rawValue: errno), "cannot attach \(backingPath)")
        }
        let isBlock = st.st_mode & S_IFMT == S_IFBLK
        if !isBlock, let size, UInt64(st.st_size) < size {
            guard truncate(backingPath, off_t(size)) == 0 else {
                throw BlksnapError(Errno(rawValue: errno), "cannot grow \(backingPath) to \(size) bytes")
            }
        }
        let backing: FileBlockDevice
        do throws(BlksnapError) {
            backing = try FileBlockDevice(path: backingPath, exclusive: isBlock)
        } catch where error.errno == .resourceBusy {
            throw BlksnapError(.resourceBusy, "\(backingPath) is mounted or held by another program; unmount it first")
        }
        return try attach(backing: backing, label: backingPath)
    }

    /// Routes an opened store (a file, a block device, an NBD export).
    public func attach(backing: any BlockDevice, label: String) throws(BlksnapError) -> Attached {
        guard let engine = lock.withLock({ engine }) else { throw BlksnapError(.ioError, "the data plane is not started") }
        guard backing.size >= 4096 else { throw BlksnapError(.invalidArgument, "\(label) is too small to be a disk") }
        let made = try maker.reserve(image: false)
        do throws(BlksnapError) {
            let device = try engine.route(made.devId, backing: backing)
            do throws(BlksnapError) {
                try maker.bind(made, to: device)
            } catch {
                try? engine.unroute(made.devId)
                throw error
            }
        } catch {
            maker.release(made)
            throw error
        }
        lock.withLock { routed[made.devId] = (made, label) }
        logger.info("blksnapd: \(made.node) (\(made.devId)) routes \(label)")
        if let device = engine.routedDevice(made.devId) {
            onDevice?(.added(name: made.name, device: device, devId: made.devId, original: nil))
        }
        return Attached(node: made.node, devId: made.devId.description, backing: label, sizeBytes: backing.size)
    }

    /// Undoes attach: refused while the device is in a snapshot or mounted;
    /// flushes so the backing store is consistent.
    public func detach(_ devId: DevId) throws(BlksnapError) {
        guard let engine = lock.withLock({ engine }) else { throw BlksnapError(.ioError, "the data plane is not started") }
        guard let r = lock.withLock({ routed[devId] }) else {
            throw BlksnapError(.noSuchAddressOrDevice, "\(devId) is not a routed device")
        }
        if let m = Quiesce.mountpoints(of: devId).first {
            throw BlksnapError(.resourceBusy, "\(r.made.node) is mounted on \(m); unmount it first")
        }
        let node = open(r.made.node, O_RDONLY | O_CLOEXEC)
        if node >= 0 {
            fsync(node)
            close(node)
        }
        try engine.unroute(devId)   // refuses a device in a snapshot, before anything is undone
        onDevice?(.removed(name: r.made.name))
        maker.unbind(r.made)
        maker.release(r.made)
        lock.withLock { _ = routed.removeValue(forKey: devId) }
        logger.info("blksnapd: \(r.made.node) detached; \(r.backing) is consistent")
    }

    /// Finds a routed device by node path or major:minor text.
    public func resolve(_ text: String) -> DevId? {
        let all = lock.withLock { Array(routed.values) }
        if let r = all.first(where: { $0.made.node == text || $0.made.devId.description == text }) { return r.made.devId }
        var st = stat()
        if stat(text, &st) == 0, st.st_mode & S_IFMT == S_IFBLK {
            return DevId(major: blksnap_major(st.st_rdev), minor: blksnap_minor(st.st_rdev))
        }
        return nil
    }

    // MARK: SnapshotHooks

    public func quiesce(_ devices: [RoutedDevice]) throws(BlksnapError) -> @Sendable () -> Void {
        let nodes = lock.withLock {
            devices.map { d in (devId: d.devId, node: routed[d.devId]?.made.node ?? "") }
        }
        // Freeze's fsync of each node already reaches the engine's flush
        // (loop's flush becomes a FUSE fsync, kernel NBD sends FLUSH).
        return Quiesce.freeze(devices: nodes, logger: logger)
    }

    public func publish(_ image: SnapImage) throws(BlksnapError) -> DevId {
        let made = try maker.reserve(image: true)
        do throws(BlksnapError) {
            try maker.bind(made, to: image)
        } catch {
            maker.release(made)
            throw error
        }
        // What libblksnap opens, and what the upstream shell tests name.
        var nodes: [String] = []
        let imageNode = "/dev/blksnap-image\(made.devId.minor)"
        unlink(imageNode)
        if mknod(imageNode, S_IFBLK | 0o600, blksnap_makedev(made.devId.major, made.devId.minor)) == 0 {
            nodes.append(imageNode)
        }
        mkdir("/dev/block", 0o755)
        let link = "/dev/block/\(made.devId.major):\(made.devId.minor)"
        var st = stat()
        if lstat(link, &st) != 0, symlink("../\(made.name)", link) == 0 { nodes.append(link) }
        lock.withLock { images[ObjectIdentifier(image)] = (made, nodes) }
        onDevice?(.added(name: "blksnap-image\(made.devId.minor)", device: image, devId: made.devId,
                         original: image.originalDevId))
        return made.devId
    }

    public func withdraw(_ image: SnapImage) {
        guard let entry = lock.withLock({ images.removeValue(forKey: ObjectIdentifier(image)) }) else { return }
        onDevice?(.removed(name: "blksnap-image\(entry.made.devId.minor)"))
        removeImageDevice(entry.made, nodes: entry.nodes)
    }

    private func removeImageDevice(_ made: MadeDevice, nodes: [String]) {
        for n in nodes { unlink(n) }
        maker.unbind(made)
        maker.release(made)
    }
}
