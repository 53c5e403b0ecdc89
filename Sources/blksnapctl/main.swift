import ArgumentParser
import BlksnapABI
import BlksnapControlProtocol
import CBlksnapABI
#if canImport(Glibc)
import Glibc
#endif

/// blksnapctl: the operator's client of blksnapd, over its control socket.
@main
struct Blksnapctl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "blksnapctl",
        abstract: "Operate blksnapd, the user-space blksnap engine.",
        discussion: """
            Talks to blksnapd over its control socket (root only; \
            $BLKSNAP_CONTROL_SOCKET or /run/blksnap/control.sock).

            Examples:
              blksnapctl attach /var/lib/disks/vm1.img --size 10G   # prints: /dev/loop64 7:64
              blksnapctl exec -- blksnap snapshot_create --device /dev/loop64
              blksnapctl status
              blksnapctl detach /dev/loop64
              blksnapctl --generate-completion-script bash > /etc/bash_completion.d/blksnapctl
            """,
        subcommands: [Status.self, Attach.self, Detach.self, Exec.self])
}

struct SocketOption: ParsableArguments {
    @Option(help: "blksnapd's control socket.")
    var socket: String = ProcessEnvironment.get(BLKSNAP_CONTROL_SOCKET_ENV) ?? BLKSNAP_CONTROL_SOCKET
}

enum ProcessEnvironment {
    static func get(_ name: String) -> String? { getenv(name).map { String(cString: $0) } }
}

struct Failure: Error, CustomStringConvertible {
    var description: String
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show routed devices, trackers, snapshots and images.",
        discussion: """
            Declared devices show their state (routed, missing, refused and why) and \
            how their change tracking began: restored (saved at a clean stop), \
            restored-after-crash (a superset of the blocks written), started-anew.

            Examples:
              blksnapctl status
              blksnapctl status --json | jq '.trackers[] | {devId, generationId, snapNumber}'
              blksnapctl status --socket /tmp/test/control.sock
            """)

    @OptionGroup var options: SocketOption

    @Flag(help: "Print JSON instead of tables.")
    var json = false

    func run() throws {
        let client = try ControlClient(path: options.socket)
        if json {
            let (result, payload) = try client.request(BLKSNAP_CONTROL_STATUS)
            guard result == 0 else { throw Failure(description: "status failed: \(String(cString: strerror(-result)))") }
            print(String(decoding: payload, as: UTF8.self))
            return
        }
        let status = try client.status()
        // The CBT column says how tracking began, with why where the routed
        // device knows it (a new generation's reason, regions after a crash).
        let cbtDetail = Dictionary(status.devices.compactMap { d in d.cbt.map { (d.devId, $0) } }) { a, _ in a }
        print(Table.render(title: "declared devices", ["NAME", "STATE", "DEVICE", "CBT", "BACKING", "WHY"],
                           status.declared.map { [$0.name, $0.state.rawValue, $0.link ?? $0.node ?? "-",
                                                  $0.devId.flatMap { cbtDetail[$0] } ?? $0.cbtOrigin.rawValue,
                                                  $0.backing, $0.reason ?? ""] }))
        print(Table.render(title: "routed devices", ["DEVICE", "NODE", "NAME", "SIZE", "TRACKED", "CBT", "CONNECTIONS", "BACKING"],
                           status.devices.map { [$0.devId, $0.node ?? "-", $0.name ?? "-", "\($0.sizeBytes)", $0.tracked ? "yes" : "no",
                                                 $0.cbt ?? "-", $0.connections ?? "-", $0.backing] }))
        print(Table.render(title: "trackers", ["DEVICE", "BLOCK", "BLOCKS", "SNAP#", "GENERATION", "CBT", "SNAPSHOT"],
                           status.trackers.map { ["\($0.devId)", "\($0.blockSize)", "\($0.blockCount)", "\($0.snapNumber)",
                                                  $0.generationId, $0.cbtOrigin.rawValue, $0.snapshot ?? "-"] }))
        print(Table.render(title: "snapshots", ["ID", "TAKEN", "CORRUPTED", "DEVICES", "STORAGE USED/SIZE (sectors)"],
                           status.snapshots.map { [$0.id, $0.taken ? "yes" : "no", $0.corrupted ? "yes" : "no",
                                                   $0.devices.joined(separator: ","),
                                                   "\($0.storageFilledSectors)/\($0.storageCapacitySectors)"] }))
        // An image's node is its export's name where blksnapd did not say:
        // where loop0 or nbd0 was taken, the first image is not /dev/blksnap-image0.
        let nodes = Dictionary(status.exports.map { ($0.devId, "/dev/" + $0.name) }) { a, _ in a }
        print(Table.render(title: "images", ["IMAGE", "NODE", "ORIGINAL", "STORED CHUNKS", "CORRUPTED"],
                           status.snapshots.flatMap(\.images).map {
                               [$0.imageDevId, $0.node ?? nodes[$0.imageDevId] ?? "-", $0.originalDevId, "\($0.storedChunks)",
                                $0.corrupted ? "yes" : "no"]
                           }))
        print(Table.render(title: "NBD exports", ["NAME", "DEVICE", "URI"],
                           status.exports.map { [$0.name, $0.devId, $0.uri] }), terminator: "")
    }
}

struct Attach: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Route a disk through the engine and print its new block device.",
        discussion: """
            BACKING is a regular file (grown to --size if smaller), a block \
            device (refused when mounted or held elsewhere), or an NBD URI \
            (nbd://host/export, nbd+unix:///export?socket=PATH) of a disk \
            another NBD server exports. Prints the new \
            device node and its major:minor; track and snapshot that device, \
            and use it instead of BACKING from now on.

            --name NAME also makes the stable link /dev/disk/by-blksnap/NAME \
            (for /etc/fstab and scripts); --persist declares the device in \
            blksnapd's configuration (/etc/blksnap/devices.conf), so every \
            later start routes it again, with its change tracking.

            With --live, BACKING is a device-mapper device (an LVM volume: \
            /dev/VG/LV, /dev/mapper/NAME, /dev/dm-N) that may stay mounted and \
            written: it keeps its name and number, and its writes pass through \
            the engine from then on (kernel NBD only; linear and striped tables). \
            Do not lvextend, lvreduce, pvmove or lvremove it until detach --live. \
            With --name and --persist too, the volume is declared `live`: every \
            start of blksnapd routes it in place again.

            Examples:
              blksnapctl attach /var/lib/disks/vm1.img --size 10G   # prints: /dev/loop64 7:64
              blksnapctl attach --name vm1 --persist /var/lib/disks/vm1.img
              blksnapctl attach /dev/sdb
              blksnapctl attach 'nbd+unix:///disk?socket=/run/qsd/nbd.sock'
              blksnapctl attach nbd://backup-host/vm2
              blksnapctl attach --live /dev/vg0/data
              blksnapctl attach --live --name data --persist /dev/vg0/data
            """)

    @OptionGroup var options: SocketOption

    @Argument(help: "The file, block device or NBD URI to route.")
    var backing: String

    @Option(help: "Size of a regular file (grown if smaller): bytes, or with K, M, G or T (powers of 1024), e.g. 10G.")
    var size: ByteCount?

    @Flag(help: "Route a mounted device-mapper device in place, without unmounting it.")
    var live = false

    @Option(help: "A name for the device: the stable link /dev/disk/by-blksnap/NAME.")
    var name: String?

    @Flag(help: "Declare the device (needs --name), so blksnapd routes it at every start.")
    var persist = false

    func validate() throws {
        if live && size != nil { throw ValidationError("--live routes a device as it is; --size does not apply") }
        if persist && name == nil { throw ValidationError("--persist needs --name") }
    }

    func run() throws {
        var path = backing
        if !path.hasPrefix("/") && !path.contains("://") {
            var cwd = [CChar](repeating: 0, count: 4096)
            path = String(cString: getcwd(&cwd, cwd.count)) + "/" + path
        }
        let client = try ControlClient(path: options.socket)
        let attached = try client.attach(AttachRequest(backing: path, size: size?.bytes, live: live ? true : nil, name: name,
                                                       persist: persist ? true : nil))
        print("\(attached.node) \(attached.devId)" + (attached.link.map { " " + $0 } ?? ""))
    }
}

struct Detach: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Stop routing a device: flushes it and leaves its backing store consistent.",
        discussion: """
            Refused while the device is in a snapshot or mounted. Its CBT map \
            is saved, so attaching the same backing again carries on with it. \
            With --live, a live-routed device-mapper device gets its own table \
            back while it stays mounted. --forget also removes the device's \
            declaration (and a declared device that is not routed, named by \
            NAME, loses its declaration).

            Examples:
              blksnapctl detach /dev/loop64
              blksnapctl detach 7:64
              blksnapctl detach --live /dev/vg0/data
              blksnapctl detach --forget vm1
            """)

    @OptionGroup var options: SocketOption

    @Argument(help: "The routed device: its name, /dev/disk/by-blksnap link, node (/dev/loop64, /dev/vg0/data) or major:minor.")
    var device: String

    @Flag(help: "Undo attach --live: the device-mapper device gets its own table back, live.")
    var live = false

    @Flag(help: "Also remove its declaration from blksnapd's configuration.")
    var forget = false

    func run() throws {
        let client = try ControlClient(path: options.socket)
        try client.detach(DetachRequest(device: device, live: live ? true : nil, forget: forget ? true : nil))
    }
}

struct Exec: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a command with the blksnap preload shim, so its /dev/blksnap reaches blksnapd.",
        discussion: """
            Sets LD_PRELOAD to the preload library (found beside blksnapctl, in \
            the build tree or in the installed prefix's lib/blksnap) and \
            BLKSNAP_CONTROL_SOCKET to --socket, then runs the command. Where a real \
            /dev/blksnap exists, the shim passes every call through.

            Examples:
              blksnapctl exec -- blksnap version
              blksnapctl exec -- blksnap snapshot_create --device /dev/loop64
              blksnapctl exec -- blksnap tracker_collect
              blksnapctl exec --preload /opt/lib/libblksnap-preload.so -- ./my-backup-tool
            """)

    @OptionGroup var options: SocketOption

    @Option(help: "The preload library (default: found beside blksnapctl).")
    var preload: String?

    @Argument(parsing: .captureForPassthrough, help: "The command and its arguments.")
    var command: [String] = []

    func run() throws {
        var argv = command
        // Everything after `exec` is passed through, so --help before any
        // `--` is ours to answer.
        if argv.first == "--help" || argv.first == "-h" { throw CleanExit.helpRequest(Exec.self) }
        if argv.first == "--" { argv.removeFirst() }
        guard let program = argv.first else { throw ValidationError("name a command to run") }
        let library = try preload ?? Exec.findPreload()
        guard access(library, R_OK) == 0 else {
            throw Failure(description: "cannot read the preload library \(library); build it with tools/build-preload")
        }
        let existing = ProcessEnvironment.get("LD_PRELOAD").map { " " + $0 } ?? ""
        setenv("LD_PRELOAD", library + existing, 1)
        setenv(BLKSNAP_CONTROL_SOCKET_ENV, options.socket, 1)
        var cargs = argv.map { strdup($0) } + [nil]
        execvp(program, &cargs)
        throw Failure(description: "cannot run \(program): \(String(cString: strerror(errno)))")
    }

    /// Beside this binary, in the build tree's preload folder, or installed.
    static func findPreload() throws -> String {
        let candidates = Companion.preloadCandidates(from: Companion.executableDirectory)
        guard let found = candidates.first(where: { access($0, R_OK) == 0 }) else {
            throw Failure(description: "no libblksnap-preload.so found (looked in \(candidates.joined(separator: ", "))); "
                          + "build it with tools/build-preload or pass --preload")
        }
        return found
    }
}

enum Table {
    static func render(title: String, _ header: [String], _ rows: [[String]]) -> String {
        var widths = header.map(\.count)
        for r in rows { for (i, c) in r.enumerated() { widths[i] = max(widths[i], c.count) } }
        func line(_ cells: [String]) -> String {
            cells.enumerated().map { i, c in c + String(repeating: " ", count: widths[i] - c.count) }
                .joined(separator: "  ").trimmingTrailingSpaces()
        }
        var out = "\(title):\n"
        if rows.isEmpty { return out + "  (none)\n" }
        out += "  " + line(header) + "\n"
        for r in rows { out += "  " + line(r) + "\n" }
        return out
    }
}

extension String {
    func trimmingTrailingSpaces() -> String {
        var s = self
        while s.last == " " { s.removeLast() }
        return s
    }
}

extension ByteCount: ExpressibleByArgument {
    public init?(argument: String) { self.init(argument) }
}
