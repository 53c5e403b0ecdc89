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
        var tracked: [RollingSnapshot] = []
        for (i, spec) in exports.enumerated() {
            let split = spec.firstIndex(of: "=")!
            let name = String(spec[..<split]), path = String(spec[spec.index(after: split)...])
            let devId = DevId(major: 250, minor: UInt32(i))
            let backing = try FileBlockDevice(path: path, readOnly: readOnly)
            let device = try engine.route(devId, backing: backing)
            var export = Export(name: name, description: path, device: device, readOnly: readOnly)
            if snapshot.contains(name) {
                let disk = try RollingSnapshot(engine: engine, name: name, devId: devId,
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

Serve.main()
