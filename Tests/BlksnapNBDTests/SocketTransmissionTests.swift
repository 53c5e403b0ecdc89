import BlksnapABI
import BlksnapEngine
@testable import BlksnapNBD
import BlksnapTestSupport
import Glibc
import Testing

/// A file of `size` patterned bytes in its own directory.
final class PatternFile {
    let dir: String
    let path: String
    let bytes: [UInt8]

    init(size: Int, seed: Int) {
        dir = temporaryDirectory()
        path = dir + "/data.img"
        bytes = pattern(size, seed: seed)
        let fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0o600)
        precondition(fd >= 0)
        let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress!, $0.count) }
        precondition(n == size)
        close(fd)
    }

    deinit {
        unlink(path)
        rmdir(dir)
    }
}

/// A file's device that can only be read through its file: `read` fails,
/// so a reply with the file's bytes went out by splice.
final class FileRangeOnlyDevice: BlockDevice, @unchecked Sendable {
    let file: FileBlockDevice

    init(_ path: String) throws { file = try FileBlockDevice(path: path) }

    var size: UInt64 { file.size }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        throw BlksnapError(.ioError, "read through a buffer")
    }
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        try file.write(buffer, at: offset)
    }
    func flush() throws(BlksnapError) { try file.flush() }
    func fileRange(at offset: UInt64, count: Int) -> (descriptor: Int32, offset: UInt64)? {
        file.fileRange(at: offset, count: count)
    }
}

/// Not a routed device, but one whose `fileRange` names a file with other
/// bytes than `read` returns: as a snapshot image's would, once copy on
/// write let the original change.
final class StaleFileDevice: BlockDevice, @unchecked Sendable {
    let memory: MemoryBlockDevice
    let file: FileBlockDevice

    init(size: Int, stalePath: String) throws {
        memory = MemoryBlockDevice(size: UInt64(size))
        file = try FileBlockDevice(path: stalePath)
    }

    var size: UInt64 { memory.size }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        try memory.read(into: buffer, at: offset)
    }
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        try memory.write(buffer, at: offset)
    }
    func flush() throws(BlksnapError) {}
    func fileRange(at offset: UInt64, count: Int) -> (descriptor: Int32, offset: UInt64)? {
        file.fileRange(at: offset, count: count)
    }
}

/// Serves `export` on one end of a socketpair, as the kernel's nbd driver
/// is served (simple replies, no handshake) or as a client is (`script`
/// then begins with the handshake); sends all of `script` in one write
/// and returns everything the server sent until it closed.
func overSocketpair(_ script: [UInt8], export: Export, kernel: Bool) throws -> [UInt8] {
    var fds: [Int32] = [-1, -1]
    guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
        throw BlksnapError(.ioError, "socketpair failed: errno \(errno)")
    }
    let client = fds[0]
    defer { close(client) }
    // A server that never answers fails the test rather than hang it.
    var timeout = timeval(tv_sec: 30, tv_usec: 0)
    setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    let server = try Server(exports: kernel ? [] : [export], logger: quietLogger())
    defer { server.stop() }
    if kernel {
        server.serveKernel(connectedSocket: fds[1], export: export)
    } else {
        server.serve(connectedSocket: fds[1])
    }
    let sent = script.withUnsafeBytes { send(client, $0.baseAddress!, $0.count, Int32(MSG_NOSIGNAL)) }
    guard sent == script.count else { throw BlksnapError(.ioError, "short send to the server") }
    var output: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let n = chunk.withUnsafeMutableBytes { recv(client, $0.baseAddress!, $0.count, 0) }
        if n < 0 && errno == EINTR { continue }
        if n < 0 { throw BlksnapError(.ioError, "receiving the replies failed: errno \(errno)") }
        if n == 0 { break }
        output += chunk[0..<n]
    }
    return output
}

@Suite struct SocketTransmissionTests {
    /// Reads at offset and length, by handle: the first two long enough to
    /// go out from the file (the 1 MiB one fills a 1 MiB pipe, so its
    /// header goes before it where the pipe cannot be made larger), the
    /// last below the minimum.
    static let reads: [(handle: UInt64, offset: UInt64, length: Int)] = [
        (1, 4608, 64 << 10), (2, 4096, 1 << 20), (3, 8192, 4096),
    ]

    func script(kernel: Bool) -> ClientScript {
        var s = kernel ? ClientScript(rawBytesOnly: ()) : ClientScript()
        if !kernel {
            s.structuredReplies()
            s.go("disk")
        }
        for r in Self.reads { s.request(.read, handle: r.handle, offset: r.offset, length: UInt32(r.length)) }
        s.request(.disconnect, handle: 99)
        return s
    }

    func replies(_ bytes: [UInt8], kernel: Bool) -> [UInt64: ServerOutput.Reply] {
        var out = ServerOutput(bytes)
        if !kernel { skipHandshake(&out) }
        let lengths = Dictionary(uniqueKeysWithValues: Self.reads.map { ($0.handle, $0.length) })
        var byHandle: [UInt64: ServerOutput.Reply] = [:]
        for reply in out.replies(readLengths: lengths) {
            #expect(byHandle.updateValue(reply, forKey: reply.handle) == nil, "handle \(reply.handle) answered twice")
        }
        return byHandle
    }

    /// Serves `device` as the kernel is served and expects every read of
    /// `reads` to succeed with its range of `bytes`.
    func expectReads(of device: any BlockDevice, toReturn bytes: [UInt8]) throws {
        let output = try overSocketpair(script(kernel: true).bytes, export: Export(name: "disk", device: device),
                                        kernel: true)
        let byHandle = replies(output, kernel: true)
        for r in Self.reads {
            guard case .simple(_, let error, let data)? = byHandle[r.handle] else {
                Issue.record("read \(r.handle) unanswered")
                continue
            }
            let same = data == Array(bytes[Int(r.offset)..<(Int(r.offset) + r.length)])
            #expect(error == 0 && same, "read \(r.handle)")
        }
    }

    /// The routed device's long reads go from its backing file straight to
    /// the socket (its `read` fails, so nothing else could answer them)
    /// with the file's bytes, header and data in step, among requests that
    /// all came in one write; the short one takes the copying path.
    @Test(arguments: [true, false])
    func routedReadsGoOutFromTheFileWithTheFilesBytes(kernel: Bool) throws {
        let file = PatternFile(size: 2 << 20, seed: 11)
        let engine = Engine(logger: quietLogger())
        defer { engine.destroyAll() }
        let routed = try engine.route(DevId(major: 250, minor: 0), backing: FileRangeOnlyDevice(file.path))
        let output = try overSocketpair(script(kernel: kernel).bytes, export: Export(name: "disk", device: routed),
                                        kernel: kernel)
        let byHandle = replies(output, kernel: kernel)
        #expect(byHandle.count == Self.reads.count)
        for r in Self.reads.dropLast() {
            let expected = Array(file.bytes[Int(r.offset)..<(Int(r.offset) + r.length)])
            switch byHandle[r.handle] {
            case .simple(_, let error, let data)?:
                let same = data == expected
                #expect(kernel && error == 0 && same, "read \(r.handle)")
            case .chunk(_, let flags, let type, let payload)?:
                #expect(!kernel && flags == NBD.replyFlagDone && type == NBD.replyTypeOffsetData)
                let same = Array(payload.dropFirst(8)) == expected
                #expect(same, "read \(r.handle)")
            case nil:
                Issue.record("read \(r.handle) unanswered")
            }
        }
        switch byHandle[3] {
        case .simple(_, let error, _)?: #expect(kernel && error == NBD.eIO)
        case .chunk(_, _, let type, _)?: #expect(!kernel && type == NBD.replyTypeError)
        case nil: Issue.record("read 3 unanswered")
        }
    }

    /// A device that is not a routed one never sends from a file, even
    /// where it names one: a snapshot image's bytes are what `read` says.
    @Test func aDeviceThatIsNotRoutedNeverSendsFromAFile() throws {
        let stale = PatternFile(size: 2 << 20, seed: 12)
        let device = try StaleFileDevice(size: 2 << 20, stalePath: stale.path)
        let fresh = pattern(2 << 20, seed: 13)
        try fresh.withUnsafeBytes { try device.write($0, at: 0) }
        try expectReads(of: device, toReturn: fresh)
    }

    /// A snapshot image over a routed file, the original overwritten after
    /// the take: the image's long reads still show the bytes of the take.
    @Test func anImageOfAFileReadsItsSnapshotNotTheFile() throws {
        let file = PatternFile(size: 2 << 20, seed: 14)
        var settings = EngineSettings()
        settings.diffStorageMinimum = 4096
        let engine = Engine(settings: settings, logger: quietLogger())
        defer { engine.destroyAll() }
        let diskId = DevId(major: 250, minor: 0), storeId = DevId(major: 250, minor: 1)
        let routed = try engine.route(diskId, backing: try FileBlockDevice(path: file.path))
        try engine.route(storeId, backing: MemoryBlockDevice(size: 16 << 20))
        let id = try engine.createSnapshot([diskId])
        try engine.appendStorage(id, device: storeId, ranges: [SectorRange(offset: 0, count: (16 << 20) >> 9)])
        try engine.takeSnapshot(id)
        try [UInt8](repeating: 0xEE, count: 2 << 20).withUnsafeBytes { try routed.write($0, at: 0) }
        let image = try #require(engine.images(of: id).first)
        try expectReads(of: image, toReturn: file.bytes)
    }

    /// Writes and reads mixed in one write of the client, a write's payload
    /// straddling what one receive takes: each answered once, and the
    /// writes' bytes are what the reads after a flush return.
    @Test func requestsThatCameTogetherAreEachAnsweredOnce() throws {
        let (export, device) = memoryExport(size: 4 << 20)
        var s = ClientScript(rawBytesOnly: ())
        let small = pattern(4096, seed: 15), large = pattern(200 << 10, seed: 16)
        s.request(.write, handle: 1, offset: 0, length: UInt32(small.count), payload: small)
        s.request(.write, handle: 2, offset: 1 << 20, length: UInt32(large.count), payload: large)
        s.request(.flush, handle: 3)
        for h in UInt64(4)..<40 { s.request(.write, handle: h, offset: h << 12, length: 512, payload: pattern(512, seed: Int(h))) }
        s.request(.disconnect, handle: 99)
        let output = try overSocketpair(s.bytes, export: export, kernel: true)
        var out = ServerOutput(output)
        var handles: [UInt64] = []
        for reply in out.replies() {
            guard case .simple(let handle, let error, _) = reply else { continue }
            #expect(error == 0)
            handles.append(handle)
        }
        #expect(handles.sorted() == Array(1..<40))
        var back = [UInt8](repeating: 0, count: large.count)
        try back.withUnsafeMutableBytes { try device.read(into: $0, at: 1 << 20) }
        let same = back == large
        #expect(same)
        back = [UInt8](repeating: 0, count: 512)
        try back.withUnsafeMutableBytes { try device.read(into: $0, at: 39 << 12) }
        #expect(back == pattern(512, seed: 39))
    }
}

/// A connection being ended (a clean stop hands its device to the next
/// blksnapd) must not go on serving requests it had read ahead: the
/// kernel sends those again on the next connection.
@Suite struct SocketStreamTests {
    @Test func nothingReadAheadIsHandedOutAfterShutdown() throws {
        var fds: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
        defer { close(fds[0]) }
        let stream = SocketStream(fd: fds[1])
        defer { stream.close() }
        let two = pattern(56, seed: 17)
        #expect(two.withUnsafeBytes { send(fds[0], $0.baseAddress!, $0.count, 0) } == 56)
        #expect(stream.receive(count: 28) == Array(two[..<28]))
        stream.shutdown()
        #expect(stream.receive(count: 28) == nil)
    }
}

extension ClientScript {
    /// A script of requests alone, as the kernel's driver sends them
    /// (no client flags, no options).
    init(rawBytesOnly: Void) { w = WireWriter() }
}
