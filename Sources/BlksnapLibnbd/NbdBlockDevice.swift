import BlksnapEngine
import CLibnbd
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// A disk exported by another NBD server (qemu-storage-daemon, nbdkit,
/// qemu-nbd), reached with libnbd, so that it too can be routed through
/// the engine: `blksnapctl attach nbd+unix:///export?socket=/path`.
///
/// Requests are split at the server's maximum block size (32 MiB when it
/// says nothing). Several connections serve in parallel when the server
/// allows multi-conn; otherwise one, whose requests libnbd serializes.
public final class NbdBlockDevice: BlockDevice, Describable, @unchecked Sendable {
    public let uri: String
    public let size: UInt64
    public let readOnly: Bool
    private let handles: [OpaquePointer]
    private let maximum: Int
    private let canTrim: Bool
    private let lock = Lock()
    private var next = 0

    public init(uri: String, connections wanted: Int = 4) throws(BlksnapError) {
        self.uri = uri
        let first = try Self.connect(uri)
        let size = nbd_get_size(first)
        guard size >= 0 else {
            let e = Self.lastError(uri, "cannot read the size of")
            nbd_close(first)
            throw e
        }
        self.size = UInt64(size)
        readOnly = nbd_is_read_only(first) == 1
        canTrim = nbd_can_trim(first) == 1
        let largest = nbd_get_block_size(first, Int32(LIBNBD_SIZE_MAXIMUM))
        maximum = largest > 0 ? Int(Swift.min(largest, 32 << 20)) : 32 << 20
        var all = [first]
        if nbd_can_multi_conn(first) == 1 {
            for _ in 1..<Swift.max(wanted, 1) {
                guard let h = try? Self.connect(uri) else { break }
                all.append(h)
            }
        }
        handles = all
    }

    deinit {
        for h in handles {
            nbd_shutdown(h, 0)
            nbd_close(h)
        }
    }

    public var displayName: String { uri }

    private static func lastError(_ uri: String, _ what: String) -> BlksnapError {
        let code = nbd_get_errno()
        let message = nbd_get_error().map { String(cString: $0) } ?? "unknown error"
        return BlksnapError(Errno(rawValue: code != 0 ? code : EIO), "\(what) \(uri): \(message)")
    }

    private static func connect(_ uri: String) throws(BlksnapError) -> OpaquePointer {
        guard let h = nbd_create() else { throw lastError(uri, "cannot create a libnbd handle for") }
        guard nbd_connect_uri(h, uri) == 0 else {
            let e = lastError(uri, "cannot connect to")
            nbd_close(h)
            throw e
        }
        return h
    }

    private func handle() -> OpaquePointer {
        guard handles.count > 1 else { return handles[0] }
        return lock.withLock {
            next = (next + 1) % handles.count
            return handles[next]
        }
    }

    private func pieces(_ count: Int, _ body: (Int, Int) throws(BlksnapError) -> Void) throws(BlksnapError) {
        var done = 0
        while done < count {
            let n = min(maximum, count - done)
            try body(done, n)
            done += n
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        let h = handle()
        try pieces(buffer.count) { (done, n) throws(BlksnapError) in
            guard nbd_pread(h, buffer.baseAddress! + done, n, offset + UInt64(done), 0) == 0 else {
                throw Self.lastError(uri, "read at \(offset + UInt64(done)) failed on")
            }
        }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        guard !readOnly else { throw BlksnapError(.readOnlyFileSystem, "\(uri) is read-only") }
        let h = handle()
        try pieces(buffer.count) { (done, n) throws(BlksnapError) in
            guard nbd_pwrite(h, buffer.baseAddress! + done, n, offset + UInt64(done), 0) == 0 else {
                throw Self.lastError(uri, "write at \(offset + UInt64(done)) failed on")
            }
        }
    }

    public func flush() throws(BlksnapError) {
        guard !readOnly else { return }
        for h in handles where nbd_can_flush(h) == 1 {
            guard nbd_flush(h, 0) == 0 else { throw Self.lastError(uri, "flush failed on") }
        }
    }

    public func discard(at offset: UInt64, length: UInt64) throws(BlksnapError) {
        guard canTrim else {
            // A discard must read back as zeros on a routed device.
            try writeZeroes(at: offset, length: length)
            return
        }
        guard nbd_zero(handle(), length, offset, 0) == 0 else {
            throw Self.lastError(uri, "zeroing at \(offset) failed on")
        }
    }
}
