import BlksnapEngine
import CFuse3
import Logging
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// A FUSE filesystem (libfuse3 lowlevel, multithreaded) whose files are
/// block devices of the engine: routed devices and snapshot images. A loop
/// device on each file makes it a real block device on kernels without
/// NBD; every write the kernel sends that loop device arrives here, in
/// `write`, and goes to the engine before the backing store.
///
/// Files are opened direct_io so the kernel keeps no page cache of its own
/// for them: the loop device's is the only one, and each write reaches the
/// engine once.
public final class DeviceFilesystem: @unchecked Sendable {
    final class Entry {
        let ino: fuse_ino_t
        let generation: UInt64
        let name: String
        let device: any BlockDevice
        let readOnly: Bool
        let gate = RequestGate()
        init(ino: fuse_ino_t, generation: UInt64, name: String, device: any BlockDevice, readOnly: Bool) {
            (self.ino, self.generation, self.name, self.device, self.readOnly) = (ino, generation, name, device, readOnly)
        }
    }

    /// The requests of one file that reach its device: counted while they
    /// run, and from `hold` on left unanswered. Every request passes here,
    /// so it takes no lock until a hold: a request counts itself, then
    /// looks for a hold; a hold marks itself, then looks for requests; so
    /// either the request sees the hold or the hold sees the request.
    final class RequestGate: Sendable {
        private let running = Atomic<Int>(0)
        private let held = Atomic<Bool>(false)
        private let lock = Lock()
        private let idle = Condition()

        /// False once held: the request must stay unanswered.
        func enter() -> Bool {
            running.add(1, ordering: .sequentiallyConsistent)
            guard held.load(ordering: .sequentiallyConsistent) else { return true }
            leave()
            return false
        }

        func leave() {
            let left = running.subtract(1, ordering: .sequentiallyConsistent).newValue
            if left == 0 && held.load(ordering: .sequentiallyConsistent) { lock.withLock { idle.broadcast() } }
        }

        /// Returns once the requests already running are answered.
        func hold() {
            lock.withLock {
                held.store(true, ordering: .sequentiallyConsistent)
                while running.load(ordering: .sequentiallyConsistent) > 0 { idle.wait(lock) }
            }
        }
    }

    public let mountpoint: String
    let logger: Logger
    private let lock = Lock()
    private var entries: [fuse_ino_t: Entry] = [:]
    private var byName: [String: fuse_ino_t] = [:]
    /// Tells a file apart from an earlier one under the same inode number
    /// (a loop index used again), for the kernel's inode cache.
    private var generation = UInt64(time(nil)) << 20
    private var session: OpaquePointer?
    private var finished = Condition()
    private var running = false
    /// The session runs on a connection a blksnapd before this one mounted.
    private var adopted = false
    /// What the kernel said in FUSE_INIT, for a blksnapd after this one.
    private var kernelInit: FuseInit?
    private var initialized = Condition()

    /// The largest request the kernel may send: large enough that a 1 MiB
    /// write from the loop device is one request.
    static let maxRequest: UInt32 = 1 << 20

    /// Reads from this size on are spliced from the backing file where the
    /// device has one (libfuse copies anything below two pages anyway):
    /// the kernel then copies the bytes once, page cache to the reader,
    /// instead of to us and again from us.
    static let spliceMinimum = 2 * 4096

    public init(mountpoint: String, logger: Logger) {
        self.mountpoint = mountpoint
        self.logger = logger
    }

    // MARK: files

    /// Adds a file backed by `device` under inode number `ino` (above 1,
    /// the root); returns its path. The caller derives `ino` from what it
    /// saves (a loop index), so that a blksnapd started after a crash
    /// serves the same file under the same number: the kernel names the
    /// files it holds open (the loop devices' backing files) by it.
    public func add(name: String, ino: fuse_ino_t, device: any BlockDevice, readOnly: Bool = false) throws(BlksnapError) -> String {
        try lock.withLock { () throws(BlksnapError) in
            guard byName[name] == nil, ino > fuse_ino_t(FUSE_ROOT_ID), entries[ino] == nil else {
                throw BlksnapError(.fileExists, "\(name) (inode \(ino)) exists in \(mountpoint)")
            }
            generation += 1
            entries[ino] = Entry(ino: ino, generation: generation, name: name, device: device, readOnly: readOnly)
            byName[name] = ino
        }
        return mountpoint + "/" + name
    }

    /// Removes a file and makes the kernel forget it at once: a file of
    /// the same name and inode number may follow within the entry and
    /// attribute timeouts (a loop index used again, an image after an
    /// image), and a loop device set up on it must see the new file's
    /// size, not the cached size of the one before.
    public func remove(name: String) {
        let (ino, se) = lock.withLock { () -> (fuse_ino_t?, OpaquePointer?) in
            let ino = byName.removeValue(forKey: name)
            if let ino { entries[ino] = nil }
            return (ino, session)
        }
        guard let ino, let se else { return }
        _ = name.withCString { fuse_lowlevel_notify_inval_entry(se, fuse_ino_t(FUSE_ROOT_ID), $0, strlen($0)) }
        _ = fuse_lowlevel_notify_inval_inode(se, ino, -1, 0)
    }

    /// Leaves the requests of file `name` unanswered from now on, and
    /// returns once those already running are answered: nothing more of
    /// it reaches its device. The kernel keeps the unanswered ones, and a
    /// blksnapd that takes the connection over has them sent again
    /// (FUSE_NOTIFY_RESEND), as after a crash. False: no such file.
    public func hold(name: String) -> Bool {
        guard let e = entry(named: name) else { return false }
        e.gate.hold()
        return true
    }

    /// A serving thread with a request that must stay unanswered: it stays
    /// here until the process ends, which leaves the request to the kernel
    /// as a crash would.
    private static func park() -> Never {
        while true { _ = sleep(UInt32.max) }
    }

    /// The device of `ino` for a request that reaches it, counted in its
    /// gate until `body` returns; a held file's request never returns.
    private func withDevice(_ req: fuse_req_t?, _ ino: fuse_ino_t, missing: Int32, _ body: (Entry) -> Void) {
        guard let e = entry(ino) else { fuse_reply_err(req, missing); return }
        guard e.gate.enter() else { Self.park() }
        defer { e.gate.leave() }
        body(e)
    }

    func entry(_ ino: fuse_ino_t) -> Entry? { lock.withLock { entries[ino] } }
    func entry(named name: String) -> Entry? { lock.withLock { byName[name].flatMap { entries[$0] } } }
    var allEntries: [Entry] { lock.withLock { entries.values.sorted { $0.ino < $1.ino } } }

    // MARK: session

    /// Whether `mountpoint` is a FUSE mount whose server is gone (a blksnapd
    /// that was killed): every access fails with ENOTCONN.
    public var isStale: Bool {
        var st = stat()
        return stat(mountpoint, &st) != 0 && errno == ENOTCONN
    }

    /// Takes a dead server's mount away (lazily: loop devices may still
    /// hold files of it), so that a new one can be mounted there.
    public func detachStaleMount() {
        if umount2(mountpoint, Int32(MNT_DETACH)) == 0 {
            logger.warning("blksnapd: detached the device filesystem a blksnapd that died left at \(mountpoint)")
        } else {
            logger.error("blksnapd: cannot detach the stale mount at \(mountpoint): \(String(cString: strerror(errno)))")
        }
    }

    /// Mounts at `mountpoint` and serves on several threads in the background.
    public func start() throws(BlksnapError) {
        mkdir(mountpoint, 0o700)
        let se = try newSession()
        guard fuse_session_mount(se, mountpoint) == 0 else {
            fuse_session_destroy(se)
            throw BlksnapError(.noSuchFileOrDirectory, "cannot mount the device filesystem at \(mountpoint)")
        }
        lock.withLock { session = se }
        serve()
        logger.info("blksnapd: device filesystem mounted at \(mountpoint)")
    }

    /// The connection's /dev/fuse descriptor and the name it is kept
    /// under (what the kernel said in FUSE_INIT), once the kernel's
    /// INIT was answered.
    public var connection: (fd: Int32, name: String)? {
        lock.withLock {
            guard let session, let kernelInit else { return nil }
            return (fuse_session_fd(session), kernelInit.name)
        }
    }

    /// `connection`, waiting up to `seconds` for the kernel's FUSE_INIT
    /// (sent at mount, answered by a serving thread).
    public func connection(waitingUpTo seconds: UInt64) -> (fd: Int32, name: String)? {
        let deadline = monotonicNanoseconds() + seconds * 1_000_000_000
        lock.withLock {
            while kernelInit == nil && initialized.wait(lock, untilMonotonic: deadline) {}
        }
        return connection
    }

    /// Whether a kept connection is still alive: /dev/fuse reports POLLERR
    /// once its connection is aborted.
    public static func isAlive(_ fd: Int32) -> Bool {
        var p = pollfd(fd: fd, events: 0, revents: 0)
        return poll(&p, 1, 0) == 0
    }

    /// Takes over `kept`, the connection of a blksnapd that died, without
    /// serving yet (files first, then `serve`): a libfuse session on its
    /// descriptor, given the FUSE_INIT the kernel will not send again, and
    /// FUSE_NOTIFY_RESEND, so that what the dead server read and never
    /// answered comes again. Throws where the kernel has no resend
    /// (before 6.9): those requests would wait for ever.
    ///
    /// Sending a write again is safe: blksnapd acknowledges a write only
    /// after the engine passed it on to the backing store, so one that
    /// comes again either never reached the store or writes the same bytes
    /// at the same place once more; and nothing that had to follow it was
    /// sent before it completed (the block layer orders writes only by
    /// their completion), so it overwrites nothing newer. Copy-on-write
    /// cannot run twice for it either: snapshots live in the engine's
    /// memory and died with the previous blksnapd, so the new engine has
    /// none to copy into.
    public func adopt(_ kept: KeptConnection) throws(BlksnapError) {
        guard let initial = FuseInit(name: kept.name) else {
            throw BlksnapError(.invalidArgument, "a kept FUSE connection named \(kept.name) is not the device filesystem's")
        }
        let sent = FuseInit.resendNotification.withUnsafeBytes { Glibc.write(kept.fd, $0.baseAddress, $0.count) }
        guard sent == FuseInit.resendNotification.count else {
            throw BlksnapError(.notSupported, "this kernel cannot send requests again (FUSE_NOTIFY_RESEND, Linux 6.9; it answered \(String(cString: strerror(errno))))")
        }
        // Nothing may touch the mount before the session serves: the kernel
        // would send this very process a request it is not reading yet.
        let se = try newSession()
        guard fuse_session_mount(se, "/dev/fd/\(kept.fd)") == 0 else {
            fuse_session_destroy(se)
            throw BlksnapError(.badFileDescriptor, "libfuse refused the kept FUSE connection")
        }
        var request = initial.request
        request.withUnsafeMutableBytes { cfuse3_process_request(se, $0.baseAddress, $0.count) }
        lock.withLock {
            session = se
            adopted = true
        }
        logger.notice("blksnapd: took over the device filesystem at \(mountpoint) from the blksnapd before this one (it died, or stopped with devices in use); the kernel sends again what it had read and not answered")
    }

    /// Serves the session on several threads in the background. All read
    /// the one descriptor (no cloned ones): the kernel fails the requests
    /// read on a cloned descriptor when it closes, so only requests read
    /// on the kept one survive a crash to be sent again.
    public func serve() {
        let box = Unmanaged.passRetained(self)
        lock.withLock { running = true }
        var thread = pthread_t()
        pthread_create(&thread, nil, { arg in
            let fs = Unmanaged<DeviceFilesystem>.fromOpaque(arg!).takeRetainedValue()
            var config = fuse_loop_config(clone_fd: 0, max_idle_threads: 16)
            let se = fs.lock.withLock { fs.session! }
            _ = fuse_session_loop_mt_32(se, &config)
            fs.lock.withLock {
                fs.running = false
                fs.finished.broadcast()
            }
            return nil
        }, box.toOpaque())
        pthread_detach(thread)
    }

    private func newSession() throws(BlksnapError) -> OpaquePointer {
        var ops = Self.operations()
        let argv0 = strdup("blksnapd")
        defer { free(argv0) }
        var argvArray: [UnsafeMutablePointer<CChar>?] = [argv0, nil]
        let se = argvArray.withUnsafeMutableBufferPointer { argv -> OpaquePointer? in
            var args = fuse_args(argc: 1, argv: argv.baseAddress, allocated: 0)
            return fuse_session_new(&args, &ops, MemoryLayout<fuse_lowlevel_ops>.size,
                                    Unmanaged.passUnretained(self).toOpaque())
        }
        guard let se else { throw BlksnapError(.noSuchFileOrDirectory, "cannot create a FUSE session (is /dev/fuse there?)") }
        return se
    }

    private static func operations() -> fuse_lowlevel_ops {
        var ops = fuse_lowlevel_ops()
        ops.`init` = { userdata, conn in
            guard let userdata, let conn else { return }
            let fs = Unmanaged<DeviceFilesystem>.fromOpaque(userdata).takeUnretainedValue()
            let said = FuseInit(major: conn.pointee.proto_major, minor: conn.pointee.proto_minor,
                                maxReadahead: conn.pointee.max_readahead)
            fs.lock.withLock {
                fs.kernelInit = said
                fs.initialized.broadcast()
            }
            conn.pointee.max_write = DeviceFilesystem.maxRequest
            conn.pointee.max_readahead = DeviceFilesystem.maxRequest
            // The loop device's direct I/O reaches FUSE as asynchronous
            // requests, which the kernel holds back beyond max_background
            // (12): fewer in flight than a queue depth of 16 asks for.
            conn.pointee.max_background = 64
            conn.pointee.congestion_threshold = 48
            if conn.pointee.capable & UInt32(FUSE_CAP_SPLICE_WRITE) != 0 {
                conn.pointee.want |= UInt32(FUSE_CAP_SPLICE_WRITE)
            }
        }
        ops.lookup = { req, parent, name in DeviceFilesystem.of(req).lookup(req, parent, name!) }
        ops.getattr = { req, ino, _ in DeviceFilesystem.of(req).getattr(req, ino) }
        ops.setattr = { req, ino, attr, toSet, _ in DeviceFilesystem.of(req).setattr(req, ino, attr!, toSet) }
        ops.open = { req, ino, fi in DeviceFilesystem.of(req).open(req, ino, fi!) }
        ops.read = { req, ino, size, off, _ in DeviceFilesystem.of(req).read(req, ino, size, off) }
        ops.write = { req, ino, buf, size, off, _ in DeviceFilesystem.of(req).write(req, ino, buf!, size, off) }
        ops.flush = { req, _, _ in fuse_reply_err(req, 0) }
        ops.release = { req, _, _ in fuse_reply_err(req, 0) }
        ops.fsync = { req, ino, _, _ in DeviceFilesystem.of(req).fsync(req, ino) }
        ops.fallocate = { req, ino, mode, off, len, _ in DeviceFilesystem.of(req).fallocate(req, ino, mode, off, len) }
        ops.readdir = { req, ino, size, off, _ in DeviceFilesystem.of(req).readdir(req, ino, size, off) }
        ops.opendir = { req, ino, fi in
            _ = ino == fuse_ino_t(FUSE_ROOT_ID) ? fuse_reply_open(req, fi) : fuse_reply_err(req, ENOTDIR)
        }
        ops.releasedir = { req, _, _ in fuse_reply_err(req, 0) }
        return ops
    }

    /// Unmounts and waits for the serving threads to end.
    public func stop() {
        guard let (se, adopted) = lock.withLock({ session.map { ($0, adopted) } }) else { return }
        fuse_session_exit(se)
        if adopted {
            // libfuse unmounts only what it mounted itself.
            umount2(mountpoint, Int32(MNT_DETACH))
        } else {
            fuse_session_unmount(se)
        }
        lock.withLock {
            while running { finished.wait(lock) }
            session = nil
        }
        fuse_session_destroy(se)
    }

    // MARK: requests

    static func of(_ req: fuse_req_t?) -> DeviceFilesystem {
        Unmanaged<DeviceFilesystem>.fromOpaque(fuse_req_userdata(req)!).takeUnretainedValue()
    }

    private func attributes(_ e: Entry) -> stat {
        var st = stat()
        st.st_ino = __ino_t(e.ino)
        st.st_mode = S_IFREG | (e.readOnly ? 0o400 : 0o600)
        st.st_nlink = 1
        st.st_size = off_t(e.device.size)
        st.st_blksize = 4096
        st.st_blocks = blkcnt_t((e.device.size + 511) / 512)
        return st
    }

    private func rootAttributes() -> stat {
        var st = stat()
        st.st_ino = __ino_t(FUSE_ROOT_ID)
        st.st_mode = S_IFDIR | 0o700
        st.st_nlink = 2
        return st
    }

    private func lookup(_ req: fuse_req_t?, _ parent: fuse_ino_t, _ name: UnsafePointer<CChar>) {
        guard parent == fuse_ino_t(FUSE_ROOT_ID), let e = entry(named: String(cString: name)) else {
            fuse_reply_err(req, ENOENT)
            return
        }
        var param = fuse_entry_param()
        param.ino = e.ino
        param.generation = e.generation
        param.attr = attributes(e)
        param.attr_timeout = 1
        param.entry_timeout = 1
        fuse_reply_entry(req, &param)
    }

    private func getattr(_ req: fuse_req_t?, _ ino: fuse_ino_t) {
        var st: stat
        if ino == fuse_ino_t(FUSE_ROOT_ID) {
            st = rootAttributes()
        } else if let e = entry(ino) {
            st = attributes(e)
        } else {
            fuse_reply_err(req, ENOENT)
            return
        }
        fuse_reply_attr(req, &st, 1)
    }

    /// Devices have a fixed size: only no-op changes (touch, chmod) pass.
    private func setattr(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ attr: UnsafeMutablePointer<stat>, _ toSet: Int32) {
        guard let e = entry(ino) else { fuse_reply_err(req, ENOENT); return }
        if toSet & FUSE_SET_ATTR_SIZE != 0 && UInt64(attr.pointee.st_size) != e.device.size {
            fuse_reply_err(req, EPERM)
            return
        }
        var st = attributes(e)
        fuse_reply_attr(req, &st, 1)
    }

    private func open(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>) {
        guard let e = entry(ino) else { fuse_reply_err(req, ENOENT); return }
        if e.readOnly && fi.pointee.flags & O_ACCMODE != O_RDONLY {
            fuse_reply_err(req, EROFS)
            return
        }
        fi.pointee.direct_io = 1
        fi.pointee.keep_cache = 0
        fuse_reply_open(req, fi)
    }

    private func reply(_ req: fuse_req_t?, _ error: BlksnapError) {
        logger.debug("blksnap-fuse: \(error)")
        fuse_reply_err(req, error.errno.rawValue)
    }

    /// A file no longer served (the image of a snapshot that died with a
    /// blksnapd before this one) fails with EIO, as a dead disk does.
    private func read(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ size: Int, _ off: off_t) {
        withDevice(req, ino, missing: EIO) { e in read(req, e, size, off) }
    }

    private func read(_ req: fuse_req_t?, _ e: Entry, _ size: Int, _ off: off_t) {
        let offset = UInt64(off)
        guard offset < e.device.size else { fuse_reply_buf(req, nil, 0); return }
        let count = Int(min(UInt64(size), e.device.size - offset))
        if count >= Self.spliceMinimum {
            if let image = e.device as? SnapImage {
                if image.withFileRanges(at: offset, count: count, { Self.splice(req, $0) }) { return }
            } else if let range = e.device.fileRange(at: offset, count: count) {
                Self.splice(req, [(range.descriptor, range.offset, count)])
                return
            }
        }
        let kept = count <= Int(Self.maxRequest)
        let buffer = kept ? UnsafeMutableRawBufferPointer(start: Self.threadBuffer(), count: count)
                          : UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 4096)
        defer { if !kept { buffer.deallocate() } }
        do throws(BlksnapError) {
            try e.device.read(into: buffer, at: offset)
            fuse_reply_buf(req, buffer.baseAddress!.assumingMemoryBound(to: CChar.self), count)
        } catch {
            reply(req, error)
        }
    }

    /// Replies with `ranges`, spliced (libfuse replies with an error
    /// itself when the splice fails).
    private static func splice(_ req: fuse_req_t?, _ ranges: [DiffArea.FileRange]) {
        // fuse_bufvec ends in a one-element array that is really as long as `count`.
        let bytes = MemoryLayout<fuse_bufvec>.size + max(ranges.count - 1, 0) * MemoryLayout<fuse_buf>.stride
        let raw = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: MemoryLayout<fuse_bufvec>.alignment)
        defer { raw.deallocate() }
        raw.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        let bufv = raw.assumingMemoryBound(to: fuse_bufvec.self)
        bufv.pointee.count = ranges.count
        let bufs = raw.advanced(by: MemoryLayout<fuse_bufvec>.offset(of: \fuse_bufvec.buf)!).assumingMemoryBound(to: fuse_buf.self)
        for (i, range) in ranges.enumerated() {
            bufs[i].size = range.count
            bufs[i].flags = fuse_buf_flags(rawValue: FUSE_BUF_IS_FD.rawValue | FUSE_BUF_FD_SEEK.rawValue)
            bufs[i].fd = range.descriptor
            bufs[i].pos = off_t(range.offset)
        }
        _ = fuse_reply_data(req, bufv, fuse_buf_copy_flags(rawValue: 0))
    }

    /// A read buffer per serving thread, for its life: a fresh 1 MiB
    /// allocation per request is an mmap, 256 page faults and a munmap,
    /// which cost more than the read itself.
    private static let bufferKey: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key) { $0?.deallocate() }
        return key
    }()

    private static func threadBuffer() -> UnsafeMutableRawPointer {
        if let kept = pthread_getspecific(bufferKey) { return kept }
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: Int(maxRequest), alignment: 4096)
        pthread_setspecific(bufferKey, buffer)
        return buffer
    }

    private func write(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ buf: UnsafePointer<CChar>, _ size: Int, _ off: off_t) {
        withDevice(req, ino, missing: EIO) { e in write(req, e, buf, size, off) }
    }

    private func write(_ req: fuse_req_t?, _ e: Entry, _ buf: UnsafePointer<CChar>, _ size: Int, _ off: off_t) {
        guard !e.readOnly else { fuse_reply_err(req, EROFS); return }
        let offset = UInt64(off)
        guard offset <= e.device.size, UInt64(size) <= e.device.size - offset else {
            fuse_reply_err(req, ENOSPC)
            return
        }
        do throws(BlksnapError) {
            try e.device.write(UnsafeRawBufferPointer(start: buf, count: size), at: offset)
            fuse_reply_write(req, size)
        } catch {
            reply(req, error)
        }
    }

    private func fsync(_ req: fuse_req_t?, _ ino: fuse_ino_t) {
        withDevice(req, ino, missing: EIO) { e in
            do throws(BlksnapError) {
                try e.device.flush()
                fuse_reply_err(req, 0)
            } catch {
                reply(req, error)
            }
        }
    }

    /// The loop driver turns discards into hole punches and zeroing into
    /// zero-range requests; both change what the device reads back.
    private func fallocate(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ mode: Int32, _ off: off_t, _ len: off_t) {
        withDevice(req, ino, missing: ENOENT) { e in fallocate(req, e, mode, off, len) }
    }

    private func fallocate(_ req: fuse_req_t?, _ e: Entry, _ mode: Int32, _ off: off_t, _ len: off_t) {
        guard !e.readOnly else { fuse_reply_err(req, EROFS); return }
        let punch: Int32 = 0x02, zeroRange: Int32 = 0x10, keepSize: Int32 = 0x01
        let offset = UInt64(off), length = UInt64(len)
        guard offset <= e.device.size, length <= e.device.size - offset else {
            fuse_reply_err(req, mode & keepSize != 0 ? 0 : EFBIG)
            return
        }
        do throws(BlksnapError) {
            if mode & punch != 0 || mode & zeroRange != 0 {
                try zero(e.device, offset: offset, length: length, discard: mode & punch != 0)
            }
            fuse_reply_err(req, 0)
        } catch {
            reply(req, error)
        }
    }

    private func zero(_ device: any BlockDevice, offset: UInt64, length: UInt64, discard: Bool) throws(BlksnapError) {
        if discard, device is RoutedDevice {
            try device.discard(at: offset, length: length)
            return
        }
        // Images (and zero-range) get real zeros: a discard must read back as zeros.
        try device.writeZeroes(at: offset, length: length)
    }

    private func readdir(_ req: fuse_req_t?, _ ino: fuse_ino_t, _ size: Int, _ off: off_t) {
        guard ino == fuse_ino_t(FUSE_ROOT_ID) else { fuse_reply_err(req, ENOTDIR); return }
        var names: [(String, fuse_ino_t)] = [(".", fuse_ino_t(FUSE_ROOT_ID)), ("..", fuse_ino_t(FUSE_ROOT_ID))]
        names += allEntries.map { ($0.name, $0.ino) }
        let buffer = UnsafeMutablePointer<CChar>.allocate(capacity: size)
        defer { buffer.deallocate() }
        var used = 0
        var index = Int(off)
        while index < names.count {
            var st = stat()
            st.st_ino = __ino_t(names[index].1)
            st.st_mode = index < 2 ? S_IFDIR : S_IFREG
            let need = fuse_add_direntry(req, buffer + used, size - used, names[index].0, &st, off_t(index + 1))
            if need > size - used { break }
            used += need
            index += 1
        }
        fuse_reply_buf(req, buffer, used)
    }
}
