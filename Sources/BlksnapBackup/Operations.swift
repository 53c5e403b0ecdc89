#if canImport(Glibc)
import Glibc
#endif
import SystemPackage

/// What the repository commands do besides backing up: verify, restore,
/// mount and prune, each through qemu's own tools.
public enum Operations {
    /// The good backup numbered `number`, or the latest.
    public static func pick(_ repo: Repository, _ number: Int?) throws(BackupError) -> (Manifest, [Manifest]) {
        let good = repo.goodBackups()
        guard let chosen = number ?? good.last?.number else { throw BackupError(.noSuchFileOrDirectory, "\(repo.path) has no good backup") }
        let chain = try Chain.resolve(good, number: chosen)
        return (chain.last!, chain)
    }

    /// The device of a backup that `name` designates (the only one when nil).
    public static func device(_ backup: Manifest, _ name: String?) throws(BackupError) -> Manifest.Device {
        if let name {
            guard let d = backup.device(named: name) else {
                throw BackupError(.operationNotSupportedByDevice, "backup \(backup.number) has no device \(name) (it has \(backup.devices.map(\.name).joined(separator: ", ")))")
            }
            return d
        }
        guard backup.devices.count == 1 else {
            throw BackupError(.invalidArgument, "backup \(backup.number) has several devices; name one with --device")
        }
        return backup.devices[0]
    }

    public struct VerifyResult: Sendable {
        public var problems: [String]
        public var checkedFiles: Int
    }

    /// Rereads every file of the chain against its recorded sha256 and has
    /// qemu-img check its qcow2 structure; with `against`, compares the
    /// chain's contents with a device or image (qemu-img compare).
    public static func verify(_ repo: Repository, number: Int?, device name: String?, against: String?,
                              progress: ProgressReporter) throws(BackupError) -> VerifyResult {
        let (top, chain) = try pick(repo, number)
        var problems: [String] = []
        var checked = 0
        let devices = name == nil ? top.devices : [try device(top, name)]
        for backup in chain {
            for d in devices {
                guard let record = backup.device(named: d.name) else {
                    problems.append("backup \(backup.number) has no \(d.name)")
                    continue
                }
                let path = repo.file(backup.number, record)
                guard FileSystem.exists(path) else { problems.append("\(path) is missing"); continue }
                checked += 1
                let sum = try Subprocess.sha256(path)
                if sum != record.sha256 {
                    problems.append("\(path): sha256 \(sum), the manifest says \(record.sha256)")
                }
                let check = try Subprocess.run(["qemu-img", "check", "-q", "-f", "qcow2", path])
                if check.status != 0 {
                    problems.append("\(path): qemu-img check failed: \(check.errorOutput.split(separator: "\n").prefix(3).joined(separator: "; "))")
                }
                progress.note("backup \(backup.number) \(d.name): \(sum == record.sha256 ? "checksum ok" : "CHECKSUM MISMATCH")")
            }
        }
        if let against {
            let d = try device(top, name)
            let path = repo.file(top.number, d)
            let r = try Subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", path, against])
            if r.status != 0 {
                problems.append("backup \(top.number) \(d.name) differs from \(against): "
                                + (r.output + r.errorOutput).split(separator: "\n").prefix(2).joined(separator: "; "))
            } else {
                progress.note("backup \(top.number) \(d.name) equals \(against)")
            }
        }
        return VerifyResult(problems: problems, checkedFiles: checked)
    }

    /// Writes the contents of a backup of one device to a block device
    /// (at least as large) or a new raw file.
    public static func restore(_ repo: Repository, number: Int?, device name: String?, to target: String) throws(BackupError) -> (Manifest, Manifest.Device) {
        let (top, _) = try pick(repo, number)
        let d = try device(top, name)
        let path = repo.file(top.number, d)
        var argv = ["qemu-img", "convert", "-f", "qcow2", "-O", "raw"]
        if FileSystem.isBlockDevice(target) {
            let fd = open(target, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { throw BackupError(lastErrno(), "cannot open \(target)") }
            let size = lseek(fd, 0, SEEK_END)
            close(fd)
            guard size >= 0, UInt64(size) >= d.sizeBytes else {
                throw BackupError(.noSpace, "\(target) holds \(size) bytes; backup \(top.number) of \(d.name) needs \(d.sizeBytes)")
            }
            // -n: write into the existing device; every block is written,
            // zeroes included (no --target-is-zero: the device is not blank).
            argv += ["-n"]
        } else if FileSystem.exists(target) {
            throw BackupError(.fileExists, "\(target) exists and is not a block device; restore into a new file")
        }
        try Subprocess.check(argv + [path, target])
        return (top, d)
    }

    /// Where a mount's state is kept, so umount finds the qemu-nbd and the
    /// routed device.
    public static let mountState = "/run/blksnap-backup/mounts"

    struct MountRecord: Codable {
        var mountpoint: String
        var qemuNbdPid: Int32
        var socket: String
        var device: String
        var backup: Int
        var name: String
    }

    static func stateFile(_ mountpoint: String) -> String {
        mountState + "/" + String(mountpoint.map { $0 == "/" ? "_" : $0 }) + ".json"
    }

    /// Exposes a backup read-only: qemu-nbd serves the chain read-only on a
    /// Unix socket, `blksnapctl attach` routes that NBD export as a block
    /// device (the FUSE-and-loop path, so no kernel NBD is needed), and the
    /// file system is mounted read-only without journal replay.
    public static func mount(_ repo: Repository, number: Int?, device name: String?, at mountpoint: String,
                             blksnapctl: String, fsOptions: String?) throws(BackupError) -> String {
        let (top, _) = try pick(repo, number)
        let d = try device(top, name)
        let path = repo.file(top.number, d)
        guard FileSystem.isDirectory(mountpoint) else { throw BackupError(.notDirectory, "\(mountpoint) is not a directory") }
        guard !FileSystem.exists(stateFile(mountpoint)) else {
            throw BackupError(.fileExists, "\(mountpoint) already has a backup mounted; blksnap-backup umount it first")
        }
        try FileSystem.makeDirectories(mountState)
        let socket = mountState + "/nbd-\(getpid())-\(top.number).sock"
        let pidFile = socket + ".pid"
        unlink(socket)
        try Subprocess.check(["qemu-nbd", "--read-only", "--persistent", "--shared=4", "--fork", "--format=qcow2",
                              "--socket=\(socket)", "--pid-file=\(pidFile)", path])
        let pidText = (try? FileSystem.readAll(pidFile, limit: 64)).map { String(decoding: $0, as: UTF8.self) } ?? ""
        let pid = Int32(pidText.split(whereSeparator: { $0 == "\n" || $0 == " " }).first ?? "") ?? 0
        unlink(pidFile)
        func stopServer() { if pid > 0 { kill(pid, SIGTERM) }; unlink(socket) }
        let attached: String
        do {
            attached = try Subprocess.check([blksnapctl, "attach", "nbd+unix:///?socket=\(socket)"])
        } catch {
            stopServer()
            throw error
        }
        guard let node = attached.split(separator: " ").first.map(String.init), node.hasPrefix("/dev/") else {
            stopServer()
            throw BackupError(.ioError, "blksnapctl attach printed \(attached)")
        }
        do {
            let options = ["ro"] + (fsOptions.map { [$0] } ?? [])
            try Subprocess.check(["mount", "-o", options.joined(separator: ","), node, mountpoint])
        } catch {
            _ = try? Subprocess.run([blksnapctl, "detach", node])
            stopServer()
            throw error
        }
        let record = MountRecord(mountpoint: mountpoint, qemuNbdPid: pid, socket: socket, device: node,
                                 backup: top.number, name: d.name)
        do {
            try FileSystem.writeAtomically(stateFile(mountpoint), Array(try JSONCoding.encode(record)))
        } catch {
            throw BackupError(.ioError, "cannot record the mount: \(error)")
        }
        return node
    }

    public static func umount(_ mountpoint: String, blksnapctl: String) throws(BackupError) {
        let file = stateFile(mountpoint)
        guard FileSystem.exists(file) else { throw BackupError(.noSuchFileOrDirectory, "no backup is mounted at \(mountpoint)") }
        let record: MountRecord
        do { record = try JSONCoding.decode(MountRecord.self, try FileSystem.readAll(file)) } catch {
            throw BackupError(.invalidArgument, "cannot read \(file): \(error)")
        }
        let r = try Subprocess.run(["umount", mountpoint])
        if r.status != 0 && r.errorOutput.contains("not mounted") == false {
            throw BackupError(.resourceBusy, "umount \(mountpoint) failed: \(r.errorOutput)")
        }
        try Subprocess.check([blksnapctl, "detach", record.device])
        if record.qemuNbdPid > 0 { kill(record.qemuNbdPid, SIGTERM) }
        unlink(record.socket)
        unlink(file)
    }

    /// Keeps the newest `keep` backups; merged ones become full backups
    /// holding the same contents, so every kept backup stays restorable.
    public static func prune(_ repo: Repository, keep: Int, progress: ProgressReporter) throws(BackupError) -> [Chain.PruneStep] {
        let lock = try RepositoryLock(repo)
        defer { lock.release() }
        let steps = Chain.prunePlan(repo.goodBackups(), keep: keep)
        for step in steps {
            switch step {
            case .drop(let n):
                try repo.remove(n)
                progress.note("removed backup \(n)")
            case .merge(let from, let into):
                try merge(repo, from: from, into: into)
                progress.note("merged backup \(from) into backup \(into), which is now a full backup")
            }
        }
        return steps
    }

    /// qemu-img commit of the child into the parent's file (the parent is
    /// full: prune goes oldest first), which then replaces the child's file.
    /// The parent's manifest goes first, so a crash part-way never leaves
    /// the parent listed with contents that are no longer its own.
    static func merge(_ repo: Repository, from: Int, into: Int) throws(BackupError) {
        let good = repo.goodBackups()
        guard let parent = good.first(where: { $0.number == from }), parent.parent == nil,
              var child = good.first(where: { $0.number == into }), child.parent == from else {
            throw BackupError(.invalidArgument, "backup \(into) is not an incremental on the full backup \(from)")
        }
        let parentManifest = repo.directory(from) + "/" + Repository.manifestName
        guard unlink(parentManifest) == 0 else { throw BackupError(lastErrno(), "cannot remove \(parentManifest)") }
        FileSystem.syncDirectory(repo.directory(from))
        for (i, d) in child.devices.enumerated() {
            guard let p = parent.device(named: d.name) else {
                throw BackupError(.invalidArgument, "backup \(from) has no \(d.name)")
            }
            let childPath = repo.file(into, d), parentPath = repo.file(from, p)
            try Subprocess.check(["qemu-img", "commit", "-q", "-d", "-f", "qcow2", childPath])
            guard rename(parentPath, childPath) == 0 else {
                throw BackupError(lastErrno(), "cannot move \(parentPath) to \(childPath)")
            }
            child.devices[i].sha256 = try Subprocess.sha256(childPath)
            child.devices[i].bytesCopied += p.bytesCopied
        }
        FileSystem.syncDirectory(repo.directory(into))
        child.kind = .full
        child.parent = nil
        child.merged = (parent.merged + [from] + child.merged).sorted()
        try repo.commit(child)
        try repo.remove(from)
    }
}

import FoundationEssentials

enum JSONCoding {
    static func encode<T: Encodable>(_ value: T) throws -> [UInt8] {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        return Array(try e.encode(value))
    }
    static func decode<T: Decodable>(_ type: T.Type, _ bytes: [UInt8]) throws -> T {
        try JSONDecoder().decode(type, from: Data(bytes))
    }
}
