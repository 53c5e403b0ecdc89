import BlksnapABI
import BlksnapEngine
import BlksnapTestSupport
import Logging

/// A logger that drops everything: a fuzzer logs millions of refusals.
public let silentLogger: Logger = {
    var logger = Logger(label: "fuzz") { _ in SwiftLogNoOpLogHandler() }
    logger.logLevel = .critical
    return logger
}()

/// Host devices in memory: one unrouted disk usable as difference storage.
public final class FuzzHost: HostDevices, @unchecked Sendable {
    public static let storage = DevId(major: 8, minor: 0)
    let disk: MemoryBlockDevice

    public init(disk: MemoryBlockDevice) { self.disk = disk }
    public func exists(_ devId: DevId) -> Bool { devId == Self.storage }
    public func path(of devId: DevId) -> String? { exists(devId) ? "/dev/fuzz-storage" : nil }
    public func open(_ devId: DevId) throws(BlksnapError) -> any BlockDevice {
        guard devId == Self.storage else { throw BlksnapError(.noSuchAddressOrDevice, "no disk \(devId)") }
        return disk
    }
}

/// The devices the conformance suite attaches on this kind of host
/// (loop64, loop65, loop66), so its recorded frames name routed devices.
public let fuzzRoutedIds: [DevId] = (64...66).map { DevId(major: 7, minor: UInt32($0)) }

/// A fresh engine per input, so every input replays the same way: three
/// routed 1 MiB devices and a 1 MiB host disk, with small blocks and
/// chunks so that a few bytes of input reach copy-on-write.
public func makeFuzzEngine() -> Engine {
    var settings = EngineSettings()
    settings.trackingBlockMinimumShift = 12
    settings.chunkMinimumShift = 14
    settings.diffStorageMinimum = 4096
    for disk in fuzzDisks { try! disk.discard(at: 0, length: fuzzDeviceSize) }
    let engine = Engine(settings: settings, host: FuzzHost(disk: fuzzDisks[3]), logger: silentLogger)
    for (id, disk) in zip(fuzzRoutedIds, fuzzDisks) { _ = try! engine.route(id, backing: disk) }
    return engine
}

/// Three routed, one host disk, one spare. Allocated once and zeroed for each input: fresh memory for every input
/// would make page faults most of a run's time.
nonisolated(unsafe) public let fuzzDisks = (0..<5).map { _ in MemoryBlockDevice(size: fuzzDeviceSize) }

public let fuzzDeviceSize: UInt64 = 256 << 10
