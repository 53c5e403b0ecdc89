import BlksnapABI
import BlksnapEngine
import FuzzSupport
#if canImport(Glibc)
import Glibc
#endif

// Harness: the ioctl dispatcher (`Control.dispatch`), as both ways in call
// it. An input is a series of calls in the control socket's IOCTL frame
// format: command number, argument, and the caller's memory as regions;
// memory outside them faults or answers seeded random bytes or zeros, as
// the frame's reserved word says. Promises: an unknown number gets ENOTTY
// and nothing else, every failure is an errno of ABI-v1.md, success
// returns 0 (READ_CBT_MAP: the bytes copied, no more than asked), and every
// byte handed back lands where the caller's memory allowed a write.

@_cdecl("fuzz_dispatch_main")
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
    for _ in 0..<64 {
        guard let frame = IoctlFrame.read(&input) else { break }
        let memory = FuzzMemory(frame, created: created)
        let reply = control.dispatch(command: frame.command, argument: frame.argument, memory: memory)
        if frame.command == IoctlCommand.snapshotCreate.number, reply.status == .success(0),
           let id = engine.collectSnapshots().last {
            created.append(id)
        }
        guard let command = IoctlCommand(number: frame.command) else {
            promise(reply.status == .failure(ENOTTY) && reply.writes.isEmpty,
                    "unknown command 0x\(String(frame.command, radix: 16)) answered \(reply)")
            continue
        }
        switch reply.status {
        case .failure(let e):
            promise(abiErrnos.contains(e), "\(command) failed with errno \(e), which ABI-v1.md does not give")
        case .success(let v):
            if command == .trackerReadCbtMap {
                let copied = reply.writes.reduce(0) { $0 + $1.bytes.count }
                promise(v >= 0 && Int(v) == copied, "READ_CBT_MAP returned \(v) but copied \(copied) bytes")
            } else {
                promise(v == 0, "\(command) returned \(v)")
            }
        }
        for write in reply.writes {
            promise(memory.allows(write), "\(command) writes \(write.bytes.count) bytes at 0x\(String(write.address, radix: 16)), where the caller allowed none")
        }
    }
    return 0
}
