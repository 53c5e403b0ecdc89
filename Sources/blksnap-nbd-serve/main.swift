import ArgumentParser
import BlksnapABI
import BlksnapControlProtocol
import BlksnapEngine
import BlksnapNBD
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// blksnap-nbd-serve: files as NBD exports, every write passing through a
/// blksnap engine, for tests, benchmarks and trying the CBT context with
/// standard clients.
struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "blksnap-nbd-serve",
        abstract: "Export files over NBD through the blksnap engine.",
        discussion: """
            Each NAME=FILE becomes export NAME, a routed device of an engine \
            (250:0, 250:1, ... in argument order), so writes are tracked once a \
            snapshot names the device.

            With --snapshot NAME, a snapshot of NAME is taken at start with its \
            difference storage in an unlinked temporary file; NAME then offers the \
            metadata contexts blksnap:changed-since:N, and NAME@snapshot exports the \
            latest snapshot image read-only. SIGUSR1 takes a new snapshot of every \
            such device (the old one is destroyed, the tracking goes on) and prints \
            "took snapshot N of NAME" on standard output. SIGINT or SIGTERM stops.

            Examples:
              blksnap-nbd-serve --socket /tmp/nbd.sock disk=/var/tmp/disk.img
              nbdinfo 'nbd+unix:///disk?socket=/tmp/nbd.sock'

              blksnap-nbd-serve --socket /tmp/nbd.sock --snapshot disk disk=/var/tmp/disk.img &
              kill -USR1 %1     # prints: took snapshot 2 of disk
              nbdinfo --map=blksnap:changed-since:1 'nbd+unix:///disk?socket=/tmp/nbd.sock'
              nbdcopy 'nbd+unix:///disk@snapshot?socket=/tmp/nbd.sock' backup.img
            """)

    @Option(help: "Unix socket to listen on (created with mode 0600).")
    var socket: String

    @Option(help: "Also listen on TCP, HOST:PORT (HOST defaults to 127.0.0.1).")
    var tcp: String?

    @Flag(help: "Refuse writes to every export.")
    var readOnly = false

    @Option(help: "Take a snapshot of export NAME at start and on SIGUSR1 (repeatable).")
    var snapshot: [String] = []

    @Option(help: "Write the process id here once the sockets listen.")
    var pidfile: String?

    @Option(help: "Worker threads per connection.")
    var workers = 8

    @Option(help: "Smallest CBT tracking block, as a power of two in bytes.")
    var trackingBlockShift = EngineSettings().trackingBlockMinimumShift

    @Flag(help: "Log each connection and refused request.")
    var verbose = false

    @Argument(help: "Exports, as NAME=FILE.")
    var exports: [String]

    func validate() throws {
        guard !exports.isEmpty else { throw ValidationError("name at least one NAME=FILE") }
        for e in exports where !e.contains("=") || e.hasPrefix("=") {
            throw ValidationError("\(e): exports are NAME=FILE")
        }
        for s in snapshot where !exports.contains(where: { $0.hasPrefix(s + "=") }) {
            throw ValidationError("--snapshot \(s): no export of that name")
        }
    }

    func run() throws {
        LoggingSystem.bootstrap(StreamLogHandler.standardError)
        var logger = Logger(label: "blksnap-nbd-serve")
        logger.logLevel = verbose ? .debug : .notice

        // Signals go to sigwait below, never to a handler on a random
        // thread: blocked here, before any thread exists, so all inherit it.
        var signals = sigset_t()
        sigemptyset(&signals)
        for s in [SIGINT, SIGTERM, SIGUSR1, SIGHUP] { sigaddset(&signals, s) }
        pthread_sigmask(SIG_BLOCK, &signals, nil)

        var settings = EngineSettings()
        settings.trackingBlockMinimumShift = trackingBlockShift
        let engine = Engine(settings: settings, logger: logger)
        var list: [Export] = []
        var tracked: [TrackedDisk] = []
        for (i, spec) in exports.enumerated() {
            let split = spec.firstIndex(of: "=")!
            let name = String(spec[..<split]), path = String(spec[spec.index(after: split)...])
            let devId = DevId(major: 250, minor: UInt32(i))
            let backing = try FileBlockDevice(path: path, readOnly: readOnly)
            let device = try engine.route(devId, backing: backing)
            var export = Export(name: name, description: path, device: device, readOnly: readOnly)
            if snapshot.contains(name) {
                let disk = try TrackedDisk(engine: engine, name: name, devId: devId,
                                           storageId: DevId(major: 250, minor: UInt32(1000 + i)), size: device.size)
                export.changes = Export.cbtSource(engine: engine, devId: devId)
                tracked.append(disk)
                list.append(export)
                list.append(Export(name: name + "@snapshot", description: "latest snapshot of \(path)",
                                   device: disk.image, readOnly: true))
            } else {
                list.append(export)
            }
        }
        for disk in tracked { print("blksnap-nbd-serve: took snapshot \(try disk.take()) of \(disk.name)") }

        let server = try Server(exports: list, limits: ConnectionLimits(workers: workers), logger: logger)
        try server.listen(unixSocket: socket)
        if let tcp {
            let address: ListenAddress
            do { address = try ListenAddress(parsing: tcp.hasPrefix(":") ? "127.0.0.1" + tcp : tcp, anyPort: true) } catch {
                throw ValidationError("--tcp \(error)")
            }
            let actual = try server.listen(tcpHost: address.host, port: address.port)
            print("blksnap-nbd-serve: tcp port \(actual)")
        }
        if let pidfile {
            let text = "\(getpid())\n"
            let fd = open(pidfile, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw BlksnapError(.init(rawValue: errno), "cannot write \(pidfile)") }
            _ = text.withCString { write(fd, $0, strlen($0)) }
            close(fd)
        }
        fflush(nil)

        while true {
            var received: Int32 = 0
            guard sigwait(&signals, &received) == 0 else { continue }
            if received == SIGUSR1 {
                for disk in tracked {
                    do {
                        print("blksnap-nbd-serve: took snapshot \(try disk.take()) of \(disk.name)")
                    } catch {
                        print("blksnap-nbd-serve: snapshot of \(disk.name) failed: \(error)")
                    }
                }
                fflush(nil)
                continue
            }
            if received == SIGHUP { continue }
            break
        }
        server.stop()
        engine.destroyAll()
        if let pidfile { unlink(pidfile) }
    }
}

/// A device under --snapshot: its storage device and its current snapshot.
/// `take` runs on the main thread only; `lock` guards `current` because
/// the image export reads it from connection threads.
final class TrackedDisk: @unchecked Sendable {
    let engine: Engine
    let name: String
    let devId: DevId
    let storageId: DevId
    let storageSectors: UInt64
    let image: LatestImage
    private let lock = Lock()
    private var current: UUID16?

    init(engine: Engine, name: String, devId: DevId, storageId: DevId, size: UInt64) throws {
        self.engine = engine
        self.name = name
        self.devId = devId
        self.storageId = storageId
        // Room to copy every chunk once, plus the largest chunk for the
        // rounding at the end: the file is sparse, so it costs nothing.
        let bytes = (size &+ (64 << 20) &+ 511) & ~511
        storageSectors = bytes >> 9
        let directory = getenv("TMPDIR").map { String(cString: $0) } ?? "/tmp"
        var template = Array("\(directory)/blksnap-nbd-store-XXXXXX".utf8CString)
        let fd = mkstemp(&template)
        guard fd >= 0 else { throw BlksnapError(.init(rawValue: errno), "cannot create difference storage") }
        let path = String(cString: template)
        defer { unlink(path) }
        guard bytes <= UInt64(Int64.max), ftruncate(fd, off_t(bytes)) == 0 else {
            close(fd)
            throw BlksnapError(.init(rawValue: errno), "cannot size difference storage")
        }
        close(fd)
        // Routed, because the engine finds storage by device number; the
        // unlinked file lives as long as the descriptor inside.
        try engine.route(storageId, backing: FileBlockDevice(path: path))
        image = LatestImage(size: size)
        image.resolve = { [weak self] () throws(BlksnapError) -> SnapImage in
            guard let self, let id = lock.withLock({ current }), let image = engine.images(of: id).first else {
                throw BlksnapError(.operationNotSupportedByDevice, "no snapshot of \(name) right now")
            }
            return image
        }
    }

    /// Destroys the previous snapshot and takes a new one; tracking goes on
    /// across the gap, so the new read map covers it. Returns the number.
    func take() throws(BlksnapError) -> UInt8 {
        if let old = lock.withLock({ current }) {
            lock.withLock { current = nil }
            try engine.destroySnapshot(old)
        }
        let id = try engine.createSnapshot([devId])
        try engine.appendStorage(id, device: storageId, ranges: [SectorRange(offset: 0, count: storageSectors)])
        try engine.takeSnapshot(id)
        lock.withLock { current = id }
        return engine.tracker(devId)!.cbtMap.snapNumberPrevious
    }
}

/// The image of whichever snapshot is current, looked up at each request
/// so the export survives a new snapshot.
final class LatestImage: BlockDevice, @unchecked Sendable {
    let size: UInt64
    var resolve: (@Sendable () throws(BlksnapError) -> SnapImage)!

    init(size: UInt64) { self.size = size }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        try resolve().read(into: buffer, at: offset)
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        throw BlksnapError(.readOnlyFileSystem, "the snapshot export is read-only")
    }

    func flush() throws(BlksnapError) {}
}

Serve.main()
