import BlksnapEngine
@testable import BlksnapNBD
import BlksnapTestSupport
import Logging

/// A client's whole side of a conversation in memory: `receive` hands out
/// the scripted bytes then reports end of stream, `send` collects what the
/// server says (from any worker thread; the connection serializes sends).
final class MemoryStream: ByteStream, @unchecked Sendable {
    private let lock = Lock()
    private let input: [UInt8]
    private var position = 0
    private var output: [UInt8] = []
    private var isShut = false

    init(_ input: [UInt8]) { self.input = input }

    func receive(into buffer: UnsafeMutableRawBufferPointer) -> Bool {
        lock.withLock {
            guard !isShut, input.count - position >= buffer.count else { return false }
            buffer.copyBytes(from: input[position..<(position + buffer.count)])
            position += buffer.count
            return true
        }
    }

    func send(_ parts: [UnsafeRawBufferPointer]) -> Bool {
        lock.withLock {
            for p in parts { output += p }
            return !isShut
        }
    }

    func shutdown() { lock.withLock { isShut = true } }

    var written: [UInt8] { lock.withLock { output } }
    var consumed: Int { lock.withLock { position } }
}

/// Builds what a client sends, field by field, big-endian.
struct ClientScript {
    var w = WireWriter()
    var bytes: [UInt8] { w.bytes }

    init(flags: UInt32 = NBD.clientFixedNewstyle | NBD.clientNoZeroes) { w.u32(flags) }

    mutating func option(_ option: UInt32, _ data: [UInt8] = []) {
        w.u64(NBD.optionMagic)
        w.u32(option)
        w.u32(UInt32(data.count))
        w.bytes += data
    }

    static func infoData(_ name: String, infos: [UInt16] = []) -> [UInt8] {
        var d = WireWriter()
        d.string32(name)
        d.u16(UInt16(infos.count))
        for i in infos { d.u16(i) }
        return d.bytes
    }

    static func metaData(_ name: String, _ queries: [String]) -> [UInt8] {
        var d = WireWriter()
        d.string32(name)
        d.u32(UInt32(queries.count))
        for q in queries { d.string32(q) }
        return d.bytes
    }

    mutating func structuredReplies() { option(NBD.optStructuredReply) }
    mutating func go(_ name: String, infos: [UInt16] = []) { option(NBD.optGo, Self.infoData(name, infos: infos)) }
    mutating func setMeta(_ name: String, _ queries: [String]) { option(NBD.optSetMetaContext, Self.metaData(name, queries)) }

    mutating func request(_ command: NBDCommand, handle: UInt64, offset: UInt64 = 0, length: UInt32 = 0,
                          flags: UInt16 = 0, payload: [UInt8] = []) {
        w.bytes += NBDRequest(flags: flags, type: command.rawValue, handle: handle, offset: offset, length: length).encoded
        w.bytes += payload
    }
}

/// Reads what the server sent, in the order the client would.
struct ServerOutput {
    let bytes: [UInt8]
    var position = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    var atEnd: Bool { position == bytes.count }

    mutating func take(_ n: Int) -> [UInt8] {
        precondition(bytes.count - position >= n, "server output ends early")
        defer { position += n }
        return Array(bytes[position..<(position + n)])
    }

    mutating func u16() -> UInt16 { take(2).withUnsafeBytes { var r = WireReader($0); return r.u16()! } }
    mutating func u32() -> UInt32 { take(4).withUnsafeBytes { var r = WireReader($0); return r.u32()! } }
    mutating func u64() -> UInt64 { take(8).withUnsafeBytes { var r = WireReader($0); return r.u64()! } }

    /// NBDMAGIC, IHAVEOPT, handshake flags.
    mutating func greeting() -> (UInt64, UInt64, UInt16) { (u64(), u64(), u16()) }

    struct OptionReply {
        var option: UInt32
        var type: UInt32
        var data: [UInt8]
        var text: String { String(decoding: data, as: UTF8.self) }
    }

    mutating func optionReply() -> OptionReply {
        precondition(u64() == NBD.optionReplyMagic, "bad option reply magic")
        let option = u32(), type = u32(), length = u32()
        return OptionReply(option: option, type: type, data: take(Int(length)))
    }

    /// Option replies up to and including the final ACK or error.
    mutating func optionReplies() -> [OptionReply] {
        var out: [OptionReply] = []
        repeat { out.append(optionReply()) } while out.last!.type != NBD.repAck && out.last!.type & 0x8000_0000 == 0
        return out
    }

    enum Reply: Hashable {
        case simple(handle: UInt64, error: UInt32, data: [UInt8])
        case chunk(handle: UInt64, flags: UInt16, type: UInt16, payload: [UInt8])

        var handle: UInt64 {
            switch self {
            case .simple(let h, _, _), .chunk(let h, _, _, _): h
            }
        }
    }

    /// One reply message; a simple reply to a READ carries `readLengths[handle]`
    /// bytes when it reports success.
    mutating func reply(readLengths: [UInt64: Int] = [:]) -> Reply {
        let magic = u32()
        if magic == NBD.simpleReplyMagic {
            let error = u32(), handle = u64()
            let data = error == 0 ? take(readLengths[handle] ?? 0) : []
            return .simple(handle: handle, error: error, data: data)
        }
        precondition(magic == NBD.structuredReplyMagic, "bad reply magic \(magic)")
        let flags = u16(), type = u16(), handle = u64(), length = u32()
        return .chunk(handle: handle, flags: flags, type: type, payload: take(Int(length)))
    }

    mutating func replies(readLengths: [UInt64: Int] = [:]) -> [Reply] {
        var out: [Reply] = []
        while !atEnd { out.append(reply(readLengths: readLengths)) }
        return out
    }
}

extension Array where Element == UInt8 {
    func u32(at i: Int) -> UInt32 { self[i..<(i + 4)].reduce(0) { $0 << 8 | UInt32($1) } }
    func u16(at i: Int) -> UInt16 { self[i..<(i + 2)].reduce(0) { $0 << 8 | UInt16($1) } }
    func u64(at i: Int) -> UInt64 { self[i..<(i + 8)].reduce(0) { $0 << 8 | UInt64($1) } }
}

/// Runs a whole scripted conversation against one connection and returns
/// what the server sent.
func converse(_ script: ClientScript, exports: [Export], workers: Int = 4,
              limits: ConnectionLimits? = nil) -> (output: ServerOutput, stream: MemoryStream) {
    let stream = MemoryStream(script.bytes)
    var logger = Logger(label: "test")
    logger.logLevel = .critical
    Connection(id: 1, stream: stream, exports: ExportTable(exports: exports),
               limits: limits ?? ConnectionLimits(workers: workers), logger: logger).run()
    return (ServerOutput(stream.written), stream)
}

/// The option replies of a script that ends without choosing an export.
func optionReplies(_ script: ClientScript, exports: [Export]) -> [ServerOutput.OptionReply] {
    var out = converse(script, exports: exports).output
    _ = out.greeting()
    var replies: [ServerOutput.OptionReply] = []
    while !out.atEnd { replies.append(out.optionReply()) }
    return replies
}

func memoryExport(_ name: String = "disk", size: UInt64 = 1 << 20, readOnly: Bool = false,
                  changes: CbtSource? = nil) -> (Export, MemoryBlockDevice) {
    let device = MemoryBlockDevice(size: size)
    return (Export(name: name, description: "a test disk", device: device, readOnly: readOnly, changes: changes), device)
}
