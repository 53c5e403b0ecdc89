import BlksnapABI
import BlksnapDevices
import BlksnapEngine
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// Block devices on kernels without NBD: a file of the device filesystem
/// plus a loop device with direct I/O on it. Routed devices take loop
/// indices from `routedBase` upwards, images the lowest free index, so the
/// first image of a fresh machine is loop0 (/dev/blksnap-image0).
public final class FuseLoopDevices: DeviceMaker, @unchecked Sendable {
    public let filesystem: DeviceFilesystem
    public let routedBase: Int
    public var kind: String { "FUSE+loop" }
    private let lock = Lock()
    private var files: [Int: String] = [:]
    private var counter = 0
    /// Routed indices whose removal waits for their last user.
    private var unremoved = Set<Int>()

    let logger: Logger

    public init(mountpoint: String, routedBase: Int = 64, logger: Logger) {
        filesystem = DeviceFilesystem(mountpoint: mountpoint, logger: logger)
        self.routedBase = routedBase
        self.logger = logger
    }

    public func start() throws(BlksnapError) {
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
    }
    public func stop() {
        filesystem.stop()
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
        let name = lock.withLock { () -> String in
            counter += 1
            return "\(device is SnapImage ? "image" : "routed")\(counter)"
        }
        let file = try filesystem.add(name: name, device: device)
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

    /// FUSE has no reconnect: the kernel aborts a FUSE connection whose
    /// server dies, and a loop device cannot be moved to another file.
    public func reclaim(_ made: MadeDevice, as device: any BlockDevice, backend: String) throws(BlksnapError) {
        throw BlksnapError(.notSupported, "a FUSE+loop device cannot outlive the blksnapd that served it")
    }

    /// `start` already unbound the dead loop devices; routed indices were
    /// added for them and go once free.
    public func abandon(_ made: MadeDevice, backend: String) {
        release(made)
    }
}
