import BlksnapEngine
import SystemPackage

/// The numbers of the NBD protocol (NetworkBlockDevice/nbd `doc/proto.md`),
/// in one place as nbdkit keeps them in `nbd-protocol.h`.
///
/// Everything on the wire is big-endian. Only what this server speaks is
/// here: fixed newstyle negotiation, structured replies and metadata
/// contexts, but no TLS and no extended headers (both answered
/// NBD_REP_ERR_UNSUP, so clients fall back).
public enum NBD {
    // MARK: handshake
    public static let magic: UInt64 = 0x4e42_444d_4147_4943             // "NBDMAGIC"
    public static let optionMagic: UInt64 = 0x4948_4156_454f_5054       // "IHAVEOPT"
    public static let optionReplyMagic: UInt64 = 0x0003_e889_0455_65a9

    public static let flagFixedNewstyle: UInt16 = 1 << 0
    public static let flagNoZeroes: UInt16 = 1 << 1
    public static let clientFixedNewstyle: UInt32 = 1 << 0
    public static let clientNoZeroes: UInt32 = 1 << 1

    public static let optExportName: UInt32 = 1
    public static let optAbort: UInt32 = 2
    public static let optList: UInt32 = 3
    public static let optStartTLS: UInt32 = 5
    public static let optInfo: UInt32 = 6
    public static let optGo: UInt32 = 7
    public static let optStructuredReply: UInt32 = 8
    public static let optListMetaContext: UInt32 = 9
    public static let optSetMetaContext: UInt32 = 10

    public static let repAck: UInt32 = 1
    public static let repServer: UInt32 = 2
    public static let repInfo: UInt32 = 3
    public static let repMetaContext: UInt32 = 4
    public static let repErrUnsup: UInt32 = 0x8000_0001
    public static let repErrPolicy: UInt32 = 0x8000_0002
    public static let repErrInvalid: UInt32 = 0x8000_0003
    public static let repErrPlatform: UInt32 = 0x8000_0004
    public static let repErrTLSReqd: UInt32 = 0x8000_0005
    public static let repErrUnknown: UInt32 = 0x8000_0006
    public static let repErrShutdown: UInt32 = 0x8000_0007

    public static let infoExport: UInt16 = 0
    public static let infoName: UInt16 = 1
    public static let infoDescription: UInt16 = 2
    public static let infoBlockSize: UInt16 = 3

    // MARK: transmission flags (sent with the export)
    public static let flagHasFlags: UInt16 = 1 << 0
    public static let flagReadOnly: UInt16 = 1 << 1
    public static let flagSendFlush: UInt16 = 1 << 2
    public static let flagSendFUA: UInt16 = 1 << 3
    public static let flagRotational: UInt16 = 1 << 4
    public static let flagSendTrim: UInt16 = 1 << 5
    public static let flagSendWriteZeroes: UInt16 = 1 << 6
    public static let flagSendDF: UInt16 = 1 << 7
    public static let flagCanMultiConn: UInt16 = 1 << 8

    // MARK: requests
    public static let requestMagic: UInt32 = 0x2560_9513
    public static let requestHeaderSize = 28

    public static let cmdFlagFUA: UInt16 = 1 << 0
    public static let cmdFlagNoHole: UInt16 = 1 << 1
    public static let cmdFlagDF: UInt16 = 1 << 2
    public static let cmdFlagReqOne: UInt16 = 1 << 3

    // MARK: replies
    public static let simpleReplyMagic: UInt32 = 0x6744_6698
    public static let structuredReplyMagic: UInt32 = 0x668e_33ef
    public static let replyFlagDone: UInt16 = 1 << 0
    public static let replyTypeNone: UInt16 = 0
    public static let replyTypeOffsetData: UInt16 = 1
    public static let replyTypeOffsetHole: UInt16 = 2
    public static let replyTypeBlockStatus: UInt16 = 5
    public static let replyTypeError: UInt16 = 0x8001
    public static let replyTypeErrorOffset: UInt16 = 0x8002

    // MARK: error values: the wire's own numbers, not the host's errno
    public static let ePerm: UInt32 = 1
    public static let eIO: UInt32 = 5
    public static let eNoMem: UInt32 = 12
    public static let eInval: UInt32 = 22
    public static let eNoSpc: UInt32 = 28
    public static let eOverflow: UInt32 = 75
    public static let eNotSup: UInt32 = 95
    public static let eShutdown: UInt32 = 108

    // MARK: limits
    /// The largest READ or WRITE payload; also the maximum block size
    /// announced in NBD_INFO_BLOCK_SIZE, so a conforming client never
    /// sends more.
    public static let maxPayload: UInt32 = 32 << 20
    /// A WRITE larger than this is not read through to stay in step: the
    /// client is broken or hostile, and the connection is dropped instead.
    public static let maxSkippablePayload: UInt32 = 256 << 20
    public static let preferredBlockSize: UInt32 = 4096
    /// Strings in the protocol MUST be no longer than this.
    public static let maxString = 4096
}

/// The one map from an errno to an NBD error value (nbdkit's `nbd_errno`).
///
/// The wire has eight values; everything else, including the engine's
/// EFAULT for a corrupted map and ENODEV for a destroyed image, reads as
/// EINVAL to the client, while the full error goes to the log.
public func nbdError(_ errno: Errno) -> UInt32 {
    switch errno {
    case .notPermitted, .readOnlyFileSystem: return NBD.ePerm
    case .ioError: return NBD.eIO
    case .noMemory: return NBD.eNoMem
    case .noSpace, .diskQuotaExceeded, .fileTooLarge: return NBD.eNoSpc
    case .overflow: return NBD.eOverflow
    case .notSupported, .notSupportedOnSocket: return NBD.eNotSup
    case .socketShutdown: return NBD.eShutdown
    case .invalidArgument: return NBD.eInval
    default: return NBD.eInval
    }
}

/// The commands of the transmission phase.
public enum NBDCommand: UInt16, Sendable, CustomStringConvertible {
    case read = 0, write = 1, disconnect = 2, flush = 3, trim = 4, cache = 5
    case writeZeroes = 6, blockStatus = 7

    public var description: String {
        switch self {
        case .read: "READ"
        case .write: "WRITE"
        case .disconnect: "DISC"
        case .flush: "FLUSH"
        case .trim: "TRIM"
        case .cache: "CACHE"
        case .writeZeroes: "WRITE_ZEROES"
        case .blockStatus: "BLOCK_STATUS"
        }
    }

    /// The command flags a client may set on this command, given what the
    /// server advertised. FUA is accepted everywhere, as the spec demands
    /// once NBD_FLAG_SEND_FUA is set, and ignored where nothing is written.
    func allowedFlags(structuredReplies: Bool) -> UInt16 {
        switch self {
        case .read: structuredReplies ? NBD.cmdFlagFUA | NBD.cmdFlagDF : NBD.cmdFlagFUA
        case .writeZeroes: NBD.cmdFlagFUA | NBD.cmdFlagNoHole
        case .blockStatus: NBD.cmdFlagFUA | NBD.cmdFlagReqOne
        default: NBD.cmdFlagFUA
        }
    }
}

/// One request header, as the client sent it.
public struct NBDRequest: Equatable, Sendable {
    public var flags: UInt16
    public var type: UInt16
    public var handle: UInt64
    public var offset: UInt64
    public var length: UInt32

    public init(flags: UInt16 = 0, type: UInt16, handle: UInt64, offset: UInt64, length: UInt32) {
        self.flags = flags
        self.type = type
        self.handle = handle
        self.offset = offset
        self.length = length
    }

    public var command: NBDCommand? { NBDCommand(rawValue: type) }

    /// Why a header cannot be parsed; both end the connection, because
    /// without a valid header the byte stream can no longer be framed.
    public enum ParseError: Error, Equatable {
        case short
        case badMagic(UInt32)
    }

    /// Parses the 28-byte header.
    public static func parse(_ bytes: UnsafeRawBufferPointer) -> Result<NBDRequest, ParseError> {
        guard bytes.count >= NBD.requestHeaderSize else { return .failure(.short) }
        var r = WireReader(bytes)
        let magic = r.u32()!
        guard magic == NBD.requestMagic else { return .failure(.badMagic(magic)) }
        return .success(NBDRequest(flags: r.u16()!, type: r.u16()!, handle: r.u64()!,
                                   offset: r.u64()!, length: r.u32()!))
    }

    public static func parse(_ bytes: [UInt8]) -> Result<NBDRequest, ParseError> {
        bytes.withUnsafeBytes { parse($0) }
    }

    /// The header as a client writes it (for tests and tools).
    public var encoded: [UInt8] {
        var w = WireWriter()
        w.u32(NBD.requestMagic)
        w.u16(flags)
        w.u16(type)
        w.u64(handle)
        w.u64(offset)
        w.u32(length)
        return w.bytes
    }
}

/// What the validation of a request needs to know about the connection.
public struct TransmissionState: Sendable {
    public var size: UInt64
    public var readOnly: Bool
    public var structuredReplies: Bool
    public var metaContextCount: Int
    /// Requests whose offset and length are not multiples of this fail
    /// with EINVAL; it is the minimum block size we announce.
    public var minimumBlockSize: UInt32

    public init(size: UInt64, readOnly: Bool, structuredReplies: Bool, metaContextCount: Int,
                minimumBlockSize: UInt32 = 1) {
        self.size = size
        self.readOnly = readOnly
        self.structuredReplies = structuredReplies
        self.metaContextCount = metaContextCount
        self.minimumBlockSize = minimumBlockSize
    }
}

/// A request refused before it reaches the device: the NBD error and the
/// message for a structured error chunk.
public struct RequestRejection: Error, Equatable, Sendable {
    public var error: UInt32
    public var message: String

    public init(_ error: UInt32, _ message: String) {
        self.error = error
        self.message = message
    }
}

extension NBDRequest {
    /// Whether a WRITE's payload follows this header. The reader must
    /// consume it even when the request is refused, or every later header
    /// would be read from the middle of the data.
    public var hasPayload: Bool { type == NBDCommand.write.rawValue }

    /// Checks a request against the export and what was negotiated, in
    /// nbdkit's order: the command, its flags, permission, then the range.
    /// The spec fixes the errors that matter to clients: EINVAL for unknown
    /// commands or flags and reads past the end, ENOSPC for writes past the
    /// end, EPERM for writes to a read-only export.
    public func validate(_ state: TransmissionState) -> RequestRejection? {
        guard let command else {
            return RequestRejection(NBD.eInval, "unknown command \(type)")
        }
        // DISC gets no reply whatever its flags: the spec has the server
        // close, and an error reply would be read as the answer to nothing.
        if command == .disconnect { return nil }
        let unknownFlags = flags & ~command.allowedFlags(structuredReplies: state.structuredReplies)
        if unknownFlags != 0 {
            return RequestRejection(NBD.eInval, "\(command): flags 0x\(String(unknownFlags, radix: 16)) are not valid")
        }
        switch command {
        case .disconnect:
            return nil
        case .cache:
            return RequestRejection(NBD.eInval, "CACHE is not supported")
        case .flush:
            if offset != 0 || length != 0 {
                return RequestRejection(NBD.eInval, "FLUSH: offset and length must be zero")
            }
            return nil
        case .blockStatus:
            if !state.structuredReplies {
                return RequestRejection(NBD.eInval, "BLOCK_STATUS needs structured replies")
            }
            if state.metaContextCount == 0 {
                return RequestRejection(NBD.eInval, "BLOCK_STATUS: no metadata context was selected")
            }
        case .write, .trim, .writeZeroes:
            if state.readOnly {
                return RequestRejection(NBD.ePerm, "\(command): the export is read-only")
            }
        case .read:
            break
        }
        if length == 0 {
            return RequestRejection(NBD.eInval, "\(command): length must not be zero")
        }
        if (command == .read || command == .write) && length > NBD.maxPayload {
            return RequestRejection(NBD.eInval, "\(command): length \(length) is over the maximum of \(NBD.maxPayload)")
        }
        let m = UInt64(state.minimumBlockSize)
        if m > 1 && (offset % m != 0 || UInt64(length) % m != 0) {
            return RequestRejection(NBD.eInval, "\(command): offset and length must be multiples of \(m)")
        }
        let (end, overflow) = offset.addingReportingOverflow(UInt64(length))
        if overflow || end > state.size {
            let error = (command == .read || command == .blockStatus) ? NBD.eInval : NBD.eNoSpc
            return RequestRejection(error, "\(command): \(offset)+\(length) is past the end of the export (\(state.size) bytes)")
        }
        return nil
    }
}

// MARK: replies

/// Encoders for the server's replies in the transmission phase. Each
/// returns the bytes before any data payload, which is sent after them
/// from its own buffer so a 32 MiB read is never copied.
public enum NBDReply {
    /// A simple reply: the only kind without structured replies, and the
    /// kind we use for every success with no payload.
    public static func simple(handle: UInt64, error: UInt32) -> [UInt8] {
        var w = WireWriter()
        w.u32(NBD.simpleReplyMagic)
        w.u32(error)
        w.u64(handle)
        return w.bytes
    }

    public static func chunkHeader(flags: UInt16, type: UInt16, handle: UInt64, length: UInt32) -> [UInt8] {
        var w = WireWriter()
        w.u32(NBD.structuredReplyMagic)
        w.u16(flags)
        w.u16(type)
        w.u64(handle)
        w.u32(length)
        return w.bytes
    }

    /// The header and offset of one NBD_REPLY_TYPE_OFFSET_DATA chunk, to be
    /// followed by `dataLength` bytes. It is the final chunk because the
    /// data is read in full before anything is sent, so no error can follow.
    public static func offsetDataHeader(handle: UInt64, offset: UInt64, dataLength: UInt32, done: Bool = true) -> [UInt8] {
        var w = WireWriter(chunkHeader(flags: done ? NBD.replyFlagDone : 0, type: NBD.replyTypeOffsetData,
                                       handle: handle, length: 8 + dataLength))
        w.u64(offset)
        return w.bytes
    }

    /// A final NBD_REPLY_TYPE_ERROR chunk; the message is for a human.
    public static func errorChunk(handle: UInt64, error: UInt32, message: String) -> [UInt8] {
        let text = Array(message.utf8.prefix(NBD.maxString))
        var w = WireWriter(chunkHeader(flags: NBD.replyFlagDone, type: NBD.replyTypeError,
                                       handle: handle, length: UInt32(6 + text.count)))
        w.u32(error)
        w.u16(UInt16(text.count))
        w.bytes += text
        return w.bytes
    }

    /// One NBD_REPLY_TYPE_BLOCK_STATUS chunk for one metadata context.
    public static func blockStatus(handle: UInt64, contextId: UInt32, extents: [Extent], done: Bool) -> [UInt8] {
        var w = WireWriter(chunkHeader(flags: done ? NBD.replyFlagDone : 0, type: NBD.replyTypeBlockStatus,
                                       handle: handle, length: UInt32(4 + 8 * extents.count)))
        w.u32(contextId)
        for e in extents {
            w.u32(e.length)
            w.u32(e.flags)
        }
        return w.bytes
    }

    /// The reply for a refused or failed request: a structured error chunk
    /// when negotiated (it carries a message, and a READ must never get a
    /// simple reply then), otherwise a simple reply with no payload.
    public static func failure(handle: UInt64, error: UInt32, message: String, structured: Bool) -> [UInt8] {
        structured ? errorChunk(handle: handle, error: error, message: message)
                   : simple(handle: handle, error: error)
    }
}

/// One block status descriptor: a run of bytes sharing the same flags.
public struct Extent: Equatable, Sendable, CustomStringConvertible {
    public var length: UInt32
    public var flags: UInt32

    public init(length: UInt32, flags: UInt32) {
        self.length = length
        self.flags = flags
    }

    public var description: String { "\(length):\(flags)" }
}
