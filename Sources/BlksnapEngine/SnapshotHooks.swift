import BlksnapABI

/// Where the images of a taken snapshot become block devices, and how the
/// devices of a snapshot are quiesced before TAKE. The data plane provides
/// the real one (freeze, flush, NBD or FUSE plus loop); the engine's own
/// default numbers images virtually, from minor 0 upwards, as the module
/// numbers its image minors.
public protocol SnapshotHooks: AnyObject, Sendable {
    /// Freeze what sits on the devices and flush what the kernel holds, so
    /// every write acknowledged before TAKE has reached the engine; returns
    /// what thaws them.
    func quiesce(_ devices: [RoutedDevice]) throws(BlksnapError) -> @Sendable () -> Void
    /// Makes an image appear as a block device; returns its number.
    func publish(_ image: SnapImage) throws(BlksnapError) -> DevId
    /// Removes an image's block device (DESTROY).
    func withdraw(_ image: SnapImage)
}

/// Images as numbers only, lowest free minor first, under one major.
public final class VirtualImages: SnapshotHooks, @unchecked Sendable {
    public let major: UInt32
    private let lock = Lock()
    private var used = Set<UInt32>()

    public init(major: UInt32 = 252) { self.major = major }

    public func quiesce(_ devices: [RoutedDevice]) throws(BlksnapError) -> @Sendable () -> Void {
        for d in devices { try d.flush() }
        return {}
    }

    public func publish(_ image: SnapImage) throws(BlksnapError) -> DevId {
        lock.withLock {
            var minor: UInt32 = 0
            while used.contains(minor) { minor += 1 }
            used.insert(minor)
            return DevId(major: major, minor: minor)
        }
    }

    public func withdraw(_ image: SnapImage) {
        _ = lock.withLock { used.remove(image.devId.minor) }
    }
}
