import BlksnapABI
import BlksnapEngine
import CBlksnapLinux
import Logging
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Routed devices and snapshot images as block devices on kernels without
/// NBD: a file of the device filesystem plus a loop device each.
///
/// Routed devices take loop indices from `routedBase` upwards; images take
/// the lowest free index, so the first image of a fresh machine is loop0,
/// whose minor gives `/dev/blksnap-image0` as the upstream tests expect.
public final class FuseLoopDataPlane: SnapshotHooks, @unchecked Sendable {
    public struct Attached: Sendable, Equatable, Codable {
        public var node: String
        public var devId: String
        public var backing: String
        public var sizeBytes: UInt64
    }

    private struct Routed {
        let index: Int
        let name: String
        let devId: DevId
        let backing: String
    }

    /// A block device this plane made or removed, for whoever also exports
    /// it (blksnapd's NBD server). Names are the kernel's: loop64,
    /// blksnap-image0.
    public enum DeviceEvent: Sendable {
        case added(name: String, device: any BlockDevice, devId: DevId, original: DevId?)
        case removed(name: String)
    }

    /// Called after a device appears and before it goes.
    public var onDevice: (@Sendable (DeviceEvent) -> Void)?

    public let filesystem: DeviceFilesystem
    public let routedBase: Int
    let logger: Logger
    private let lock = Lock()
    private weak var engine: Engine?
    private var routed: [DevId: Routed] = [:]
    private var images: [ObjectIdentifier: (index: Int, name: String, nodes: [String])] = [:]
    private var counter = 0

    public init(mountpoint: String, routedBase: Int = 64, logger: Logger) {
        self.filesystem = DeviceFilesystem(mountpoint: mountpoint, logger: logger)
        self.routedBase = routedBase
        self.logger = logger
    }

    /// Mounts the device filesystem; `engine` is the one these hooks serve.
    public func start(engine: Engine) throws(BlksnapError) {
        lock.withLock { self.engine = engine }
        try filesystem.start()
    }

    /// Detaches every device it made and unmounts.
    public func stop() {
        let (all, imgs) = lock.withLock { (Array(routed.values), Array(images.values)) }
        for i in imgs { teardownImage(i.index, nodes: i.nodes) }
        for r in all {
            LoopDevice.detach(r.index)
            LoopDevice.remove(r.index)
            try? engine?.unroute(r.devId)
        }
        filesystem.stop()
    }

    private func nextName(_ prefix: String) -> String {
        lock.withLock {
            counter += 1
            return "\(prefix)\(counter)"
        }
    }

    // MARK: attach and detach

    /// Routes `backing` (a regular file or a block device, opened O_EXCL so
    /// a mounted or held disk is refused) and returns its new block device.
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

    /// Routes an opened store (a file, a block device, an NBD export) and
    /// returns its new block device.
    public func attach(backing: any BlockDevice, label: String) throws(BlksnapError) -> Attached {
        guard let engine = lock.withLock({ engine }) else { throw BlksnapError(.ioError, "the data plane is not started") }
        guard backing.size >= 4096 else { throw BlksnapError(.invalidArgument, "\(label) is too small to be a disk") }
        let name = nextName("routed")
        let index = try LoopDevice.addFree(atOrAbove: routedBase)
        let devId: DevId
        do throws(BlksnapError) {
            devId = try LoopDevice.ensureNode(index)
            let device = try engine.route(devId, backing: backing)
            let file = try filesystem.add(name: name, device: device)
            do throws(BlksnapError) {
                _ = try LoopDevice.attach(index, file: file, readOnly: false)
            } catch {
                filesystem.remove(name: name)
                try? engine.unroute(devId)
                throw error
            }
        } catch {
            LoopDevice.remove(index)
            throw error
        }
        lock.withLock { routed[devId] = Routed(index: index, name: name, devId: devId, backing: label) }
        logger.info("blksnapd: \(LoopDevice.path(index)) (\(devId)) routes \(label)")
        if let device = engine.routedDevice(devId) {
            onDevice?(.added(name: "loop\(index)", device: device, devId: devId, original: nil))
        }
        return Attached(node: LoopDevice.path(index), devId: devId.description, backing: label, sizeBytes: backing.size)
    }

    /// Undoes attach: refused while the device is in a snapshot or mounted;
    /// flushes so the backing store is consistent.
    public func detach(_ devId: DevId) throws(BlksnapError) {
        guard let engine = lock.withLock({ engine }) else { throw BlksnapError(.ioError, "the data plane is not started") }
        guard let r = lock.withLock({ routed[devId] }) else {
            throw BlksnapError(.noSuchAddressOrDevice, "\(devId) is not a routed device")
        }
        if let m = Quiesce.mountpoints(of: devId).first {
            throw BlksnapError(.resourceBusy, "\(LoopDevice.path(r.index)) is mounted on \(m); unmount it first")
        }
        let node = open(LoopDevice.path(r.index), O_RDONLY | O_CLOEXEC)
        if node >= 0 {
            fsync(node)
            close(node)
        }
        try engine.unroute(devId)   // refuses a device in a snapshot, before anything is undone
        onDevice?(.removed(name: "loop\(r.index)"))
        LoopDevice.detach(r.index)
        filesystem.remove(name: r.name)
        LoopDevice.remove(r.index)
        lock.withLock { _ = routed.removeValue(forKey: devId) }
        logger.info("blksnapd: \(LoopDevice.path(r.index)) detached; \(r.backing) is consistent")
    }

    /// Finds a routed device by node path or major:minor text.
    public func resolve(_ text: String) -> DevId? {
        let all = lock.withLock { Array(routed.values) }
        if let r = all.first(where: { LoopDevice.path($0.index) == text || $0.devId.description == text }) { return r.devId }
        var st = stat()
        if stat(text, &st) == 0, st.st_mode & S_IFMT == S_IFBLK {
            return DevId(major: blksnap_major(st.st_rdev), minor: blksnap_minor(st.st_rdev))
        }
        return nil
    }

    public var attached: [Attached] {
        lock.withLock {
            routed.values.sorted { $0.devId < $1.devId }.map {
                Attached(node: LoopDevice.path($0.index), devId: $0.devId.description, backing: $0.backing, sizeBytes: 0)
            }
        }
    }

    // MARK: SnapshotHooks

    public func quiesce(_ devices: [RoutedDevice]) throws(BlksnapError) -> @Sendable () -> Void {
        let nodes = lock.withLock {
            devices.map { d in (devId: d.devId, node: routed[d.devId].map { LoopDevice.path($0.index) } ?? "") }
        }
        let thaw = Quiesce.freeze(devices: nodes, logger: logger)
        for d in devices { try d.flush() }
        return thaw
    }

    public func publish(_ image: SnapImage) throws(BlksnapError) -> DevId {
        let name = nextName("image")
        let file = try filesystem.add(name: name, device: image)
        let index: Int
        let devId: DevId
        do throws(BlksnapError) {
            index = try LoopDevice.lowestFree()
            devId = try LoopDevice.attach(index, file: file, readOnly: false)
        } catch {
            filesystem.remove(name: name)
            throw error
        }
        // What libblksnap opens, and what the upstream shell tests name.
        var nodes: [String] = []
        let imageNode = "/dev/blksnap-image\(devId.minor)"
        unlink(imageNode)
        if mknod(imageNode, S_IFBLK | 0o600, blksnap_makedev(devId.major, devId.minor)) == 0 { nodes.append(imageNode) }
        mkdir("/dev/block", 0o755)
        let link = "/dev/block/\(devId.major):\(devId.minor)"
        var st = stat()
        if lstat(link, &st) != 0, symlink("../loop\(index)", link) == 0 { nodes.append(link) }
        lock.withLock { images[ObjectIdentifier(image)] = (index, name, nodes) }
        onDevice?(.added(name: "blksnap-image\(devId.minor)", device: image, devId: devId, original: image.originalDevId))
        return devId
    }

    public func withdraw(_ image: SnapImage) {
        guard let entry = lock.withLock({ images.removeValue(forKey: ObjectIdentifier(image)) }) else { return }
        onDevice?(.removed(name: "blksnap-image\(image.devId.minor)"))
        teardownImage(entry.index, nodes: entry.nodes)
        filesystem.remove(name: entry.name)
    }

    private func teardownImage(_ index: Int, nodes: [String]) {
        for n in nodes { unlink(n) }
        LoopDevice.detach(index)
    }
}
