#if canImport(Glibc)
import Glibc
#endif
import CLibnbd
import SystemPackage

/// A new qcow2 file being written: created by qemu-img (with its backing
/// file for an incremental), then served by a qemu-nbd that libnbd starts
/// with systemd socket activation, so every write, zero and flush goes
/// through qemu's own qcow2 driver. When the handle closes, qemu-nbd exits.
public final class QcowTarget: @unchecked Sendable {
    public let path: String
    private var handle: OpaquePointer?

    /// Creates `path` (`size` bytes, backed by `backing`, a path relative
    /// to `path`'s directory, when given) and connects to it.
    public init(creating path: String, size: UInt64, backing: String?) throws(BackupError) {
        self.path = path
        var argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"]
        if let backing { argv += ["-b", backing, "-F", "qcow2"] }
        argv += [path, String(size)]
        try Subprocess.check(argv)
        try connect()
    }

    private func connect() throws(BackupError) {
        guard let h = nbd_create() else { throw Self.error("nbd_create") }
        handle = h
        // writeback: qemu-nbd may cache; the flush at the end makes it durable.
        let argv = ["qemu-nbd", "--format=qcow2", "--cache=writeback", "--discard=unmap", path]
        var cargs = argv.map { strdup($0) } + [nil]
        defer { for p in cargs { free(p) } }
        guard nbd_connect_systemd_socket_activation(h, &cargs) == 0 else {
            throw Self.error("cannot start qemu-nbd on \(path)")
        }
    }

    static func error(_ what: String) -> BackupError {
        let message = nbd_get_error().map { String(cString: $0) } ?? "unknown libnbd error"
        let code = nbd_get_errno()
        return BackupError(Errno(rawValue: code == 0 ? EIO : code), "\(what): \(message)")
    }

    /// Safe from several threads: libnbd serialises calls on one handle.
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BackupError) {
        guard nbd_pwrite(handle, buffer.baseAddress, buffer.count, offset, 0) == 0 else {
            throw Self.error("writing \(buffer.count) bytes at \(offset) of \(path)")
        }
    }

    /// Zeroes a range so it reads as zero even over a backing file.
    public func zero(_ length: UInt64, at offset: UInt64) throws(BackupError) {
        guard nbd_zero(handle, length, offset, 0) == 0 else {
            throw Self.error("zeroing \(length) bytes at \(offset) of \(path)")
        }
    }

    /// Flushes and disconnects; qemu-nbd closes the image and exits.
    public func finish() throws(BackupError) {
        guard let h = handle else { return }
        guard nbd_flush(h, 0) == 0 else { throw Self.error("flushing \(path)") }
        guard nbd_shutdown(h, 0) == 0 else { throw Self.error("disconnecting from qemu-nbd for \(path)") }
        nbd_close(h)
        handle = nil
    }

    /// Drops the connection without flushing (the file is deleted after).
    public func abandon() {
        if let h = handle { nbd_close(h) }
        handle = nil
    }

    deinit { abandon() }
}
