#if canImport(Glibc)
import Glibc
#endif
import CBlksnapLinux
import SystemPackage

/// A regular file or a block device node, by pread/pwrite on one descriptor.
///
/// With `direct`, the descriptor is O_DIRECT and callers pass buffers,
/// offsets and lengths aligned to `alignment` (the device's logical block
/// size), so data reaches the disk without a second page cache.
public final class FileBlockDevice: BlockDevice, @unchecked Sendable {
    public let path: String
    public let size: UInt64
    public let alignment: Int
    public let descriptor: FileDescriptor
    private let isBlockDevice: Bool
    /// A second, O_DIRECT descriptor for writes that are 4 KiB aligned, or
    /// -1. Difference storage uses it: chunks are written once and rarely
    /// read, so filling fresh page-cache pages with them only costs time.
    /// The kernel keeps the two descriptors coherent (a direct write
    /// invalidates the cached pages it covers).
    private let directFd: Int32

    private static let BLKGETSIZE64: UInt = 0x8008_1272
    private static let BLKSSZGET: UInt = 0x1268
    private static let BLKDISCARD: UInt = 0x1277

    /// Opens `path` read-write. `exclusive` adds O_EXCL, which on a block
    /// device refuses one that is mounted or held elsewhere. `syncWrites`
    /// adds O_DSYNC: a write returns once it is on the device, so a failing
    /// device fails the write itself. Difference storage needs it: nothing
    /// ever flushes it, so an error found at writeback would be lost, and
    /// an image would read copies the device never took.
    public init(path: String, direct: Bool = false, exclusive: Bool = false, readOnly: Bool = false,
                directWritesWhenAligned: Bool = false, syncWrites: Bool = false) throws(BlksnapError) {
        var flags: Int32 = (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC
        if direct { flags |= blksnap_o_direct }
        if exclusive { flags |= O_EXCL }
        if syncWrites && !readOnly { flags |= O_DSYNC }
        let fd = open(path, flags)
        guard fd >= 0 else {
            throw BlksnapError(Errno(rawValue: errno), "cannot open \(path)")
        }
        var st = stat()
        fstat(fd, &st)
        self.path = path
        self.descriptor = FileDescriptor(rawValue: fd)
        directFd = directWritesWhenAligned && !direct && !readOnly ? open(path, O_WRONLY | O_CLOEXEC | blksnap_o_direct) : -1
        isBlockDevice = (st.st_mode & S_IFMT) == S_IFBLK
        if isBlockDevice {
            var bytes: UInt64 = 0
            var sectorSize: Int32 = 512
            _ = ioctl(fd, Self.BLKGETSIZE64, &bytes)
            _ = ioctl(fd, Self.BLKSSZGET, &sectorSize)
            size = bytes
            alignment = direct ? Int(sectorSize) : 1
        } else {
            size = UInt64(st.st_size)
            alignment = direct ? 4096 : 1
        }
    }

    deinit {
        try? descriptor.close()
        if directFd >= 0 { close(directFd) }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        var done = 0
        while done < buffer.count {
            let n = pread(descriptor.rawValue, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw BlksnapError(Errno(rawValue: errno), "read of \(path) at \(offset) failed")
            }
            if n == 0 {
                // A file shorter than its device size reads as zeros past its end.
                (buffer.baseAddress! + done).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - done)
                return
            }
            done += n
        }
    }

    /// Within the file only (`read` fills past its end with zeros), and not
    /// on an O_DIRECT descriptor, whose alignment rules a splice would not keep.
    public func fileRange(at offset: UInt64, count: Int) -> (descriptor: Int32, offset: UInt64)? {
        guard alignment == 1, offset <= size, UInt64(count) <= size - offset else { return nil }
        return (descriptor.rawValue, offset)
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        var done = 0
        if directFd >= 0, buffer.count > 0, Int(bitPattern: buffer.baseAddress!) % 4096 == 0,
           offset % 4096 == 0, buffer.count % 4096 == 0 {
            var n: Int
            repeat { n = pwrite(directFd, buffer.baseAddress!, buffer.count, off_t(offset)) } while n < 0 && errno == EINTR
            if n == buffer.count { return }
            // Only a refusal of the alignment (EINVAL) goes on through the
            // buffered descriptor; the device's own error is the caller's,
            // or a page-cache write would hide it.
            if n < 0 && errno != EINVAL {
                throw BlksnapError(Errno(rawValue: errno), "write of \(path) at \(offset) failed")
            }
            // Short: the buffered descriptor writes the rest.
            done = max(n, 0)
        }
        while done < buffer.count {
            let n = pwrite(descriptor.rawValue, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw BlksnapError(Errno(rawValue: errno), "write of \(path) at \(offset) failed")
            }
            done += n
        }
    }

    /// Through the O_DIRECT descriptor where offset and length allow it,
    /// as `write` does: the device reads the source's page-cache pages
    /// itself, and the call returns once it has.
    public func write(fromFile source: Int32, at sourceOffset: UInt64, count: Int,
                      to offset: UInt64) throws(BlksnapError) -> Bool {
        let aligned = directFd >= 0 && offset % 4096 == 0 && count % 4096 == 0 && sourceOffset % 4096 == 0
        do throws(BlksnapError) {
            return try SplicePipe.move(from: source, at: sourceOffset, to: aligned ? directFd : descriptor.rawValue,
                                       at: offset, count: count)
        } catch {
            throw BlksnapError(error.errno, "write of \(path) at \(offset) failed: \(error.message)")
        }
    }

    public func flush() throws(BlksnapError) {
        guard fdatasync(descriptor.rawValue) == 0 else {
            throw BlksnapError(Errno(rawValue: errno), "flush of \(path) failed")
        }
    }

    public func discard(at offset: UInt64, length: UInt64) throws(BlksnapError) {
        if isBlockDevice {
            var range: (UInt64, UInt64) = (offset, length)
            _ = ioctl(descriptor.rawValue, Self.BLKDISCARD, &range)
        } else {
            _ = blksnap_punch_hole(descriptor.rawValue, off_t(offset), off_t(length))
        }
    }
}
