import ArgumentParser
import BlksnapABI
import BlksnapBackup
#if canImport(Glibc)
import Glibc
#endif

/// blksnap-backup: block-level full and incremental backups of devices
/// through the blksnap v1 interface, into qcow2 chains.
@main
struct BlksnapBackupCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "blksnap-backup",
        abstract: "Full and incremental backups of block devices through /dev/blksnap, as qcow2 chains.",
        discussion: """
            A client of the blksnap v1 interface only: run it where /dev/blksnap exists (the kernel module, \
            blksnapd's CUSE device), or under `blksnapctl exec -- blksnap-backup ...`. Progress goes to stderr \
            (one line per device on a terminal, JSON objects with --json); the result goes to stdout.
            """,
        subcommands: [Full.self, Incremental.self, List.self, Verify.self, Restore.self, Mount.self, Umount.self, Prune.self])
}

struct CommonOptions: ParsableArguments {
    @Flag(help: "Progress events and the result as JSON.")
    var json = false
}

struct BackupOptions: ParsableArguments {
    @Option(name: .customLong("device"), help: "A tracked block device (repeat for several: one snapshot for all).")
    var devices: [String] = []

    @Option(name: .customLong("to"), help: "The repository directory (created if missing).")
    var repository: String

    @Option(help: "Directory for the difference storage files; must be on a disk that is not being backed up.")
    var storage: String = "/var/lib/blksnap/diff-storage"

    @Option(help: "Most difference storage to allocate, in bytes or with K, M, G, T.")
    var storageLimit: ByteCount?

    @Option(help: "Copy threads per device.")
    var workers: Int = 4

    @Option(help: "Read at most this many bytes per second (K, M, G suffixes), to spare the disk.")
    var maxRate: ByteCount?
}

extension ByteCount: ExpressibleByArgument {
    public init?(argument: String) { self.init(argument) }
}

/// Prints a failure the way the tool's users read it and exits: 130 after
/// SIGINT, 1 otherwise.
func fail(_ error: Error) -> Never {
    let e = error as? BackupError
    let line = Array("blksnap-backup: error: \(e?.description ?? "\(error)")\n".utf8)
    _ = line.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    Glibc.exit(e?.errno == .interrupted ? 130 : 1)
}

func runBackup(_ options: BackupOptions, _ common: CommonOptions, incremental: Bool) {
    bkpCatchInterrupts()
    guard options.workers >= 1 && options.workers <= 64 else { fail(ValidationError("--workers must be 1 to 64")) }
    let progress = ProgressReporter(json: common.json)
    do {
        let m = try Backup.run(BackupRequest(devices: options.devices, repository: options.repository,
                                             storage: options.storage, storageLimit: options.storageLimit?.bytes,
                                             incremental: incremental, workers: options.workers,
                                             maxRate: options.maxRate?.bytes),
                               progress: progress)
        if common.json {
            print(String(decoding: try m.encoded(), as: UTF8.self), terminator: "")
        } else {
            print("backup \(m.number): \(m.kind.rawValue)\(m.parent.map { " on backup \($0)" } ?? ""), "
                  + "\(m.devices.count) device(s), \(ProgressReporter.bytes(m.bytesCopied)) copied in \(m.seconds) s"
                  + (m.fallbackReason.map { " (full because \($0))" } ?? ""))
        }
    } catch {
        fail(error)
    }
}

struct Full: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Back up every allocated block of the devices.")
    @OptionGroup var options: BackupOptions
    @OptionGroup var common: CommonOptions
    func run() { runBackup(options, common, incremental: false) }
}

struct Incremental: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Back up the blocks changed since the repository's latest backup.",
        discussion: "Falls back to a full backup, and says why, when the CBT generation or a device's size changed.")
    @OptionGroup var options: BackupOptions
    @OptionGroup var common: CommonOptions
    func run() { runBackup(options, common, incremental: true) }
}

struct RepoOptions: ParsableArguments {
    @Option(name: .customLong("from"), help: "The repository directory.")
    var repository: String

    @Option(help: "The backup number (default: the latest).")
    var backup: Int?
}

struct List: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List the backups of a repository.")
    @Option(name: .customLong("from"), help: "The repository directory.")
    var repository: String
    @OptionGroup var common: CommonOptions

    func run() {
        do {
            let repo = try Repository(path: repository)
            let listing = repo.backups()
            if common.json {
                var out = "{\"backups\":["
                out += try listing.good.map { String(decoding: try $0.encoded(), as: UTF8.self) }.joined(separator: ",")
                out += "],\"incomplete\":[\(listing.incomplete.map(String.init).joined(separator: ","))],"
                out += "\"damaged\":[\(listing.damaged.map { "{\"backup\":\($0.0),\"why\":\(JSONText.quote($0.1))}" }.joined(separator: ","))]}"
                print(out)
                return
            }
            var rows = [["BACKUP", "KIND", "PARENT", "TAKEN (UTC)", "DEVICES", "COPIED", "SECONDS", "STATUS"]]
            for m in listing.good {
                rows.append(["\(m.number)", m.kind.rawValue, m.parent.map(String.init) ?? "-", m.takenAtText,
                             m.devices.map(\.name).joined(separator: ","), ProgressReporter.bytes(m.bytesCopied),
                             "\(m.seconds)", "good"])
            }
            for n in listing.incomplete { rows.append(["\(n)", "-", "-", "-", "-", "-", "-", "incomplete"]) }
            for (n, why) in listing.damaged { rows.append(["\(n)", "-", "-", "-", "-", "-", "-", "damaged: \(why)"]) }
            var widths = rows[0].map(\.count)
            for r in rows { for (i, c) in r.enumerated() { widths[i] = max(widths[i], c.count) } }
            for r in rows {
                var line = r.enumerated().map { i, c in c + String(repeating: " ", count: widths[i] - c.count) }.joined(separator: "  ")
                while line.last == " " { line.removeLast() }
                print(line)
            }
        } catch {
            fail(error)
        }
    }
}

struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Reread a backup chain against its checksums; --against compares its contents with a device.")
    @OptionGroup var repo: RepoOptions
    @Option(help: "Only this device of the backup.")
    var device: String?
    @Option(help: "A device or image taken at the same point (qemu-img compare).")
    var against: String?
    @OptionGroup var common: CommonOptions

    func run() {
        do {
            let r = try Operations.verify(try Repository(path: repo.repository), number: repo.backup, device: device,
                                          against: against, progress: ProgressReporter(json: common.json))
            for p in r.problems { print("FAILED: \(p)") }
            if r.problems.isEmpty { print("verified: \(r.checkedFiles) file(s) match their checksums") }
            if !r.problems.isEmpty { Glibc.exit(1) }
        } catch {
            fail(error)
        }
    }
}

struct Restore: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write a backup of one device (any backup in the chain) to a block device or a new raw file.")
    @OptionGroup var repo: RepoOptions
    @Option(help: "The device of the backup (needed when it has several).")
    var device: String?
    @Option(name: .customLong("to"), help: "A block device at least as large, or a new raw file.")
    var target: String

    func run() {
        do {
            let (m, d) = try Operations.restore(try Repository(path: repo.repository), number: repo.backup, device: device, to: target)
            print("restored backup \(m.number) of \(d.name) (\(d.sizeBytes) bytes) to \(target)")
        } catch {
            fail(error)
        }
    }
}

/// blksnapctl beside this program (a build tree, an install), else on PATH.
func findBlksnapctl() -> String {
    var buffer = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    if n > 0 {
        let exe = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let beside = exe.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/") + "/blksnapctl"
        if access(beside, X_OK) == 0 { return beside }
    }
    return "blksnapctl"
}

struct Mount: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Mount a backup read-only for file-level restore.",
        discussion: """
            qemu-nbd serves the backup's qcow2 chain read-only; `blksnapctl attach` routes that NBD export as a \
            block device through blksnapd (no kernel NBD needed), which is mounted read-only. Undo with umount.
            """)
    @OptionGroup var repo: RepoOptions
    @Option(help: "The device of the backup (needed when it has several).")
    var device: String?
    @Option(help: "Extra mount options (ro is always set; ext4 wants noload).")
    var options: String?
    @Option(help: "The blksnapctl to attach with.")
    var blksnapctl: String = findBlksnapctl()
    @Argument(help: "Where to mount it.")
    var mountpoint: String

    func run() {
        do {
            let node = try Operations.mount(try Repository(path: repo.repository), number: repo.backup, device: device,
                                            at: mountpoint, blksnapctl: blksnapctl, fsOptions: options)
            print("mounted \(node) read-only at \(mountpoint)")
        } catch {
            fail(error)
        }
    }
}

struct Umount: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Undo blksnap-backup mount.")
    @Option(help: "The blksnapctl to detach with.")
    var blksnapctl: String = findBlksnapctl()
    @Argument(help: "The mount point.")
    var mountpoint: String

    func run() {
        do {
            try Operations.umount(mountpoint, blksnapctl: blksnapctl)
        } catch {
            fail(error)
        }
    }
}

struct Prune: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Keep the newest N backups, merging older incrementals into their base (qemu-img commit).")
    @Option(name: .customLong("from"), help: "The repository directory.")
    var repository: String
    @Option(help: "How many backups to keep (at least 1).")
    var keep: Int
    @OptionGroup var common: CommonOptions

    func run() {
        guard keep >= 1 else { fail(ValidationError("--keep must be at least 1")) }
        do {
            let steps = try Operations.prune(try Repository(path: repository), keep: keep, progress: ProgressReporter(json: common.json))
            print(steps.isEmpty ? "nothing to prune" : "pruned \(steps.count) backup(s)")
        } catch {
            fail(error)
        }
    }
}
