import BlksnapABI
import BlksnapEngine

/// A kernel block device made for a routed device or an image.
public struct MadeDevice: Sendable, Equatable {
    /// The kernel's name: loop64, nbd15, loop0.
    public var name: String
    public var node: String
    public var devId: DevId
    /// The maker's own handle (a loop or nbd index).
    public var index: Int
    /// The connections the kernel has to blksnapd for it (kernel NBD:
    /// sockets; 1 elsewhere). A restarted blksnapd hands over as many.
    public var connections: Int

    public init(name: String, node: String, devId: DevId, index: Int, connections: Int = 1) {
        (self.name, self.node, self.devId, self.index, self.connections) = (name, node, devId, index, connections)
    }
}

/// How one kind of kernel turns an engine device into a block device:
/// FUSE file plus loop device, or kernel NBD. The maker only makes and
/// unmakes devices; the data plane keeps the books.
///
/// Numbers come first (`reserve`), because a routed device must be routed
/// under its final major:minor before the kernel can send it a write.
/// Routed devices take numbers from high up and images the lowest free
/// one, so the first image of a machine has minor 0 (/dev/blksnap-image0).
public protocol DeviceMaker: AnyObject, Sendable {
    /// For logs and status: "FUSE+loop", "kernel NBD".
    var kind: String { get }
    func start() throws(BlksnapError)
    func stop()
    func reserve(image: Bool) throws(BlksnapError) -> MadeDevice
    /// Makes the reserved device serve `device`; `backend` names what it
    /// serves, where the kernel keeps such a name (nbd's backend).
    func bind(_ made: MadeDevice, to device: any BlockDevice, backend: String) throws(BlksnapError)
    /// Undoes bind; a device still open (mounted) goes when its last user
    /// closes it.
    func unbind(_ made: MadeDevice)
    /// Gives a reserved number back (bind failed or unbind is done).
    func release(_ made: MadeDevice)

    /// Serves `device` again on a device that a blksnapd which died made
    /// (`made` and `backend` from its saved list), so that what is mounted
    /// on it carries on. Throws where this kind of device cannot outlive
    /// its server.
    func reclaim(_ made: MadeDevice, as device: any BlockDevice, backend: String) throws(BlksnapError)
    /// Undoes a device that a blksnapd which died made and nobody serves
    /// again; a device that shows another backend is someone else's and
    /// stays.
    func abandon(_ made: MadeDevice, backend: String)
    /// Called once what a blksnapd that died left is reclaimed or
    /// abandoned: a maker that held requests back serves them now.
    func resume()
    /// How many of a device's connections serve it now, where this kind
    /// has several (kernel NBD); nil where it has no such thing.
    func servingConnections(_ made: MadeDevice) -> Int?
    /// At a clean stop, for a device in use: stops serving it but leaves
    /// it in the kernel for the next blksnapd to reclaim, as a crash
    /// would. Nothing it had read reaches the engine after this returns.
    /// False where this kind of device cannot outlive its server.
    func leave(_ made: MadeDevice) -> Bool
}

extension DeviceMaker {
    public func resume() {}
    public func servingConnections(_ made: MadeDevice) -> Int? { nil }
    public func leave(_ made: MadeDevice) -> Bool { false }
}

