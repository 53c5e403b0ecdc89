import BlksnapABI
import BlksnapEngine
import BlksnapTestSupport
import FuzzSupport
@testable import BlksnapCUSE
#if canImport(Glibc)
import Glibc
#endif

// Harness: the CUSE ioctl state machine (`IoctlStateMachine.handle`), with
// a fake kernel between it and a fake caller. An input is a series of
// calls in the IOCTL frame format: the regions are the caller's mapped
// memory (OUT: writable too), and the frame's reserved word scripts the
// kernel and the caller: 3 bits per round (0 and 7 honest, 1 a truncated
// fetch, 2 an oversized one, 3 another thread of the caller changes the
// struct first, 4 a wrong output size, 5 no input, 6 random bytes), bit 29
// a 32-bit caller, bit 30 a 4 KiB transfer limit, bit 31 a caller whose
// memory cannot be inspected. Promises: a retry never names memory the
// caller is known not to have, stays within the kernel's limits and
// fetches every output region as input; a reply never carries more than
// the output size; the dispatcher runs at most once per request, and with
// an honest kernel exactly once in at most three requests; errors are
// positive errnos; a 32-bit caller or an unknown number gets ENOTTY.

/// The caller's address space: the frame's regions, bytes and all.
final class Caller: CallerAccess {
    var frame: IoctlFrame
    let blind: Bool
    var created: [UUID16] = []
    private(set) var allowedWrites: [CallerRegion] = []

    init(_ frame: IoctlFrame, blind: Bool) {
        self.frame = frame
        self.blind = blind
    }

    private func index(_ region: CallerRegion) -> Int? {
        frame.regions.firstIndex { $0.flow != 0 && $0.contains(region.address, region.count) }
    }

    /// What the memory holds (OUT-only regions hold zeros until written).
    func fetch(_ region: CallerRegion) -> [UInt8]? {
        guard let i = index(region) else { return nil }
        let r = frame.regions[i]
        let start = Int(region.address - r.address)
        let bytes = r.carries ? Array(r.bytes[start..<(start + region.count)]) : [UInt8](repeating: 0, count: region.count)
        return region.address == frame.argument
            ? SnapshotPlaceholder.resolve(bytes, command: frame.command, created: created) : bytes
    }

    func canRead(_ region: CallerRegion) -> Bool { blind || index(region) != nil }

    func canWrite(_ region: CallerRegion) -> Bool {
        let ok = index(region).map { frame.regions[$0].takesBack } ?? false
        if ok { allowedWrites.append(region) }
        return blind || ok
    }

    func read(_ region: CallerRegion) -> [UInt8]? { fetch(region) }

    func write(_ bytes: [UInt8], at address: UInt64) -> Bool {
        let region = CallerRegion(address: address, count: bytes.count)
        guard let i = index(region), frame.regions[i].takesBack else { return false }
        promise(blind || allowedWrites.contains { $0.contains(region) },
                "a direct write at \(region) that canWrite never allowed")
        return true
    }

    /// Another thread of the caller changes a byte of the struct.
    func race(_ generator: inout SplitMix64) {
        for i in frame.regions.indices where frame.regions[i].carries && !frame.regions[i].bytes.isEmpty {
            let at = Int(generator.next() % UInt64(frame.regions[i].bytes.count))
            frame.regions[i].bytes[at] ^= UInt8(truncatingIfNeeded: generator.next() | 1)
        }
        frame.defuse()
    }
}

nonisolated(unsafe) var dispatches = 0

@_cdecl("fuzz_cuse_main")
public func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    runFuzzer(argc, argv) { fuzzOneInput($0, $1) }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    var input = FuzzInput(data, size)
    let engine = makeFuzzEngine()
    defer { engine.destroyAll() }
    let control = Control(engine: engine)
    var created: [UUID16] = []
    for _ in 0..<32 {
        guard var frame = IoctlFrame.read(&input) else { break }
        frame.defuse()
        let script = frame.reserved
        let limit = script & 1 << 30 != 0 ? 4096 : IoctlStateMachine.kernelTransferLimit
        let machine = IoctlStateMachine(transferLimit: limit) { command, argument, memory in
            dispatches += 1
            return control.dispatch(command: command, argument: argument, memory: memory)
        }
        let caller = Caller(frame, blind: script & 1 << 31 != 0)
        caller.created = created
        let honest = (0..<8).allSatisfy { [0, 7].contains((script >> (3 * $0)) & 7) }
        let result = ioctl(machine, caller, script: script, compat: script & 1 << 29 != 0, honest: honest)
        if frame.command == IoctlCommand.snapshotCreate.number, result == 0, let id = engine.collectSnapshots().last,
           !created.contains(id) {
            created.append(id)
        }
    }
    return 0
}

/// The kernel's side of one ioctl (fs/fuse/ioctl.c): fetch what the last
/// retry named, ask again, copy the final data out. Returns what ioctl(2)
/// would, or nil when the script gave up.
func ioctl(_ machine: IoctlStateMachine, _ caller: Caller, script: UInt32, compat: Bool, honest: Bool) -> Int32? {
    let command = caller.frame.command, argument = caller.frame.argument
    var generator = SplitMix64(seed: UInt64(script) << 32 ^ argument)
    var input: [CallerRegion] = [], output: [CallerRegion] = []
    let before = dispatches
    for round in 0..<8 {
        let behaviour = (script >> (3 * UInt32(round))) & 7
        if behaviour == 3 { caller.race(&generator) }
        var fetched: [UInt8] = []
        for region in input {
            guard let bytes = caller.fetch(region) else {
                promise(caller.blind, "the retry named \(region), which the caller does not have")
                return -EFAULT
            }
            fetched += bytes
        }
        var outputSize = output.reduce(0) { $0 + $1.count }
        switch behaviour {
        case 1: fetched.removeLast(Int(generator.next() % UInt64(fetched.count + 1)))
        case 2: fetched += generator.bytes(Int(generator.next() % 64) + 1)
        case 4: outputSize = Int(generator.next() % UInt64(2 * outputSize + 64))
        case 5: fetched = []
        case 6: fetched = generator.bytes(fetched.count)
        default: break
        }
        let ran = dispatches
        let answer = machine.handle(IoctlRequest(command: command, argument: argument, input: fetched,
                                                 outputSize: outputSize, compat: compat), caller: caller)
        promise(dispatches - ran <= 1, "the dispatcher ran \(dispatches - ran) times for one request")
        if compat || IoctlCommand(number: command) == nil {
            promise(answer == .error(ENOTTY), "a 32-bit caller or an unknown number got \(answer)")
        }
        switch answer {
        case .error(let e):
            promise(e > 0, "error \(e) is not an errno")
            return -e
        case .reply(let result, let data):
            promise(data.count <= outputSize, "\(data.count) bytes of reply data for \(outputSize) bytes of output")
            if honest { promise(dispatches - before == 1 && round <= 2, "an honest ioctl took \(round + 1) requests and \(dispatches - before) dispatches") }
            return result
        case .retry(let i, let o):
            let inBytes = i.reduce(0) { $0 + $1.count }, outBytes = o.reduce(0) { $0 + $1.count }
            promise(i.count + o.count <= 256 && inBytes <= machine.transferLimit && outBytes <= machine.transferLimit,
                    "a retry of \(i.count)+\(o.count) iovecs, \(inBytes) bytes in, \(outBytes) out")
            promise(o.allSatisfy { out in i.contains { $0.contains(out) } }, "an output region not fetched as input")
            (input, output) = (i, o)
        }
    }
    promise(!honest, "an honest ioctl still retries after 8 requests")
    return nil
}
