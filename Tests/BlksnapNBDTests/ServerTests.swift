import BlksnapABI
import BlksnapEngine
@testable import BlksnapNBD
import BlksnapTestSupport
import Logging
import Testing
#if canImport(Glibc)
import Glibc
#endif

func quietLogger() -> Logger {
    var logger = Logger(label: "test")
    logger.logLevel = .critical
    return logger
}

func temporaryDirectory() -> String {
    var template = Array("/tmp/blksnap-nbd-test.XXXXXX".utf8CString)
    precondition(mkdtemp(&template) != nil)
    return String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// Runs a program found on PATH; returns its exit status and standard output.
func runTool(_ arguments: [String]) -> (status: Int32, output: String) {
    var pipeFds: [Int32] = [-1, -1]
    precondition(pipe(&pipeFds) == 0)
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    posix_spawn_file_actions_adddup2(&actions, pipeFds[1], 1)
    posix_spawn_file_actions_addclose(&actions, pipeFds[0])
    var argv = arguments.map { strdup($0) } + [nil]
    defer { argv.forEach { free($0) } }
    var pid = pid_t()
    let rc = posix_spawnp(&pid, arguments[0], &actions, nil, &argv, environ)
    posix_spawn_file_actions_destroy(&actions)
    close(pipeFds[1])
    guard rc == 0 else {
        close(pipeFds[0])
        return (127, "")
    }
    var output: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(pipeFds[0], $0.baseAddress!, $0.count) }
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { break }
        output += chunk[0..<n]
    }
    close(pipeFds[0])
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    return ((status >> 8) & 0xff, String(decoding: output, as: UTF8.self))
}

func toolExists(_ name: String) -> Bool {
    ["/usr/bin/", "/usr/local/bin/", "/bin/"].contains { access($0 + name, X_OK) == 0 }
}

/// A whole small file (such as one under /proc), or nil.
func readText(_ path: String) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
        if n < 0 && errno == EINTR { continue }
        if n < 0 { return nil }
        if n == 0 { return String(decoding: bytes, as: UTF8.self) }
        bytes += chunk[0..<n]
    }
}

/// A client connected to the Unix socket at `path`.
func connectUnix(_ path: String) throws -> Int32 {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        for (i, b) in path.utf8.enumerated() { raw[i] = b }
    }
    let rc = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    guard rc == 0 else {
        let e = errno
        close(fd)
        throw BlksnapError(.init(rawValue: e), "connect \(path)")
    }
    return fd
}

@Suite struct ServerTests {
    @Test func unixSocketIsMode0600AndGoneAfterStop() throws {
        let dir = temporaryDirectory()
        defer { rmdir(dir) }
        let path = dir + "/nbd.sock"
        let server = try Server(exports: [memoryExport().0], logger: quietLogger())
        try server.listen(unixSocket: path)
        var st = stat()
        #expect(lstat(path, &st) == 0)
        #expect(st.st_mode & 0o777 == 0o600)
        #expect((st.st_mode & S_IFMT) == S_IFSOCK)
        server.stop()
        #expect(access(path, F_OK) != 0)
    }

    @Test func aRegularFileAtTheSocketPathIsNotReplaced() throws {
        let dir = temporaryDirectory()
        let path = dir + "/nbd.sock"
        let fd = open(path, O_CREAT | O_WRONLY, 0o600)
        close(fd)
        defer {
            unlink(path)
            rmdir(dir)
        }
        let server = try Server(exports: [memoryExport().0], logger: quietLogger())
        #expect(throws: BlksnapError.self) { try server.listen(unixSocket: path) }
        server.stop()
    }

    @Test func duplicateExportNamesAreRefused() {
        #expect(throws: BlksnapError.self) {
            _ = try Server(exports: [memoryExport("a").0, memoryExport("a").0], logger: quietLogger())
        }
    }

    /// The kernel's own table of listening sockets says where the server
    /// bound: 127.0.0.1 (0100007F) and nothing wider.
    @Test func tcpBindsLoopbackOnAnEphemeralPort() throws {
        let server = try Server(exports: [memoryExport().0], logger: quietLogger())
        defer { server.stop() }
        let port = try server.listen(port: 0)
        #expect(port != 0)
        let hex = String(port, radix: 16, uppercase: true)
        let hexPort = String(repeating: "0", count: 4 - hex.count) + hex
        var bound: [String] = []
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            guard let text = readText(table) else { continue }
            for line in text.split(separator: "\n").dropFirst() {
                let fields = line.split(separator: " ")
                guard fields.count > 3, fields[3] == "0A" else { continue }  // LISTEN
                let local = fields[1].split(separator: ":")
                if local.count == 2, local[1] == hexPort { bound.append(String(local[0])) }
            }
        }
        #expect(bound == ["0100007F"])
    }

    @Test func aUnixClientThePolicyRefusesGetsNoGreeting() throws {
        let dir = temporaryDirectory()
        defer { rmdir(dir) }
        let server = try Server(exports: [memoryExport().0], logger: quietLogger())
        server.admits = { _, _ in false }
        try server.listen(unixSocket: dir + "/nbd.sock")
        defer { server.stop() }
        let fd = try connectUnix(dir + "/nbd.sock")
        defer { close(fd) }
        var byte: UInt8 = 0
        #expect(recv(fd, &byte, 1, Int32(MSG_WAITALL)) == 0)
    }

    @Test(.enabled(if: getuid() == 0, "needs root: the default policy admits root only"))
    func rootIsGreetedOnTheUnixSocket() throws {
        let dir = temporaryDirectory()
        defer { rmdir(dir) }
        let server = try Server(exports: [memoryExport().0], logger: quietLogger())
        try server.listen(unixSocket: dir + "/nbd.sock")
        defer { server.stop() }
        let fd = try connectUnix(dir + "/nbd.sock")
        defer { close(fd) }
        var greeting = [UInt8](repeating: 0, count: 8)
        #expect(recv(fd, &greeting, 8, Int32(MSG_WAITALL)) == 8)
        #expect(greeting == Array("NBDMAGIC".utf8))
    }

    @Test func aGroupSocketIsMode0660InThatGroup() throws {
        let dir = temporaryDirectory()
        defer { rmdir(dir) }
        let server = try Server(exports: [memoryExport().0], logger: quietLogger())
        try server.listen(unixSocket: dir + "/nbd.sock", group: 4242)
        defer { server.stop() }
        var st = stat()
        #expect(lstat(dir + "/nbd.sock", &st) == 0)
        #expect(st.st_mode & 0o777 == 0o660)
        #expect(st.st_gid == 4242)
        #expect(PeerPolicy(group: 4242).allows(-1, PeerCredentials(pid: 1, uid: 1000, gid: 4242)))
        #expect(!PeerPolicy(group: 4242).allows(-1, PeerCredentials(pid: 1, uid: 1000, gid: 100)))
        #expect(!PeerPolicy.rootOnly.allows(-1, PeerCredentials(pid: 1, uid: 1000, gid: 4242)))
        #expect(!PeerPolicy.rootOnly.allows(-1, nil))
    }

    @Test func clientsOverTheCapAreHungUpOn() throws {
        let server = try Server(exports: [memoryExport().0], limits: ConnectionLimits(maxConnections: 2), logger: quietLogger())
        defer { server.stop() }
        var ends: [Int32] = []
        for _ in 0..<3 {
            var fds: [Int32] = [-1, -1]
            #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
            server.serve(connectedSocket: fds[0])
            ends.append(fds[1])
        }
        defer { for e in ends { close(e) } }
        var greeting = [UInt8](repeating: 0, count: 8)
        #expect(recv(ends[0], &greeting, 8, Int32(MSG_WAITALL)) == 8)
        #expect(recv(ends[1], &greeting, 8, Int32(MSG_WAITALL)) == 8)
        #expect(recv(ends[2], &greeting, 8, Int32(MSG_WAITALL)) == 0)
        #expect(server.connectionCount == 2)
    }

    @Test func stopDisconnectsAClientMidNegotiation() throws {
        var fds: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
        let server = try Server(exports: [memoryExport().0], logger: quietLogger())
        server.serve(connectedSocket: fds[0])
        var greeting = [UInt8](repeating: 0, count: 18)
        #expect(recv(fds[1], &greeting, 18, Int32(MSG_WAITALL)) == 18)
        #expect(server.connectionCount == 1)
        server.stop()
        #expect(server.connectionCount == 0)
        var byte: UInt8 = 0
        #expect(recv(fds[1], &byte, 1, 0) == 0)
        close(fds[1])
    }
}

/// The CBT context end to end: an engine with a routed memory disk, two
/// snapshots with writes between them, the server on a temporary socket,
/// and the real `nbdinfo` asking for `blksnap:changed-since:1`.
@Suite struct ChangedBlocksInteropTests {
    @Test(.enabled(if: toolExists("nbdinfo"), "needs nbdinfo (Debian package libnbd-bin)"))
    func nbdinfoListsExactlyTheBlocksWrittenBetweenTwoSnapshots() throws {
        var settings = EngineSettings()
        settings.trackingBlockMinimumShift = 16
        settings.diffStorageMinimum = 4096
        let engine = Engine(settings: settings, logger: quietLogger())
        let diskId = DevId(major: 250, minor: 0), storeId = DevId(major: 250, minor: 1)
        let size: UInt64 = 16 << 20
        let disk = try engine.route(diskId, backing: MemoryBlockDevice(size: size))
        try engine.route(storeId, backing: MemoryBlockDevice(size: 32 << 20))
        let store = [SectorRange(offset: 0, count: (32 << 20) >> 9)]

        func take() throws -> UUID16 {
            let id = try engine.createSnapshot([diskId])
            try engine.appendStorage(id, device: storeId, ranges: store)
            try engine.takeSnapshot(id)
            return id
        }
        let first = try take()
        for (offset, count) in [(3 * 65536 + 7, 100), (10 * 65536 - 1, 2), (200 * 65536, 65536)] {
            try [UInt8](repeating: 0x42, count: count).withUnsafeBytes { try disk.write($0, at: UInt64(offset)) }
        }
        try engine.destroySnapshot(first)
        _ = try take()
        #expect(engine.tracker(diskId)!.cbtMap.snapNumberPrevious == 2)

        let dir = temporaryDirectory()
        let path = dir + "/nbd.sock"
        let server = try Server(exports: [Export(name: "disk", device: disk,
                                                 changes: Export.cbtSource(engine: engine, devId: diskId))],
                                logger: quietLogger())
        defer {
            server.stop()
            rmdir(dir)
        }
        try server.listen(unixSocket: path)

        let result = runTool(["nbdinfo", "--map=blksnap:changed-since:1", "nbd+unix:///disk?socket=\(path)"])
        #expect(result.status == 0)
        let extents = result.output.split(separator: "\n").map { $0.split(separator: " ").prefix(3).joined(separator: " ") }
        #expect(extents == [
            "0 196608 0", "196608 65536 1", "262144 327680 0", "589824 131072 1",
            "720896 12386304 0", "13107200 65536 1", "13172736 3604480 0",
        ])
    }
}
