import BlksnapEngine
import FuzzSupport
@testable import BlksnapNBD
import BlksnapTestSupport

// Harness: NBD fixed-newstyle negotiation (`Handshake.run`), the input
// being all the client sends. Promises: the greeting; unknown client
// flags, a bad option magic, an over-long option or a stream cut short
// end the negotiation with nothing more sent; every other option gets
// replies for that option ending in an ACK or an error (ERR_UNSUP for an
// unknown option, ERR_INVALID for data where none belongs), each with the
// reply magic and an error message of at most 4096 bytes; ABORT gets an
// ACK and the end; EXPORT_NAME gets the export's size and flags or the
// end; the transmission phase starts only after a GO acknowledged or an
// EXPORT_NAME answered, and nothing is sent after.

@_cdecl("fuzz_nbd_handshake_main")
public func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    runFuzzer(argc, argv) { fuzzOneInput($0, $1) }
}

/// Negotiation touches no device, so one set of exports serves every input:
/// the names, a description, and changed blocks with snapshot number 3.
nonisolated(unsafe) let exports: [Export] = {
    let map = CbtReadMap(bytes: [0, 1, 2, 3], blockShift: 12, snapNumber: 3)
    let disk = MemoryBlockDevice(size: 16 << 10)
    return [
        Export(name: "disk", description: "a routed device", device: disk, changes: { () throws(BlksnapError) in map }),
        Export(name: "disk@snapshot", device: disk, readOnly: true),
        Export(name: "plain", description: "a plain disk", device: disk),
    ]
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let bytes = FuzzInput(data, size).bytes
    let stream = MemoryStream(bytes)
    let outcome = Handshake(stream: stream, exports: ExportTable(exports: exports), logger: silentLogger).run()
    var transmission = false
    if case .transmission = outcome { transmission = true }
    check(client: bytes, server: stream.written, transmission: transmission)
    return 0
}

func check(client: [UInt8], server: [UInt8], transmission: Bool) {
    var c = FuzzInput(client), s = FuzzInput(server)
    promise(s.u64be() == NBD.magic && s.u64be() == NBD.optionMagic
            && s.u16be() == NBD.flagFixedNewstyle | NBD.flagNoZeroes, "no greeting")
    func ends(_ why: String) {
        promise(s.isAtEnd, "\(s.remaining) bytes sent after \(why)")
        promise(!transmission, "transmission after \(why)")
    }
    guard c.remaining >= 4 else { return ends("a client that sent no flags") }
    let flags = c.u32be()
    guard flags & ~(NBD.clientFixedNewstyle | NBD.clientNoZeroes) == 0 else { return ends("unknown client flags") }
    let noZeroes = flags & NBD.clientNoZeroes != 0
    while true {
        guard c.remaining >= 16 else { return ends("an option header cut short") }
        let magic = c.u64be(), option = c.u32be(), length = c.u32be()
        guard magic == NBD.optionMagic else { return ends("a bad option magic") }
        guard length <= Handshake.maxOptionLength else { return ends("an option of \(length) bytes") }
        guard c.remaining >= Int(length) else { return ends("option data cut short") }
        _ = c.take(Int(length))
        if option == NBD.optExportName {
            if s.isAtEnd { return ends("an EXPORT_NAME refused") }
            promise(s.remaining == (noZeroes ? 10 : 134), "EXPORT_NAME answered with \(s.remaining) bytes")
            promise(transmission, "no transmission after EXPORT_NAME was answered")
            return
        }
        var final: UInt32 = 0
        repeat {
            promise(s.remaining >= 20, "option \(option) got no whole reply")
            promise(s.u64be() == NBD.optionReplyMagic, "an option reply without its magic")
            let replied = s.u32be()
            final = s.u32be()
            let size = Int(s.u32be())
            promise(replied == option, "option \(option) answered as option \(replied)")
            promise(s.remaining >= size, "an option reply cut short")
            _ = s.take(size)
            if final & 0x8000_0000 != 0 { promise(size <= NBD.maxString, "an error message of \(size) bytes") }
        } while final != NBD.repAck && final & 0x8000_0000 == 0
        let known: Set<UInt32> = [NBD.optAbort, NBD.optList, NBD.optStartTLS, NBD.optInfo, NBD.optGo,
                                  NBD.optStructuredReply, NBD.optListMetaContext, NBD.optSetMetaContext]
        if !known.contains(option) { promise(final == NBD.repErrUnsup, "unknown option \(option) got \(final)") }
        if [NBD.optList, NBD.optStructuredReply, NBD.optAbort].contains(option) && length > 0 && option != NBD.optAbort {
            promise(final == NBD.repErrInvalid, "option \(option) with data got \(final)")
        }
        if option == NBD.optAbort {
            promise(final == NBD.repAck, "ABORT got \(final)")
            return ends("ABORT")
        }
        if option == NBD.optGo && final == NBD.repAck {
            promise(s.isAtEnd, "\(s.remaining) bytes sent after GO")
            promise(transmission, "no transmission after GO was acknowledged")
            return
        }
    }
}
