import BlksnapABI
import BlksnapEngine
@testable import BlksnapNBD
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

    @Test func tcpBindsLoopbackOnAnEphemeralPort() throws {
        let server = try Server(exports: [memoryExport().0], logger: quietLogger())
        defer { server.stop() }
        let port = try server.listen(port: 0)
        #expect(port != 0)
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
