import BlksnapEngine
@testable import BlksnapFUSE
import CBlksnapLinux
import Logging
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A disk that keeps what was written apart from what a flush made
/// durable, as a disk with a volatile write cache does.
final class CachingDisk: BlockDevice, @unchecked Sendable {
    let size: UInt64
    private let lock = Mutex<(current: [UInt8], durable: [UInt8])>(([], []))

    init(size: Int) {
        self.size = UInt64(size)
        lock.withLock { $0 = ([UInt8](repeating: 0, count: size), [UInt8](repeating: 0, count: size)) }
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        lock.withLock { disk in
            for i in 0..<buffer.count { buffer[i] = disk.current[Int(offset) + i] }
        }
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        lock.withLock { disk in
            for i in 0..<buffer.count { disk.current[Int(offset) + i] = buffer[i] }
        }
    }

    func flush() throws(BlksnapError) { lock.withLock { $0.durable = $0.current } }

    func durable(_ range: Range<Int>) -> [UInt8] { lock.withLock { Array($0.durable[range]) } }
}

private let canRoute = getuid() == 0 && access("/dev/fuse", F_OK) == 0 && access("/dev/loop-control", F_OK) == 0

/// The durability promise on FUSE+loop: a write acknowledged after a
/// flush, or written with FUA (O_DSYNC on the block device), is on the
/// device behind the device filesystem. Whatever the loop device and the
/// FUSE connection are tuned for speed, no acknowledged write may stay in
/// a cache of theirs.
@Suite(.serialized) struct DurabilityTests {
    let pattern = (0..<65536).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) }
    let at = 1 << 20

    /// Routes `disk` as a loop device on a file of a fresh device
    /// filesystem and gives `body` the loop device's path.
    func routed(_ disk: CachingDisk, _ body: (String) throws -> Void) throws {
        let mountpoint = "/tmp/blksnap-durability-\(getpid())"
        let fs = DeviceFilesystem(mountpoint: mountpoint, logger: Logger(label: "durability"))
        try fs.start()
        defer {
            fs.stop()
            rmdir(mountpoint)
        }
        let index = try LoopDevice.addFree(atOrAbove: 200)
        defer { LoopDevice.remove(index) }
        let file = try fs.add(name: "disk", ino: 5, device: disk)
        _ = try LoopDevice.attach(index, file: file, readOnly: false)
        defer { LoopDevice.detach(index) }
        try body(LoopDevice.path(index))
    }

    func write(_ path: String, flags: Int32) -> Int {
        let fd = open(path, O_RDWR | O_CLOEXEC | blksnap_o_direct | flags)
        guard fd >= 0 else { return -1 }
        defer { close(fd) }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: pattern.count, alignment: 4096)
        defer { buffer.deallocate() }
        buffer.copyBytes(from: pattern)
        guard pwrite(fd, buffer.baseAddress, buffer.count, off_t(at)) == buffer.count else { return -1 }
        return flags & O_DSYNC != 0 ? 0 : Int(fdatasync(fd))
    }

    /// A Bool: a failed comparison of two 64 KiB arrays would have the
    /// test library compute their difference, for minutes.
    func madeDurable(_ disk: CachingDisk) -> Bool { disk.durable(at..<(at + pattern.count)) == pattern }

    @Test(.enabled(if: canRoute, "needs root, /dev/fuse and loop devices"))
    func aWriteAcknowledgedAfterAFlushIsOnTheDevice() throws {
        let disk = CachingDisk(size: 4 << 20)
        try routed(disk) { path in
            #expect(write(path, flags: 0) == 0)
            #expect(madeDurable(disk), "the bytes written are not what the device made durable")
        }
    }

    @Test(.enabled(if: canRoute, "needs root, /dev/fuse and loop devices"))
    func aWriteAcknowledgedWithFuaIsOnTheDevice() throws {
        let disk = CachingDisk(size: 4 << 20)
        try routed(disk) { path in
            #expect(write(path, flags: O_DSYNC) == 0)
            #expect(madeDurable(disk), "the bytes written are not what the device made durable")
        }
    }
}
