import BlksnapABI
import BlksnapEngine

/// Host block devices for tests: numbers that exist but are not routed, and
/// in-memory disks that difference storage can be opened on by number.
public final class FakeHost: HostDevices, @unchecked Sendable {
    public var unrouted: Set<DevId> = []
    public var disks: [DevId: any BlockDevice] = [:]

    public init() {}

    public func exists(_ devId: DevId) -> Bool { unrouted.contains(devId) || disks[devId] != nil }
    public func path(of devId: DevId) -> String? { exists(devId) ? "/dev/fake\(devId.minor)" : nil }
    public func open(_ devId: DevId) throws(BlksnapError) -> any BlockDevice {
        guard let d = disks[devId] else { throw BlksnapError(.noSuchAddressOrDevice, "no disk \(devId)") }
        return d
    }
}
