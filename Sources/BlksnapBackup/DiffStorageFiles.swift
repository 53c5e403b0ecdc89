#if canImport(Glibc)
import Glibc
#endif
import BlksnapABI
import CBlksnapBackup
import SystemPackage

/// The difference storage of one snapshot as files in a directory, the way
/// libblksnap's stretch_snapshot keeps it: each portion a new file,
/// preallocated with fallocate (never written zeroes), handed over as the
/// physical sector ranges FIEMAP reports on the block device under the
/// file system. The engine (module or blksnapd) then writes those sectors
/// directly, so the directory must be on a file system on a block device
/// that is not in the snapshot.
public final class DiffStorageFiles: @unchecked Sendable {
    public let directory: String
    public let limitBytes: UInt64?
    private let monitor = Monitor()
    private var files: [String] = []
    private var allocated: UInt64 = 0

    public init(root: String, snapshot: UUID16, limitBytes: UInt64?) throws(BackupError) {
        directory = root + "/" + snapshot.description
        self.limitBytes = limitBytes
        try FileSystem.makeDirectories(directory)
    }

    public var allocatedBytes: UInt64 { monitor.locked { allocated } }

    /// A new preallocated file of `sectors` sectors (within the limit) and
    /// its ranges. Fails with ENOSPC when the limit or the disk is reached.
    public func allocate(sectors requested: UInt64) throws(BackupError) -> (DevId, [SectorRange]) {
        // The request comes from the snapshot event: bounded before use.
        guard requested > 0, requested <= (UInt64(1) << 40) else {
            throw BackupError(.outOfRange, "the low-space event asked for \(requested) sectors")
        }
        var bytes = requested * 512
        let (index, used) = monitor.locked { (files.count, allocated) }
        if let limit = limitBytes {
            guard used < limit else {
                throw BackupError(.noSpace, "difference storage reached --storage-limit (\(limit) bytes)")
            }
            bytes = min(bytes, (limit - used) / 4096 * 4096)
            guard bytes > 0 else { throw BackupError(.noSpace, "difference storage reached --storage-limit (\(limit) bytes)") }
        }
        let path = directory + "/diff_storage#\(index)"
        let fd = open(path, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw BackupError(lastErrno(), "cannot create \(path)") }
        defer { close(fd) }
        monitor.locked { files.append(path) }
        guard bkp_fallocate(fd, off_t(bytes)) == 0 else {
            throw BackupError(lastErrno(), "cannot preallocate \(bytes) bytes for \(path)")
        }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw BackupError(lastErrno(), "cannot stat \(path)") }
        let device = DevId(major: bkp_major(st.st_dev), minor: bkp_minor(st.st_dev))
        guard FileSystem.exists("/sys/dev/block/\(device.major):\(device.minor)") else {
            throw BackupError(.operationNotSupportedByDevice, "\(directory) is on a file system with no block device under it (device \(device)); "
                              + "put --storage on a file system on a disk")
        }
        let ranges = try Self.extents(fd: fd, path: path, size: bytes)
        monitor.locked { allocated += bytes }
        return (device, ranges)
    }

    /// The file's physical extents as sector ranges.
    static func extents(fd: Int32, path: String, size: UInt64) throws(BackupError) -> [SectorRange] {
        var ranges: [SectorRange] = []
        var start: UInt64 = 0
        var buffer = [bkp_extent](repeating: bkp_extent(), count: 256)
        while start < size {
            var mapped: UInt32 = 0
            guard bkp_fiemap(fd, start, &buffer, UInt32(buffer.count), &mapped) == 0 else {
                let e = lastErrno()
                throw BackupError(e, "FIEMAP of \(path) failed\(e == .notSupported ? ": its file system cannot say where the file lies; put --storage on ext4 or xfs" : "")")
            }
            guard mapped > 0 else { break }
            let unusable = bkp_fiemap_extent_unknown | bkp_fiemap_extent_encoded | bkp_fiemap_extent_delalloc | bkp_fiemap_extent_not_aligned
            for e in buffer.prefix(Int(mapped)) {
                guard e.flags & unusable == 0, e.physical % 512 == 0, e.length % 512 == 0 else {
                    throw BackupError(.invalidArgument, "\(path) has an extent that cannot be given as sectors (flags \(e.flags))")
                }
                if let last = ranges.last, last.offset + last.count == e.physical / 512 {
                    ranges[ranges.count - 1].count += e.length / 512
                } else {
                    ranges.append(SectorRange(offset: e.physical / 512, count: e.length / 512))
                }
                start = e.logical + e.length
                if e.flags & bkp_fiemap_extent_last != 0 { return ranges }
            }
        }
        return ranges
    }

    /// Removes the files (after the snapshot is destroyed).
    public func removeAll() {
        try? FileSystem.removeTree(directory)
    }
}

/// The thread that keeps a snapshot's storage growing, as stretch_snapshot
/// does: it waits for events on its own descriptor of /dev/blksnap, answers
/// low free space with a new file, and records corruption so the copy
/// stops with a clear message.
public final class StorageStretcher: @unchecked Sendable {
    private let client: BlksnapClient
    private let id: UUID16
    private let storage: DiffStorageFiles
    private let monitor = Monitor()
    private var stopping = false
    private var failure: BackupError?
    private var thread: Thread?
    private let log: @Sendable (String) -> Void

    public init(id: UUID16, storage: DiffStorageFiles, log: @escaping @Sendable (String) -> Void) throws(BackupError) {
        client = try BlksnapClient()
        self.id = id
        self.storage = storage
        self.log = log
    }

    /// What went wrong with the storage so far, if anything.
    public var error: BackupError? { monitor.locked { failure } }

    public func start() {
        thread = Thread { [self] in
            while !monitor.locked({ stopping }) {
                do {
                    guard let event = try client.waitEvent(id, timeoutMs: 100) else { continue }
                    try handle(event)
                } catch {
                    let e = error as? BackupError ?? BackupError(.ioError, "\(error)")
                    // A portion that could not be added is not fatal by
                    // itself: the snapshot may never need it. Corruption is.
                    if e.errno == .noSpace && e.message.hasPrefix("the snapshot is corrupted") || e.errno == .noSuchProcess {
                        monitor.locked { if failure == nil { failure = e } }
                        if e.errno == .noSuchProcess { return }
                    } else {
                        log("cannot grow the difference storage: \(e)")
                        monitor.locked { growFailure = e }
                    }
                }
            }
        }
    }

    private var growFailure: BackupError?

    public func stop() {
        monitor.locked { stopping = true }
        thread?.join()
        thread = nil
    }

    /// One event, also used for the first one right after CREATE.
    public func handle(_ event: BlksnapClient.Event) throws(BackupError) {
        switch event {
        case .lowFreeSpace(let sectors):
            let (device, ranges) = try storage.allocate(sectors: sectors)
            do {
                try client.appendStorage(id, device: device, ranges: ranges)
            } catch where error.errno == .notPermitted {
                // Kernels built without BLK_DEV_WRITE_MOUNTED refuse a
                // user-space engine (blksnapd) writes to a mounted disk.
                throw BackupError(.notPermitted, "the engine may not write to \(device), the disk under \(storage.directory): "
                                  + "this kernel refuses writes to a mounted disk; with blksnapd, put --storage on a file system "
                                  + "on a routed device (blksnapctl attach FILE --size SIZE, mkfs, mount)")
            }
            log("difference storage: +\(ranges.reduce(0) { $0 + $1.count } >> 11) MiB on \(device) (\(storage.allocatedBytes >> 20) MiB in all)")
        case .corrupted(let device, let code):
            let grow = monitor.locked { growFailure }.map { " (the storage could not grow: \($0.message))" } ?? ""
            throw BackupError.corrupted("the snapshot is corrupted: device \(device) lost copy-on-write data "
                                        + "(\(Errno(rawValue: code)))\(grow); the difference storage overflowed, "
                                        + "give a larger --storage-limit or more room under --storage")
        case .unknown(let code):
            throw BackupError(.invalidArgument, "unknown snapshot event code \(code)")
        }
    }

    /// The first event after CREATE, handled before TAKE.
    public func first() throws(BackupError) -> Bool {
        guard let event = try client.waitEvent(id, timeoutMs: 1000) else { return false }
        try handle(event)
        return true
    }
}
