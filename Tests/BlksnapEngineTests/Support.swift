import BlksnapABI
import BlksnapEngine
import BlksnapTestSupport
import Logging

/// A caller's address space: regions of bytes at addresses. Reads outside
/// a region fail, as copy_from_user would; `apply` performs the writes a
/// reply asks for, as the frontends do.
final class FakeMemory: CallerMemory {
    private(set) var regions: [UInt64: [UInt8]] = [:]
    private var next: UInt64 = 0x10_0000

    /// Places bytes at a fresh address and returns it.
    func place(_ bytes: [UInt8]) -> UInt64 {
        let address = next
        regions[address] = bytes
        next += UInt64(max(bytes.count, 1) + 4096) & ~4095
        return address
    }

    func place<T: WireStruct>(_ value: T) -> UInt64 { place(value.wire) }
    func place<T: WireStruct>(array: [T]) -> UInt64 { place(array.flatMap(\.wire)) }
    func reserve(_ count: Int) -> UInt64 { place([UInt8](repeating: 0xEE, count: count)) }

    private func locate(_ address: UInt64, _ count: Int) -> (UInt64, Int)? {
        for (base, bytes) in regions where address >= base && address + UInt64(count) <= base + UInt64(bytes.count) {
            return (base, Int(address - base))
        }
        return nil
    }

    func read(at address: UInt64, count: Int) -> [UInt8]? {
        guard let (base, offset) = locate(address, count) else { return nil }
        return Array(regions[base]![offset..<(offset + count)])
    }

    func canWrite(at address: UInt64, count: Int) -> Bool { locate(address, count) != nil }

    func apply(_ reply: ControlReply) {
        for w in reply.writes {
            let (base, offset) = locate(w.address, w.bytes.count)!
            regions[base]!.replaceSubrange(offset..<(offset + w.bytes.count), with: w.bytes)
        }
    }

    func load<T: WireStruct>(_ type: T.Type, at address: UInt64) -> T { T(wire: read(at: address, count: T.size)!) }
    func loadArray<T: WireStruct>(_ type: T.Type, at address: UInt64, count: Int) -> [T] {
        (0..<count).map { T(wire: read(at: address + UInt64($0 * T.size), count: T.size)!) }
    }
}

/// An engine with `count` routed in-memory devices numbered 7:0, 7:1, ...
/// and one storage disk 8:0 that is not routed.
struct Rig {
    let engine: Engine
    let host: FakeHost
    let devices: [RoutedDevice]
    let backings: [MemoryBlockDevice]
    let storageDisk: MemoryBlockDevice
    static let storageId = DevId(major: 8, minor: 0)

    init(devices count: Int = 2, size: UInt64 = 8 << 20, storage: UInt64 = 64 << 20,
         settings: EngineSettings = Rig.smallSettings) {
        host = FakeHost()
        storageDisk = MemoryBlockDevice(size: storage)
        host.disks[Rig.storageId] = storageDisk
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        engine = Engine(settings: settings, host: host, logger: logger)
        var ds: [RoutedDevice] = []
        var bs: [MemoryBlockDevice] = []
        for i in 0..<count {
            let b = MemoryBlockDevice(size: size)
            bs.append(b)
            ds.append(try! engine.route(DevId(major: 7, minor: UInt32(i)), backing: b))
        }
        devices = ds
        backings = bs
    }

    /// Small blocks and chunks so that a few MiB exercise many of them.
    static var smallSettings: EngineSettings {
        var s = EngineSettings()
        s.trackingBlockMinimumShift = 12
        s.chunkMinimumShift = 14
        s.diffStorageMinimum = 4096
        return s
    }
}

extension BlockDevice {
    func readBytes(at offset: UInt64, count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { raw in try read(into: raw, at: offset) }
        return out
    }
    func writeBytes(_ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { raw in try write(raw, at: offset) }
    }
}

#if canImport(Glibc)
import Glibc
#endif
