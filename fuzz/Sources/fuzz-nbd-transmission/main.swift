import BlksnapEngine
import FuzzSupport
#if canImport(Glibc)
import Glibc
#endif
@testable import BlksnapNBD

// Harness: the NBD transmission phase (`Connection.run` after a
// negotiation, as the kernel's nbd driver starts it). The first byte
// chooses what was negotiated: bit 0 structured replies, bit 1 the
// base:allocation context, bit 2 blksnap:changed-since:(bits 4-5), bit 3
// the read-only snapshot image instead of the routed device (bit 6: a
// plain disk), bit 7 two workers; the rest is the client's requests, whose
// handles the harness numbers so replies can be matched. Promises: each
// whole request before NBD_CMD_DISC or a bad magic gets exactly one final
// reply with its handle (a READ's data of its length at its offset, a
// BLOCK_STATUS one chunk per context), errors are NBD error values (EINVAL
// for an unknown command or flag, EPERM for a write to a read-only
// export), and nothing answers a request after the end.

@_cdecl("fuzz_nbd_transmission_main")
public func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    runFuzzer(argc, argv) { fuzzOneInput($0, $1) }
}

struct Sent {
    var request: NBDRequest
}

/// The requests as the server frames them, renumbered, and the stream.
func frame(_ bytes: ArraySlice<UInt8>) -> (stream: [UInt8], requests: [Sent]) {
    var input = FuzzInput(Array(bytes))
    var stream: [UInt8] = [], requests: [Sent] = []
    while input.remaining >= NBD.requestHeaderSize {
        let header = input.take(NBD.requestHeaderSize)
        guard case .success(var request) = NBDRequest.parse(header) else {
            return (stream + header + input.rest(), requests)
        }
        request.handle = UInt64(requests.count) | 0xF00D_0000_0000_0000
        stream += request.encoded
        if request.hasPayload {
            // A WRITE past any limit ends the connection: its payload is never read.
            guard request.length <= NBD.maxSkippablePayload, input.remaining >= Int(request.length) else {
                return (stream + input.rest(), requests)
            }
            stream += input.take(Int(request.length))
        }
        if request.type == NBDCommand.disconnect.rawValue {
            return (stream + input.rest(), requests)
        }
        requests.append(Sent(request: request))
    }
    return (stream + input.rest(), requests)
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let bytes = FuzzInput(data, size).bytes
    let config = bytes.first ?? 0
    let fixture = NbdFixture()
    defer { fixture.engine.destroyAll() }
    let export = config & 0x40 != 0 ? fixture.plain : config & 8 != 0 ? fixture.image : fixture.device
    let structured = config & 1 != 0
    var contexts: [(id: UInt32, context: MetaContext)] = []
    if structured && config & 2 != 0 { contexts.append((1, .baseAllocation)) }
    if structured && config & 4 != 0 && export.changes != nil {
        contexts.append((UInt32(contexts.count + 1), .changedSince((config >> 4) & 3)))
    }
    let (stream, requests) = frame(bytes.dropFirst())
    let memory = MemoryStream(stream)
    let negotiated = Negotiated(export: export, structuredReplies: structured, metaContexts: contexts,
                                transmissionFlags: export.transmissionFlags(structuredReplies: structured))
    weak var gone: Connection?
    do {
        let connection = Connection(id: 1, stream: memory, exports: ExportTable(exports: fixture.exports),
                                    limits: ConnectionLimits(workers: config & 0x80 != 0 ? 2 : 1), logger: silentLogger)
        gone = connection
        connection.run(preNegotiated: negotiated)
    }
    check(memory.written, requests, export: export, contexts: contexts.count, structured: structured)
    // The leak check: a worker thread lets go of its connection just after
    // `run` returns, so LeakSanitizer's check after each input would race
    // it (tools/fuzz turns that check off here); a connection that is
    // still alive a second later is held by a cycle or a lost thread.
    promise(eventually { gone == nil }, "the connection is still alive a second after it ended")
    return 0
}

let nbdErrors: Set<UInt32> = [NBD.ePerm, NBD.eIO, NBD.eNoMem, NBD.eInval, NBD.eNoSpc, NBD.eOverflow,
                              NBD.eNotSup, NBD.eShutdown]

func check(_ bytes: [UInt8], _ requests: [Sent], export: Export, contexts: Int, structured: Bool) {
    var s = FuzzInput(bytes)
    var finals = [Int](repeating: 0, count: requests.count)
    var chunks = [Int](repeating: 0, count: requests.count)
    while !s.isAtEnd {
        promise(s.remaining >= 16, "a reply cut short")
        let magic = s.u32be()
        var handle: UInt64 = 0, error: UInt32 = 0, done = false
        var dataLength = 0
        if magic == NBD.simpleReplyMagic {
            error = s.u32be()
            handle = s.u64be()
            done = true
        } else {
            promise(magic == NBD.structuredReplyMagic && structured, "a reply with magic 0x\(String(magic, radix: 16))")
            let flags = s.u16be(), type = s.u16be()
            handle = s.u64be()
            let length = Int(s.u32be())
            promise(s.remaining >= length, "a chunk cut short")
            var payload = FuzzInput(s.take(length))
            done = flags & NBD.replyFlagDone != 0
            switch type {
            case NBD.replyTypeError:
                error = payload.u32be()
                let message = Int(payload.u16be())
                promise(length == 6 + message && message <= NBD.maxString, "an error chunk of \(length) bytes")
                promise(done, "an error chunk that is not the last")
            case NBD.replyTypeOffsetData:
                dataLength = length - 8
            case NBD.replyTypeBlockStatus:
                promise(length >= 12 && (length - 4) % 8 == 0, "a block status chunk of \(length) bytes")
                let id = payload.u32be()
                promise(id >= 1 && id <= UInt32(contexts), "block status for context \(id)")
            default:
                promise(false, "a chunk of type \(type)")
            }
            let index = Int(truncatingIfNeeded: handle & 0xFFFF_FFFF)
            if handle >> 32 == 0xF00D_0000, index < requests.count {
                chunks[index] += 1
                let r = requests[index].request
                if type == NBD.replyTypeOffsetData {
                    payload = FuzzInput(Array(payload.bytes.prefix(8)))
                    promise(r.type == NBDCommand.read.rawValue && payload.u64be() == r.offset
                            && dataLength == Int(r.length), "OFFSET_DATA that does not answer its READ")
                }
            }
        }
        promise(handle >> 32 == 0xF00D_0000 && Int(handle & 0xFFFF_FFFF) < requests.count,
                "a reply for handle 0x\(String(handle, radix: 16)), never sent")
        let index = Int(handle & 0xFFFF_FFFF)
        let r = requests[index].request
        if error != 0 { promise(nbdErrors.contains(error), "error \(error) is not an NBD error value") }
        if magic == NBD.simpleReplyMagic && error == 0 && r.type == NBDCommand.read.rawValue {
            promise(s.remaining >= Int(r.length), "a READ's data cut short")
            _ = s.take(Int(r.length))
        }
        if done {
            finals[index] += 1
            if r.type == NBDCommand.blockStatus.rawValue && error == 0 {
                promise(chunks[index] == contexts, "BLOCK_STATUS answered with \(chunks[index]) chunks for \(contexts) contexts")
            }
            if NBDCommand(rawValue: r.type) == nil { promise(error == NBD.eInval, "unknown command \(r.type) got \(error)") }
            if export.readOnly && [1, 4, 6].contains(r.type) && error != NBD.eInval {
                promise(error == NBD.ePerm, "a write to a read-only export got \(error)")
            }
        }
    }
    for (i, n) in finals.enumerated() {
        promise(n == 1, "request \(i) (type \(requests[i].request.type), flags \(requests[i].request.flags)) got \(n) final replies")
    }
}
