import BlksnapEngine
import Logging

/// What the handshake agreed on: everything the transmission phase needs.
struct Negotiated: Sendable {
    var export: Export
    var structuredReplies: Bool
    /// Selected contexts, in the order the client asked; ids are this
    /// connection's own.
    var metaContexts: [(id: UInt32, context: MetaContext)]
    var transmissionFlags: UInt16
}

/// The exports a server offers. blksnapd adds and removes them as devices
/// are attached and images come and go, so connections look names up at
/// negotiation time under a lock; a connection keeps the export it chose.
final class ExportTable: @unchecked Sendable {
    private let lock = Lock()
    private var list: [Export]

    init(exports: [Export]) { list = exports }

    var exports: [Export] { lock.withLock { list } }

    /// The empty name is the spec's "default export": our first one.
    func find(_ name: String) -> Export? {
        lock.withLock { name.isEmpty ? list.first : list.first { $0.name == name } }
    }

    func add(_ export: Export) throws(BlksnapError) {
        try lock.withLock { () throws(BlksnapError) in
            guard !list.contains(where: { $0.name == export.name }) else {
                throw BlksnapError(.fileExists, "an export named \(export.name) exists")
            }
            list.append(export)
        }
    }

    func remove(_ name: String) { lock.withLock { list.removeAll { $0.name == name } } }
}

/// Fixed newstyle negotiation (nbdkit's `protocol-handshake-newstyle.c`):
/// greet, read the client's flags, then answer options until one of
/// NBD_OPT_EXPORT_NAME or NBD_OPT_GO picks an export.
///
/// Runs on the connection's thread before any worker exists, so it keeps
/// its state in plain fields. Nothing here touches a device: a client
/// that never completes the handshake costs no I/O.
final class Handshake {
    enum Outcome {
        case transmission(Negotiated)
        /// The client aborted, went away or broke the protocol; the reason
        /// is for the log.
        case closed(String)
    }

    /// Options longer than this are not read: no valid option comes near
    /// (strings are at most 4 KiB), so the client is broken or hostile.
    static let maxOptionLength: UInt32 = 1 << 20

    private let stream: any ByteStream
    private let exports: ExportTable
    private let logger: Logger
    private var noZeroes = false
    private var structuredReplies = false
    private var metaContexts: [(id: UInt32, context: MetaContext)] = []
    /// The export SET_META_CONTEXT chose for; a GO for another one drops the
    /// selection, as the spec requires.
    private var metaExport: String?

    init(stream: any ByteStream, exports: ExportTable, logger: Logger) {
        self.stream = stream
        self.exports = exports
        self.logger = logger
    }

    func run() -> Outcome {
        var greeting = WireWriter()
        greeting.u64(NBD.magic)
        greeting.u64(NBD.optionMagic)
        greeting.u16(NBD.flagFixedNewstyle | NBD.flagNoZeroes)
        guard stream.send(greeting.bytes) else { return .closed("client went away before the greeting") }
        guard let raw = stream.receive(count: 4) else { return .closed("client sent no flags") }
        // A WireReader holds a pointer into the array: it must not outlive
        // the closure (the array may be freed right after it).
        let clientFlags = raw.withUnsafeBytes { var r = WireReader($0); return r.u32()! }
        guard clientFlags & ~(NBD.clientFixedNewstyle | NBD.clientNoZeroes) == 0 else {
            return .closed("unknown client flags 0x\(String(clientFlags, radix: 16))")
        }
        noZeroes = clientFlags & NBD.clientNoZeroes != 0

        while true {
            guard let header = stream.receive(count: 16) else { return .closed("client went away during options") }
            let (magic, option, length) = header.withUnsafeBytes { raw in
                var h = WireReader(raw)
                return (h.u64()!, h.u32()!, h.u32()!)
            }
            guard magic == NBD.optionMagic else {
                return .closed("bad option magic 0x\(String(magic, radix: 16))")
            }
            guard length <= Self.maxOptionLength else {
                return .closed("option \(option) has \(length) bytes of data")
            }
            guard let data = stream.receive(count: Int(length)) else {
                return .closed("client went away in the data of option \(option)")
            }
            if let outcome = data.withUnsafeBytes({ handle(option: option, data: $0) }) {
                return outcome
            }
        }
    }

    /// Answers one option; an outcome ends the negotiation.
    private func handle(option: UInt32, data: UnsafeRawBufferPointer) -> Outcome? {
        switch option {
        case NBD.optExportName:
            return exportName(data)
        case NBD.optAbort:
            _ = reply(option, NBD.repAck)
            return .closed("client aborted the negotiation")
        case NBD.optList:
            guard data.isEmpty else { return error(option, NBD.repErrInvalid, "NBD_OPT_LIST takes no data") }
            for e in exports.exports {
                var w = WireWriter()
                w.string32(e.name)
                w.bytes += Array(e.description.utf8)
                guard reply(option, NBD.repServer, w.bytes) else { return .closed("client went away") }
            }
            return ack(option)
        case NBD.optInfo, NBD.optGo:
            return infoOrGo(option, data)
        case NBD.optStructuredReply:
            guard data.isEmpty else {
                return error(option, NBD.repErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
            }
            guard !structuredReplies else {
                return error(option, NBD.repErrInvalid, "structured replies are already negotiated")
            }
            structuredReplies = true
            return ack(option)
        case NBD.optListMetaContext, NBD.optSetMetaContext:
            return metaContext(option, data)
        case NBD.optStartTLS:
            return error(option, NBD.repErrUnsup, "TLS is not supported; use a Unix socket")
        default:
            return error(option, NBD.repErrUnsup, "option \(option) is not supported")
        }
    }

    // MARK: options

    private func exportName(_ data: UnsafeRawBufferPointer) -> Outcome {
        var r = WireReader(data)
        // This option cannot be answered with an error: an unknown export
        // can only end the session.
        guard let name = r.string(data.count) else { return .closed("malformed NBD_OPT_EXPORT_NAME") }
        guard let export = exports.find(name) else { return .closed("NBD_OPT_EXPORT_NAME: no export \"\(name)\"") }
        let negotiated = finish(export)
        var w = WireWriter()
        w.u64(export.device.size)
        w.u16(negotiated.transmissionFlags)
        if !noZeroes { w.bytes += [UInt8](repeating: 0, count: 124) }
        guard stream.send(w.bytes) else { return .closed("client went away") }
        return .transmission(negotiated)
    }

    private func infoOrGo(_ option: UInt32, _ data: UnsafeRawBufferPointer) -> Outcome? {
        var r = WireReader(data)
        guard let nameLength = r.u32(), nameLength <= r.remaining, let name = r.string(Int(nameLength)),
              let count = r.u16(), r.remaining == 2 * Int(count) else {
            return error(option, NBD.repErrInvalid, "malformed \(option == NBD.optGo ? "NBD_OPT_GO" : "NBD_OPT_INFO")")
        }
        let requests = (0..<Int(count)).map { _ in r.u16()! }
        guard let export = exports.find(name) else {
            return error(option, NBD.repErrUnknown, "no export \"\(name)\"")
        }
        var infos: [[UInt8]] = []
        var w = WireWriter()
        w.u16(NBD.infoExport)
        w.u64(export.device.size)
        w.u16(export.transmissionFlags(structuredReplies: structuredReplies))
        infos.append(w.bytes)
        if requests.contains(NBD.infoName) {
            var w = WireWriter()
            w.u16(NBD.infoName)
            w.bytes += Array(export.name.utf8)
            infos.append(w.bytes)
        }
        if requests.contains(NBD.infoDescription) && !export.description.isEmpty {
            var w = WireWriter()
            w.u16(NBD.infoDescription)
            w.bytes += Array(export.description.utf8.prefix(NBD.maxString))
            infos.append(w.bytes)
        }
        // Sent unasked too: a client that did not ask may ignore it, and
        // one that did learns the 32 MiB payload limit.
        let minimum = export.minimumBlockSize
        w = WireWriter()
        w.u16(NBD.infoBlockSize)
        w.u32(minimum)
        w.u32(max(NBD.preferredBlockSize, minimum))
        w.u32(NBD.maxPayload)
        infos.append(w.bytes)
        for info in infos {
            guard reply(option, NBD.repInfo, info) else { return .closed("client went away") }
        }
        guard reply(option, NBD.repAck) else { return .closed("client went away") }
        return option == NBD.optGo ? .transmission(finish(export)) : nil
    }

    private func metaContext(_ option: UInt32, _ data: UnsafeRawBufferPointer) -> Outcome? {
        let set = option == NBD.optSetMetaContext
        let what = set ? "NBD_OPT_SET_META_CONTEXT" : "NBD_OPT_LIST_META_CONTEXT"
        guard structuredReplies else {
            return error(option, NBD.repErrInvalid, "\(what) needs structured replies first")
        }
        var r = WireReader(data)
        guard let nameLength = r.u32(), nameLength <= r.remaining, let name = r.string(Int(nameLength)),
              let count = r.u32() else {
            return error(option, NBD.repErrInvalid, "malformed \(what)")
        }
        var queries: [String] = []
        for _ in 0..<count {
            guard let length = r.u32(), length <= r.remaining, let query = r.string(Int(length)) else {
                return error(option, NBD.repErrInvalid, "malformed query in \(what)")
            }
            queries.append(query)
        }
        guard r.remaining == 0 else { return error(option, NBD.repErrInvalid, "trailing bytes in \(what)") }
        guard let export = exports.find(name) else {
            return error(option, NBD.repErrUnknown, "no export \"\(name)\"")
        }

        if set {
            metaContexts = []
            metaExport = export.name
            for query in queries {
                guard let context = MetaContext.select(query: query, export: export),
                      !metaContexts.contains(where: { $0.context == context }) else { continue }
                let id = UInt32(metaContexts.count + 1)
                metaContexts.append((id, context))
                guard reply(option, NBD.repMetaContext, metaContextReply(id, context)) else {
                    return .closed("client went away")
                }
            }
            logger.debug("nbd-handshake: \(export.name): contexts \(metaContexts.map(\.context.name))")
        } else {
            var listed: [MetaContext] = []
            for context in queries.isEmpty ? MetaContext.all(export) : queries.flatMap({ MetaContext.list(query: $0, export: export) })
            where !listed.contains(context) {
                listed.append(context)
                // The id of a listed context is reserved; the spec says zero.
                guard reply(option, NBD.repMetaContext, metaContextReply(0, context)) else {
                    return .closed("client went away")
                }
            }
        }
        return ack(option)
    }

    private func metaContextReply(_ id: UInt32, _ context: MetaContext) -> [UInt8] {
        var w = WireWriter()
        w.u32(id)
        w.bytes += Array(context.name.utf8)
        return w.bytes
    }

    private func finish(_ export: Export) -> Negotiated {
        if metaExport != export.name { metaContexts = [] }
        return Negotiated(export: export, structuredReplies: structuredReplies, metaContexts: metaContexts,
                          transmissionFlags: export.transmissionFlags(structuredReplies: structuredReplies))
    }

    // MARK: replies

    private func reply(_ option: UInt32, _ type: UInt32, _ data: [UInt8] = []) -> Bool {
        var w = WireWriter()
        w.u64(NBD.optionReplyMagic)
        w.u32(option)
        w.u32(type)
        w.u32(UInt32(data.count))
        w.bytes += data
        return stream.send(w.bytes)
    }

    private func ack(_ option: UInt32) -> Outcome? {
        reply(option, NBD.repAck) ? nil : .closed("client went away")
    }

    /// An error reply carries a message for the user; the negotiation goes on.
    private func error(_ option: UInt32, _ type: UInt32, _ message: String) -> Outcome? {
        logger.debug("nbd-handshake: option \(option): \(message)")
        return reply(option, type, Array(message.utf8.prefix(NBD.maxString))) ? nil : .closed("client went away")
    }
}
