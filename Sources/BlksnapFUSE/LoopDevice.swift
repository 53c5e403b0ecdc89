import BlksnapABI
import BlksnapDevices
import BlksnapEngine
import CBlksnapLinux
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Loop devices through /dev/loop-control: how a file of the device
/// filesystem becomes a block device with a major:minor the tools can name.
public enum LoopDevice {
    static let control = "/dev/loop-control"
    static let LOOP_CTL_ADD: UInt = 0x4C80
    static let LOOP_CTL_REMOVE: UInt = 0x4C81
    static let LOOP_CTL_GET_FREE: UInt = 0x4C82
    static let LOOP_CONFIGURE: UInt = 0x4C0A
    static let LOOP_CLR_FD: UInt = 0x4C01

    public static func path(_ index: Int) -> String { "/dev/loop\(index)" }

    private static func withControl<T>(_ body: (Int32) throws(BlksnapError) -> T) throws(BlksnapError) -> T {
        let fd = open(control, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else {
            throw BlksnapError(Errno(rawValue: errno), "cannot open \(control): this kernel or container has no loop devices")
        }
        defer { close(fd) }
        return try body(fd)
    }

    /// The lowest loop index not bound to a file (the kernel makes one if
    /// none is free): images take these, so the first image is loop0 and
    /// `/dev/blksnap-image0`, as the upstream tests expect.
    public static func lowestFree() throws(BlksnapError) -> Int {
        try withControl { (fd) throws(BlksnapError) -> Int in
            let n = ioctl(fd, LOOP_CTL_GET_FREE, CInt(0))
            guard n >= 0 else { throw BlksnapError(Errno(rawValue: errno), "no free loop device") }
            return Int(n)
        }
    }

    /// A loop device at `index` or above that did not exist: routed devices
    /// live high up, out of the images' way.
    public static func addFree(atOrAbove index: Int) throws(BlksnapError) -> Int {
        try withControl { (fd) throws(BlksnapError) -> Int in
            var i = index
            while i < index + 4096 {
                let n = ioctl(fd, LOOP_CTL_ADD, CInt(i))
                if n >= 0 { return Int(n) }
                guard errno == EEXIST else { throw BlksnapError(Errno(rawValue: errno), "cannot add loop\(i)") }
                i += 1
            }
            throw BlksnapError(.noSpace, "no loop index free from \(index)")
        }
    }

    /// Removes an unbound loop device; false while it is still open (EBUSY).
    @discardableResult
    public static func remove(_ index: Int) -> Bool {
        (try? withControl { (fd) throws(BlksnapError) in ioctl(fd, LOOP_CTL_REMOVE, CInt(index)) >= 0 || errno == ENODEV }) ?? false
    }

    /// Makes sure /dev/loopN exists (devtmpfs makes it; a bare /dev may not).
    static func ensureNode(_ index: Int) throws(BlksnapError) -> DevId {
        let p = path(index)
        var st = stat()
        for _ in 0..<100 {
            if stat(p, &st) == 0 { return DevId(major: blksnap_major(st.st_rdev), minor: blksnap_minor(st.st_rdev)) }
            usleep(10_000)
        }
        // No devtmpfs: the loop major is 7 and, with max_part=0, minor = index.
        guard mknod(p, S_IFBLK | 0o600, blksnap_makedev(7, UInt32(index))) == 0 else {
            throw BlksnapError(Errno(rawValue: errno), "cannot create \(p)")
        }
        return DevId(major: 7, minor: UInt32(index))
    }

    /// Binds `file` to loop `index` with direct I/O (no second page cache);
    /// returns the device's number.
    public static func attach(_ index: Int, file: String, readOnly: Bool) throws(BlksnapError) -> DevId {
        let devId = try ensureNode(index)
        var fd = open(file, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC | blksnap_o_direct)
        let direct = fd >= 0
        if fd < 0 { fd = open(file, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC) }
        guard fd >= 0 else { throw BlksnapError(Errno(rawValue: errno), "cannot open \(file)") }
        defer { close(fd) }
        let loopFd = open(path(index), O_RDWR | O_CLOEXEC)
        guard loopFd >= 0 else { throw BlksnapError(Errno(rawValue: errno), "cannot open \(path(index))") }
        defer { close(loopFd) }
        var config = loop_config()
        config.fd = UInt32(fd)
        config.block_size = 512
        var flags: UInt32 = 0
        if direct { flags |= UInt32(LO_FLAGS_DIRECT_IO) }
        if readOnly { flags |= UInt32(LO_FLAGS_READ_ONLY) }
        config.info.lo_flags = flags
        withUnsafeMutableBytes(of: &config.info.lo_file_name) { raw in
            for (i, b) in file.utf8.prefix(raw.count - 1).enumerated() { raw[i] = b }
        }
        guard ioctl(loopFd, LOOP_CONFIGURE, &config) == 0 else {
            throw BlksnapError(Errno(rawValue: errno), "cannot bind \(file) to \(path(index))")
        }
        return devId
    }

    /// Unbinds loop `index`; a device still open (mounted) is unbound by the
    /// kernel when its last user closes it.
    public static func detach(_ index: Int) {
        let fd = open(path(index), O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return }
        _ = ioctl(fd, LOOP_CLR_FD, CInt(0))
        close(fd)
    }

    /// Loop devices whose backing file's path starts with `prefix`
    /// (/sys/block/loopN/loop/backing_file).
    public static func bound(toFilesUnder prefix: String) -> [Int] {
        blockDeviceIndices(named: "loop").filter {
            readAttribute("/sys/block/loop\($0)/loop/backing_file")?.hasPrefix(prefix) == true
        }
    }
}
