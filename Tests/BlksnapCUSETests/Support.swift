import BlksnapABI
import BlksnapEngine
import BlksnapTestSupport
import Glibc
import Logging
import Testing
@testable import BlksnapCUSE

// A fake caller (its address space), a fake kernel (fs/fuse/ioctl.c's
// retry loop) and an engine, so that the CUSE state machine runs exactly as
// it will under /dev/blksnap, minus libfuse.

// MARK: - C values

/// The bytes of a C value, as a caller's struct sits in its memory.
func cBytes<T>(_ value: T) -> [UInt8] {
    withUnsafeBytes(of: value) { Array($0) }
}

/// A C value read back from caller bytes.
func cValue<T>(_ type: T.Type, _ bytes: [UInt8]) -> T {
    precondition(bytes.count == MemoryLayout<T>.size)
    let scratch = UnsafeMutableRawPointer.allocate(byteCount: bytes.count, alignment: MemoryLayout<T>.alignment)
    defer { scratch.deallocate() }
    bytes.withUnsafeBytes { scratch.copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
    return scratch.load(as: T.self)
}

/// A C pointer field holding a caller address.
func ptr<T>(_ address: UInt64) -> UnsafeMutablePointer<T>? {
    UnsafeMutablePointer(bitPattern: UInt(address))
}

/// An address nothing is mapped at.
let unmapped: UInt64 = 0xdead_0000
/// What FakeMemory.reserve fills a fresh buffer with.
let untouched: UInt8 = 0xEE

// MARK: - the caller

/// A caller's address space: regions of bytes at addresses, some of them
/// read-only. Copies outside a region fail, as copy_from_user would.
final class FakeMemory: @unchecked Sendable {
    private(set) var regions: [UInt64: [UInt8]] = [:]
    private var readOnly: Set<UInt64> = []
    private var next: UInt64 = 0x10_0000

    /// Places bytes at a fresh page-aligned address and returns it.
    func place(_ bytes: [UInt8], readOnly: Bool = false) -> UInt64 {
        let address = next
        regions[address] = bytes
        if readOnly { self.readOnly.insert(address) }
        next += (UInt64(max(bytes.count, 1)) + 8191) & ~4095
        return address
    }

    func place<T>(c value: T, readOnly: Bool = false) -> UInt64 { place(cBytes(value), readOnly: readOnly) }
    func reserve(_ count: Int) -> UInt64 { place([UInt8](repeating: untouched, count: count)) }

    private func locate(_ address: UInt64, _ count: Int) -> (base: UInt64, offset: Int)? {
        let (end, overflow) = address.addingReportingOverflow(UInt64(count))
        guard !overflow else { return nil }
        for (base, bytes) in regions where address >= base && end <= base + UInt64(bytes.count) {
            return (base, Int(address - base))
        }
        return nil
    }

    func read(at address: UInt64, count: Int) -> [UInt8]? {
        guard let (base, offset) = locate(address, count) else { return nil }
        return Array(regions[base]![offset..<(offset + count)])
    }

    func canWrite(at address: UInt64, count: Int) -> Bool {
        guard let (base, _) = locate(address, count) else { return false }
        return !readOnly.contains(base)
    }

    func write(_ bytes: [UInt8], at address: UInt64) -> Bool {
        guard canWrite(at: address, count: bytes.count), let (base, offset) = locate(address, bytes.count) else {
            return false
        }
        regions[base]!.replaceSubrange(offset..<(offset + bytes.count), with: bytes)
        return true
    }

    func bytes(at address: UInt64, count: Int) -> [UInt8] { read(at: address, count: count)! }
    func load<T>(_ type: T.Type, at address: UInt64) -> T { cValue(type, bytes(at: address, count: MemoryLayout<T>.size)) }
    func store<T>(_ value: T, at address: UInt64) { #expect(write(cBytes(value), at: address)) }
}

/// The daemon's direct view of the caller (process_vm_readv and /proc/PID/maps
/// in the real one), counting what goes around the kernel's copies.
final class FakeCaller: CallerAccess {
    let memory: FakeMemory
    /// When set, every check answers "cannot tell", as on EPERM.
    let blind: Bool
    private(set) var directReads = 0
    private(set) var directWrites = 0

    init(_ memory: FakeMemory, blind: Bool = false) {
        self.memory = memory
        self.blind = blind
    }

    func canRead(_ region: CallerRegion) -> Bool { blind || memory.read(at: region.address, count: region.count) != nil }
    func canWrite(_ region: CallerRegion) -> Bool { blind || memory.canWrite(at: region.address, count: region.count) }

    func read(_ region: CallerRegion) -> [UInt8]? {
        directReads += 1
        return memory.read(at: region.address, count: region.count)
    }

    func write(_ bytes: [UInt8], at address: UInt64) -> Bool {
        directWrites += 1
        return memory.write(bytes, at: address)
    }
}

// MARK: - the kernel

/// fuse_do_ioctl for an unrestricted CUSE ioctl: starts with no iovecs,
/// copies the input iovecs from the caller into each new request, refuses
/// more than 256 iovecs or more than the transfer limit each way (ENOMEM),
/// fails the call with EFAULT when a copy fails, and after the final reply
/// copies its data over the output iovecs in order, as far as it goes.
final class FakeKernel {
    let memory: FakeMemory
    let caller: FakeCaller
    let machine: IoctlStateMachine
    let transferLimit: Int
    private(set) var requests: [IoctlRequest] = []
    private(set) var answers: [IoctlAnswer] = []
    /// Runs after each retry answer, before the kernel fetches: a second
    /// thread of the caller, racing with the call.
    var afterRetry: ((Int) -> Void)?

    init(memory: FakeMemory, caller: FakeCaller, machine: IoctlStateMachine) {
        self.memory = memory
        self.caller = caller
        self.machine = machine
        transferLimit = machine.transferLimit
    }

    /// The retry answers of the last ioctl.
    var retries: [(input: [CallerRegion], output: [CallerRegion])] {
        answers.compactMap { if case .retry(let i, let o) = $0 { (i, o) } else { nil } }
    }

    /// ioctl(fd, number, argument): its return value, minus an errno on failure.
    func ioctl(_ number: UInt32, _ argument: UInt64, compat: Bool = false) -> Int32 {
        requests = []
        answers = []
        var input: [CallerRegion] = []
        var output: [CallerRegion] = []
        while true {
            var fetched: [UInt8] = []
            for region in input {
                guard let bytes = memory.read(at: region.address, count: region.count) else { return -EFAULT }
                fetched += bytes
            }
            let request = IoctlRequest(command: number, argument: argument, input: fetched,
                                       outputSize: total(output), compat: compat)
            requests.append(request)
            let answer = machine.handle(request, caller: caller)
            answers.append(answer)
            switch answer {
            case .error(let errno):
                return -errno
            case .retry(let i, let o):
                guard i.count + o.count <= 256, total(i) <= transferLimit, total(o) <= transferLimit else {
                    return -ENOMEM
                }
                guard requests.count < 16 else {
                    Issue.record("the server keeps asking for retries")
                    return -ELOOP
                }
                (input, output) = (i, o)
                afterRetry?(requests.count)
            case .reply(let result, let data):
                guard data.count <= total(output) else { return -EIO }
                var offset = 0
                for region in output where offset < data.count {
                    let n = min(region.count, data.count - offset)
                    guard memory.write(Array(data[offset..<(offset + n)]), at: region.address) else { return -EFAULT }
                    offset += n
                }
                return result
            }
        }
    }

    private func total(_ regions: [CallerRegion]) -> Int { regions.reduce(0) { $0 + $1.count } }
}

// MARK: - the engine

/// How many times the dispatcher ran.
final class Counter: @unchecked Sendable {
    private let lock = Lock()
    private var value = 0
    func bump() { lock.withLock { value += 1 } }
    var count: Int { lock.withLock { value } }
}

/// One process with /dev/blksnap open over CUSE: an engine with routed
/// in-memory devices 7:0 and 7:1 and a storage disk 8:0, the state machine
/// over its dispatcher, a caller address space and the kernel between them.
final class Session {
    static let storageId = DevId(major: 8, minor: 0)
    let engine: Engine
    let host = FakeHost()
    let devices: [RoutedDevice]
    let memory = FakeMemory()
    let caller: FakeCaller
    let kernel: FakeKernel
    let dispatches = Counter()

    var dev0: DevId { devices[0].devId }
    var dev1: DevId { devices[1].devId }

    init(blind: Bool = false, transferLimit: Int = IoctlStateMachine.kernelTransferLimit) {
        host.disks[Session.storageId] = MemoryBlockDevice(size: 4 << 20)
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        var settings = EngineSettings()
        settings.trackingBlockMinimumShift = 12
        settings.chunkMinimumShift = 14
        settings.diffStorageMinimum = 4096
        let engine = Engine(settings: settings, host: host, logger: logger)
        devices = (0..<2).map { try! engine.route(DevId(major: 7, minor: UInt32($0)), backing: MemoryBlockDevice(size: 8 << 20)) }
        self.engine = engine
        let control = Control(engine: engine)
        let counter = dispatches
        let machine = IoctlStateMachine(transferLimit: transferLimit) { command, argument, memory in
            counter.bump()
            return control.dispatch(command: command, argument: argument, memory: memory)
        }
        caller = FakeCaller(memory, blind: blind)
        kernel = FakeKernel(memory: memory, caller: caller, machine: machine)
    }

    func ioctl(_ command: IoctlCommand, _ argument: UInt64) -> Int32 { kernel.ioctl(command.number, argument) }

    /// A snapshot of the devices, made through the engine itself.
    func snapshot(_ devs: [DevId]) -> UUID16 { try! engine.createSnapshot(devs) }

    /// A taken snapshot of one device after a 4 KiB write at its start.
    func takenSnapshot(writingTo device: RoutedDevice) -> UUID16 {
        let id = snapshot([device.devId])
        try! engine.appendStorage(id, device: Session.storageId, ranges: [SectorRange(offset: 0, count: 8192)])
        [UInt8](repeating: 0x5A, count: 4096).withUnsafeBytes { try! device.write($0, at: 0) }
        try! engine.takeSnapshot(id)
        return id
    }
}
