#if canImport(Glibc)
import Glibc
#endif
import BlksnapABI
import CBlksnapBackup
import SystemPackage

/// One backup run: one snapshot of every listed device (consistent
/// together; TAKE freezes their file systems), one qcow2 per device, then
/// the manifest. Whatever happens, the snapshot is destroyed and its
/// storage files removed before this returns; a failed run removes its
/// backup directory, and nothing without a manifest is ever listed as good.
public struct BackupRequest: Sendable {
    public var devices: [String]
    public var repository: String
    public var storage: String
    public var storageLimit: UInt64?
    public var incremental: Bool
    public var workers: Int
    public var maxRate: UInt64?
    public init(devices: [String], repository: String, storage: String, storageLimit: UInt64?, incremental: Bool,
                workers: Int = 4, maxRate: UInt64? = nil) {
        self.maxRate = maxRate
        self.devices = devices
        self.repository = repository
        self.storage = storage
        self.storageLimit = storageLimit
        self.incremental = incremental
        self.workers = workers
    }
}

public enum Backup {
    /// Portion appended before TAKE when no low-space event asks for one.
    static let defaultFirstPortionSectors: UInt64 = 262144

    public static func run(_ request: BackupRequest, progress: ProgressReporter) throws(BackupError) -> Manifest {
        let names = request.devices
        guard !names.isEmpty else { throw BackupError(.invalidArgument, "name at least one --device") }
        guard Set(names).count == names.count else { throw BackupError(.invalidArgument, "a device is named twice") }
        let fileNames = names.map(Repository.fileName(forDevice:))
        guard Set(fileNames).count == fileNames.count else {
            throw BackupError(.invalidArgument, "two devices would share a file name: \(fileNames)")
        }
        var devIds: [DevId] = []
        for n in names { devIds.append(try DevId.of(blockDevice: n)) }

        let repo = try Repository(path: request.repository, create: true)
        let lock = try RepositoryLock(repo)
        defer { lock.release() }
        let listing = repo.backups()
        for n in listing.incomplete {
            progress.note("removing the unfinished backup \(n) (it has no manifest)")
            try repo.remove(n)
        }
        let previous = listing.good.last
        let number = (repo.numberedDirectories().last ?? 0) + 1

        let client = try BlksnapClient()
        let start = monotonicSeconds()
        let id = try client.createSnapshot(devIds)
        progress.note("snapshot \(id) of \(names.joined(separator: ", "))")
        var storage: DiffStorageFiles?
        var stretcher: StorageStretcher?
        var backupDir: String?
        var committed = false
        var destroyed = false
        func release() {
            stretcher?.stop()
            if !destroyed {
                do { try client.destroy(id) } catch { progress.note("could not destroy snapshot \(id): \(error)") }
                destroyed = true
            }
            storage?.removeAll()
        }
        defer {
            release()
            if !committed, let dir = backupDir { try? FileSystem.removeTree(dir) }
        }

        let files = try DiffStorageFiles(root: request.storage, snapshot: id, limitBytes: request.storageLimit)
        storage = files
        let s = try StorageStretcher(id: id, storage: files) { message in progress.note(message) }
        stretcher = s
        if try !s.first() {
            // The interface queues one at CREATE; a module that does not
            // still needs storage before TAKE.
            try s.handle(.lowFreeSpace(requestedSectors: defaultFirstPortionSectors))
        }
        s.start()
        try checkInterrupt()
        try client.take(id)
        let takenAt = Int64(time(nil))

        let images = try client.images(id)
        let trackers = try client.trackers()
        var plans: [(name: String, file: String, info: CbtInfo, image: String)] = []
        for (i, name) in names.enumerated() {
            guard let info = trackers.first(where: { $0.devId == devIds[i] }) else {
                throw BackupError(.noData, "\(name) (\(devIds[i])) has no tracker after TAKE")
            }
            guard info.blockSize >= 512, info.blockSize.nonzeroBitCount == 1,
                  info.blockCount <= (1 << 26),
                  UInt64(info.blockCount) * UInt64(info.blockSize) >= info.deviceCapacity,
                  info.deviceCapacity % 512 == 0, info.deviceCapacity < (UInt64(1) << 62) else {
                throw BackupError(.outOfRange, "the tracker of \(name) reports an impossible geometry "
                                  + "(\(info.blockCount) blocks of \(info.blockSize) bytes for \(info.deviceCapacity) bytes)")
            }
            guard let image = images.first(where: { $0.origDevId == devIds[i] }) else {
                throw BackupError(.noData, "the snapshot has no image of \(name)")
            }
            plans.append((name, fileNames[i], info, "/dev/block/\(image.imageDevId.major):\(image.imageDevId.minor)"))
        }

        let decision = Chain.decide(previous: previous,
                                    devices: plans.map { .init(name: $0.name, sizeBytes: $0.info.deviceCapacity,
                                                               generationId: $0.info.generationId.description) },
                                    wantIncremental: request.incremental)
        let parent: Int?
        var fallback: String?
        switch decision {
        case .incremental(let p, _): parent = p
        case .full(let reason):
            parent = nil
            if let reason, request.incremental {
                fallback = reason
                progress.note("falling back to a full backup: \(reason)")
            }
        }

        let dir = repo.directory(number)
        backupDir = dir
        try FileSystem.makeDirectories(dir)
        var records: [Manifest.Device] = []
        for plan in plans {
            try checkInterrupt()
            let extents: [ByteExtent]
            var backing: String? = nil
            if case .incremental(let p, let since) = decision, let snap = since[plan.name] {
                let map = try client.readCbtMap(plan.info)
                extents = ChangedExtents.since(snap, map: map, blockSize: UInt64(plan.info.blockSize),
                                               capacity: plan.info.deviceCapacity)
                backing = "../" + (repo.directory(p).split(separator: "/").last.map(String.init) ?? "") + "/" + plan.file
            } else {
                extents = plan.info.deviceCapacity > 0 ? [ByteExtent(offset: 0, length: plan.info.deviceCapacity)] : []
            }
            let total = ChangedExtents.total(extents)
            let path = dir + "/" + plan.file
            let target = try QcowTarget(creating: path, size: plan.info.deviceCapacity, backing: backing)
            let source = try Copier.openImage(plan.image)
            defer { close(source) }
            progress.deviceStarted(plan.name, total: total, kind: parent == nil ? "full" : "incremental")
            let copier = Copier(source: source, target: target, extents: extents, full: parent == nil,
                                workers: request.workers, maxRate: request.maxRate)
            let counts: Copier.Counts
            do {
                counts = try copier.run(tick: { c in
                    progress.deviceProgress(plan.name, done: c.scanned, total: total, written: c.written)
                }, stop: { () -> BackupError? in
                    if let e = s.error { return e }
                    return bkp_interrupted() != 0 ? .interrupted : nil
                })
                try target.finish()
            } catch {
                target.abandon()
                // A read that failed because the snapshot overflowed says
                // only EIO; the event says why.
                if let e = s.error { throw e }
                throw error
            }
            progress.deviceFinished(plan.name, scanned: counts.scanned, written: counts.written)
            records.append(Manifest.Device(name: plan.name, file: plan.file, devId: plan.info.devId.description,
                                           sizeBytes: plan.info.deviceCapacity,
                                           generationId: plan.info.generationId.description,
                                           snapNumber: plan.info.snapNumber, blockSize: plan.info.blockSize,
                                           bytesCopied: counts.written, bytesScanned: counts.scanned, sha256: ""))
        }
        s.stop()
        // Reads that succeeded were of intact chunks, but a snapshot that
        // overflowed at all is not a backup to keep.
        if let e = s.error { throw e }
        // The copy is done: the snapshot goes before the checksums are
        // read, so copy-on-write burdens the devices no longer than needed.
        release()
        for i in records.indices {
            try checkInterrupt()
            records[i].sha256 = try Subprocess.sha256(dir + "/" + records[i].file)
        }
        try checkInterrupt()
        let manifest = Manifest(number: number, kind: parent == nil ? .full : .incremental, parent: parent,
                                takenAt: takenAt, seconds: ((monotonicSeconds() - start) * 1000).rounded() / 1000,
                                snapshotId: id.description, fallbackReason: fallback, devices: records)
        try repo.commit(manifest)
        committed = true
        return manifest
    }

    static func checkInterrupt() throws(BackupError) {
        if bkp_interrupted() != 0 { throw .interrupted }
    }
}

/// One writer per repository at a time (flock on REPO/.lock).
struct RepositoryLock {
    let fd: Int32

    init(_ repo: Repository) throws(BackupError) {
        fd = open(repo.path + "/.lock", O_CREAT | O_RDWR | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw BackupError(lastErrno(), "cannot open \(repo.path)/.lock") }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let e = lastErrno()
            close(fd)
            throw BackupError(e, "another blksnap-backup is working on \(repo.path)")
        }
    }

    func release() { close(fd) }
}
