import BlksnapABI
import BlksnapControlProtocol
import BlksnapEngine
import CBlksnapLinux
import Logging
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Routed devices and snapshot images as kernel block devices, whatever
/// the kernel offers (a `DeviceMaker`): `blksnapctl attach` and `detach`,
/// and the engine's `SnapshotHooks` (quiesce before TAKE, images as
/// devices after it).
///
/// Every device made is also written to a saved list (`SavedDevices`), so
/// that a blksnapd started after one that was killed serves the same
/// routed devices again where the maker can (kernel NBD), and undoes the
/// rest (CrashRecovery.swift).
public final class DataPlane: SnapshotHooks, @unchecked Sendable {
    public typealias Attached = AttachReply

    /// A declared device at start: routed, missing or refused, and why.
    public struct DeclaredState: Sendable, Equatable {
        public var device: DeclaredDevices.Device
        public var state: String
        public var why: String?
        public var devId: DevId?
    }

    /// A block device this plane made or removed, for whoever also exports
    /// it (blksnapd's NBD server), named as the kernel names it.
    public enum DeviceEvent: Sendable {
        case added(name: String, device: any BlockDevice, devId: DevId, original: DevId?)
        case removed(name: String)
    }

    /// Called after a device appears and before it goes.
    public var onDevice: (@Sendable (DeviceEvent) -> Void)?

    public let maker: any DeviceMaker
    let logger: Logger
    /// Where the saved list lives (nil: nothing is saved).
    let listPath: String?
    /// Opens an NBD URI as a backing (libnbd lives outside this module).
    let openURI: (@Sendable (String) throws(BlksnapError) -> any BlockDevice)?
    let lock = Lock()
    private(set) weak var engine: Engine?
    /// Keyed by the number the engine routes: the made device's, or for a
    /// live-routed dm device the dm device's own.
    var routed: [DevId: Routed] = [:]
    struct Routed {
        var made: MadeDevice
        var backing: String
        var backend: String
        var size: UInt64
        var live: SavedDevices.Live? = nil
        var name: String? = nil
        /// The links made for it (/dev/disk/by-blksnap/NAME, /dev/block/MJ:MN).
        var links: [String] = []

        /// The number the engine routes it under.
        var devId: DevId { live?.devId ?? made.devId }
        /// What is mounted and named: a live-routed dm device itself.
        var node: String { live.map { "/dev/mapper/" + $0.name } ?? made.node }
    }
    /// Where CBT maps are kept across restarts (nil: not kept).
    let cbtDirectory: String?
    let cbtSyncIntervalSeconds: Int64
    /// Where links go: DIR/disk/by-blksnap/NAME and DIR/block/MJ:MN (nil: none).
    let devDirectory: String?
    private var declared: [DeclaredState] = []
    var images: [ObjectIdentifier: (made: MadeDevice, nodes: [String], backend: String)] = [:]
    /// Saved devices of another maker's kind: kept in the list for a
    /// blksnapd that makes that kind (CrashRecovery.swift).
    var foreign = SavedDevices()

    public init(maker: any DeviceMaker, logger: Logger, listPath: String? = nil,
                openURI: (@Sendable (String) throws(BlksnapError) -> any BlockDevice)? = nil,
                cbtDirectory: String? = nil, cbtSyncIntervalSeconds: Int64 = 60,
                devDirectory: String? = nil) {
        self.maker = maker
        self.logger = logger
        self.listPath = listPath
        self.openURI = openURI
        self.cbtDirectory = cbtDirectory
        self.cbtSyncIntervalSeconds = cbtSyncIntervalSeconds
        self.devDirectory = devDirectory
    }

    /// Starts the maker, then takes over what a blksnapd that died left in
    /// the saved list; `engine` is the one these hooks serve.
    public func start(engine: Engine) throws(BlksnapError) {
        lock.withLock { self.engine = engine }
        let saved = try listPath.map { (path) throws(BlksnapError) in try SavedDevices.load(from: path) } ?? SavedDevices()
        try maker.start()
        logger.info("blksnapd: routed devices and images are \(maker.kind) devices")
        if !saved.isEmpty { recover(saved, engine: engine) }
        maker.resume()
    }

    /// Why a device is in use (mounted, held by another device, open
    /// exclusively), or nil; tests swap it.
    public var inUse: @Sendable (_ devId: DevId, _ node: String) -> String? = DataPlane.whyInUse

    /// Removes every device it made; live-routed dm devices get their own
    /// tables back first, so what is mounted on them carries on. A routed
    /// device in use stays in the kernel where its kind can outlive
    /// blksnapd (kernel NBD), as after a crash, so a restart (an upgrade,
    /// `systemctl restart`) costs what is mounted on it nothing: the next
    /// blksnapd serves it again from the saved list.
    public func stop() {
        let (all, imgs) = lock.withLock { (Array(routed.values), Array(images.values)) }
        for i in imgs { removeImageDevice(i.made, nodes: i.nodes) }
        for r in all where r.live != nil {
            do throws(BlksnapError) {
                try detachLive(r.live!.devId)
            } catch {
                logger.error("blksnapd: cannot give /dev/mapper/\(r.live!.name) its own table back: \(error.message); \(r.live!.restoreHint)")
            }
        }
        var left: [DevId: Routed] = [:]
        for r in all where r.live == nil {
            let why = inUse(r.made.devId, r.made.node)
            if let why, maker.leave(r.made) {
                // Nothing reaches the engine from it now: the CBT saved at
                // unroute is exact, and what the kernel holds goes to the
                // next blksnapd, which restores that CBT before serving.
                do throws(BlksnapError) {
                    try engine?.unroute(r.made.devId)
                } catch {
                    logger.error("blksnapd: \(r.made.node): \(error.message)")
                }
                logger.notice("blksnapd: \(r.made.node) is in use (\(why)): left routed for the next blksnapd, which serves it again; unmount it and detach it first to remove it")
                left[r.devId] = r
                continue
            }
            if let why {
                logger.warning("blksnapd: \(r.made.node) is still in use (\(why)); it fails from now on, as \(maker.kind) devices cannot outlive blksnapd")
            }
            maker.unbind(r.made)
            maker.release(r.made)
            try? engine?.unroute(r.made.devId)
            for l in r.links { unlink(l) }
        }
        lock.withLock {
            routed = left
            images.removeAll()
            persist()
        }
        maker.stop()
    }

    /// Mounted, held by another block device (dm, md) or open exclusively:
    /// what O_EXCL tells, since the kernel counts no other opens for us.
    @Sendable static func whyInUse(_ devId: DevId, _ node: String) -> String? {
        if let m = Quiesce.mountpoints(of: devId).first { return "mounted on \(m)" }
        if let holder = (try? directoryEntries("/sys/dev/block/\(devId.major):\(devId.minor)/holders"))?.first {
            return "held by \(holder)"
        }
        let fd = open(node, O_RDONLY | O_EXCL | O_CLOEXEC | O_NONBLOCK)
        if fd >= 0 { close(fd) } else if errno == EBUSY { return "open exclusively" }
        return nil
    }

    // MARK: attach and detach

    /// Routes `backing`: an NBD URI, a regular file (created and grown to
    /// `size` when asked) or a block device (opened O_EXCL, so a mounted or
    /// held disk is refused).
    public func attach(backing: String, size: UInt64? = nil, name: String? = nil) throws(BlksnapError) -> Attached {
        // The size comes from the control socket: a file cannot be larger
        // than off_t holds, and the conversion below would trap on more.
        if let size, size > UInt64(Int64.max) {
            throw BlksnapError(.outOfRange, "size \(size) bytes is larger than any file can be (\(Int64.max) bytes)")
        }
        if !isURI(backing) {
            var st = stat()
            if stat(backing, &st) != 0, errno == ENOENT, size != nil {
                // A new image file: created here, grown below.
                let fd = open(backing, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0o600)
                if fd >= 0 { close(fd) }
            }
            guard stat(backing, &st) == 0 else {
                throw BlksnapError(Errno(rawValue: errno), "cannot attach \(backing)")
            }
            if st.st_mode & S_IFMT != S_IFBLK, let size, UInt64(st.st_size) < size {
                guard truncate(backing, off_t(size)) == 0 else {
                    throw BlksnapError(Errno(rawValue: errno), "cannot grow \(backing) to \(size) bytes")
                }
            }
        }
        return try attach(backing: openBacking(backing), label: backing, name: name)
    }

    /// Routes an opened store (a file, a block device, an NBD export);
    /// `label` is how it is opened again after a crash.
    public func attach(backing: any BlockDevice, label: String, name: String? = nil) throws(BlksnapError) -> Attached {
        guard let engine = lock.withLock({ engine }) else { throw BlksnapError(.ioError, "the data plane is not started") }
        guard backing.size >= 4096 else { throw BlksnapError(.invalidArgument, "\(label) is too small to be a disk") }
        if let name {
            guard DeclaredDevices.isValidName(name) else {
                throw BlksnapError(.invalidArgument, "\(name) is not a device name (letters, digits, '.', '_', '-'; at most 64)")
            }
            if let other = lock.withLock({ routed.values.first { $0.name == name } }) {
                throw BlksnapError(.fileExists, "the name \(name) is taken by \(other.made.node)")
            }
        }
        if let other = lock.withLock({ routed.values.first { $0.backing == label } }) {
            throw BlksnapError(.resourceBusy, "\(label) is routed already, by \(other.made.node)")
        }
        let made = try maker.reserve(image: false)
        let backend = Self.backend(routing: label)
        let device: RoutedDevice
        do throws(BlksnapError) {
            device = try engine.route(made.devId, backing: backing, store: store(for: label, backing: backing))
            do throws(BlksnapError) {
                try maker.bind(made, to: device, backend: backend)
            } catch {
                try? engine.unroute(made.devId)
                throw error
            }
        } catch {
            maker.release(made)
            throw error
        }
        let link = added(made, device: device, label: label, backend: backend, name: name)
        logger.info("blksnapd: \(made.node) (\(made.devId)) routes \(label)\(link.map { ", linked as \($0)" } ?? "")")
        return Attached(node: made.node, devId: made.devId.description, backing: label, sizeBytes: backing.size, link: link)
    }

    @discardableResult
    func added(_ made: MadeDevice, device: RoutedDevice, label: String, backend: String, name: String? = nil,
               live: SavedDevices.Live? = nil) -> String? {
        var links: [String] = []
        var stable: String?
        if let devDirectory {
            // The upstream shell tests find devices through /dev/block; udev
            // makes that link where it runs, so one already there is left be.
            mkdir(devDirectory + "/block", 0o755)
            let blockLink = devDirectory + "/block/\(made.devId.major):\(made.devId.minor)"
            var st = stat()
            if lstat(blockLink, &st) != 0, symlink(made.node, blockLink) == 0 { links.append(blockLink) }
        }
        if let name, let devDirectory {
            let linkDirectory = devDirectory + "/disk/by-blksnap"
            let path = linkDirectory + "/" + name
            makeDirectories(linkDirectory)
            unlink(path)
            // A live-routed volume is used through its own node; the NBD
            // device under it must not be mounted a second time.
            if symlink(live.map { "/dev/mapper/" + $0.name } ?? made.node, path) == 0 {
                links.append(path)
                stable = path
            } else {
                logger.error("blksnapd: cannot make the link \(path): \(String(cString: strerror(errno)))")
            }
        }
        lock.withLock {
            routed[device.devId] = Routed(made: made, backing: label, backend: backend, size: device.size, live: live,
                                         name: name, links: links)
            persist()
        }
        onDevice?(.added(name: made.name, device: device, devId: made.devId, original: nil))
        return stable
    }

    private func makeDirectories(_ path: String) {
        var prefix = ""
        for part in path.split(separator: "/") {
            prefix += "/" + part
            mkdir(prefix, 0o755)
        }
    }

    /// The store of `label`'s CBT map, named by a hash of the label (the
    /// same file comes back for the same backing) and knowing how to tell
    /// whether the backing is still the one it was saved for.
    func store(for label: String, backing: any BlockDevice) -> CbtStore? {
        guard let cbtDirectory else { return nil }
        makeDirectories(cbtDirectory)
        let uri = isURI(label)
        let size = backing.size
        return CbtStore(directory: cbtDirectory, key: Self.key(label), syncIntervalSeconds: cbtSyncIntervalSeconds) {
            if uri { return BackingIdentity(kind: .uri, label: label, size: size) }
            var st = stat()
            guard stat(label, &st) == 0 else { return BackingIdentity(kind: .other, label: label, size: 0) }
            if st.st_mode & S_IFMT == S_IFBLK {
                return BackingIdentity(kind: .blockDevice, label: label, size: size, device: UInt64(st.st_rdev))
            }
            return BackingIdentity(kind: .file, label: label, size: UInt64(st.st_size), device: UInt64(st.st_dev),
                                   inode: UInt64(st.st_ino),
                                   mtimeNs: Int64(st.st_mtim.tv_sec) * 1_000_000_000 + Int64(st.st_mtim.tv_nsec))
        }
    }

    /// A file name for a backing's saved CBT: FNV-1a of the label.
    static func key(_ label: String) -> String {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in label.utf8 { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3 }
        let hex = String(hash, radix: 16)
        return String(repeating: "0", count: 16 - hex.count) + hex
    }

    private func isURI(_ text: String) -> Bool {
        ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://", "nbd+vsock://"].contains(where: text.hasPrefix)
    }

    /// Opens a backing as attach names it.
    func openBacking(_ backing: String) throws(BlksnapError) -> any BlockDevice {
        if isURI(backing) {
            guard let openURI else { throw BlksnapError(.notSupported, "this blksnapd cannot open NBD URIs") }
            return try openURI(backing)
        }
        var st = stat()
        let isBlock = stat(backing, &st) == 0 && st.st_mode & S_IFMT == S_IFBLK
        do throws(BlksnapError) {
            return try FileBlockDevice(path: backing, exclusive: isBlock)
        } catch where error.errno == .resourceBusy {
            throw BlksnapError(.resourceBusy, "\(backing) is mounted or held by another program; unmount it first")
        }
    }

    /// The name the kernel keeps for what a device serves (nbd's backend,
    /// at most 255 bytes): a device that shows another one after a crash
    /// is not ours.
    static func backend(routing label: String) -> String {
        let name = "blksnap-swift routes " + label
        guard name.utf8.count > 200 else { return name }
        // FNV-1a: a long label still gets a stable, short name.
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in label.utf8 { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3 }
        return "blksnap-swift routes #" + String(hash, radix: 16)
    }

    /// Undoes attach: refused while the device is in a snapshot or mounted;
    /// flushes so the backing store is consistent.
    public func detach(_ devId: DevId) throws(BlksnapError) {
        guard let engine = lock.withLock({ engine }) else { throw BlksnapError(.ioError, "the data plane is not started") }
        guard let r = lock.withLock({ routed[devId] }) else {
            throw BlksnapError(.noSuchAddressOrDevice, "\(devId) is not a routed device")
        }
        if let live = r.live {
            throw BlksnapError(.invalidArgument, "/dev/mapper/\(live.name) is live-routed; `blksnapctl detach --live` gives it its own table back")
        }
        if let m = Quiesce.mountpoints(of: devId).first {
            throw BlksnapError(.resourceBusy, "\(r.made.node) is mounted on \(m); unmount it first")
        }
        let node = open(r.made.node, O_RDONLY | O_CLOEXEC)
        if node >= 0 {
            fsync(node)
            close(node)
        }
        try engine.unroute(devId)   // refuses a device in a snapshot, before anything is undone
        onDevice?(.removed(name: r.made.name))
        maker.unbind(r.made)
        maker.release(r.made)
        for l in r.links { unlink(l) }
        lock.withLock {
            _ = routed.removeValue(forKey: devId)
            persist()
        }
        logger.info("blksnapd: \(r.made.node) detached; \(r.backing) is consistent")
    }

    /// The name a routed device was given, if any.
    public func name(of devId: DevId) -> String? { lock.withLock { routed[devId]?.name } }

    /// Finds a routed device by name, stable link, node path or major:minor text.
    public func resolve(_ text: String) -> DevId? {
        let all = lock.withLock { Array(routed.values) }
        if let r = all.first(where: {
            $0.made.node == text || $0.made.devId.description == text || $0.devId.description == text
                || ($0.name != nil && ($0.name == text || $0.links.contains(text)))
        }) { return r.devId }
        var st = stat()
        if stat(text, &st) == 0, st.st_mode & S_IFMT == S_IFBLK {
            return DevId(major: blksnap_major(st.st_rdev), minor: blksnap_minor(st.st_rdev))
        }
        return nil
    }

    // MARK: SnapshotHooks

    public func quiesce(_ devices: [RoutedDevice]) throws(BlksnapError) -> @Sendable () -> Void {
        try checkLiveTables(devices.map(\.devId))
        let nodes = lock.withLock {
            devices.map { d in (devId: d.devId, node: routed[d.devId].map { $0.live.map { "/dev/mapper/" + $0.name } ?? $0.made.node } ?? "") }
        }
        // Freeze's fsync of each node already reaches the engine's flush
        // (loop's flush becomes a FUSE fsync, kernel NBD sends FLUSH).
        return Quiesce.freeze(devices: nodes, logger: logger)
    }

    public func publish(_ image: SnapImage) throws(BlksnapError) -> DevId {
        let made = try maker.reserve(image: true)
        let backend = "blksnap-swift image of \(image.originalDevId)"
        do throws(BlksnapError) {
            try maker.bind(made, to: image, backend: backend)
        } catch {
            maker.release(made)
            throw error
        }
        // What libblksnap opens, and what the upstream shell tests name.
        var nodes: [String] = []
        let imageNode = "/dev/blksnap-image\(made.devId.minor)"
        unlink(imageNode)
        if mknod(imageNode, S_IFBLK | 0o600, blksnap_makedev(made.devId.major, made.devId.minor)) == 0 {
            nodes.append(imageNode)
        }
        mkdir("/dev/block", 0o755)
        let link = "/dev/block/\(made.devId.major):\(made.devId.minor)"
        var st = stat()
        if lstat(link, &st) != 0, symlink("../\(made.name)", link) == 0 { nodes.append(link) }
        lock.withLock {
            images[ObjectIdentifier(image)] = (made, nodes, backend)
            persist()
        }
        onDevice?(.added(name: "blksnap-image\(made.devId.minor)", device: image, devId: made.devId,
                         original: image.originalDevId))
        return made.devId
    }

    public func withdraw(_ image: SnapImage) {
        let entry = lock.withLock { () -> (made: MadeDevice, nodes: [String], backend: String)? in
            defer { persist() }
            return images.removeValue(forKey: ObjectIdentifier(image))
        }
        guard let entry else { return }
        onDevice?(.removed(name: "blksnap-image\(entry.made.devId.minor)"))
        removeImageDevice(entry.made, nodes: entry.nodes)
    }

    private func removeImageDevice(_ made: MadeDevice, nodes: [String]) {
        for n in nodes { unlink(n) }
        maker.unbind(made)
        maker.release(made)
    }
}

// MARK: declared devices

extension DataPlane {
    /// Routes every declared device (blksnapd does this at start, before it
    /// reports ready). A backing that is missing, changed size or cannot be
    /// opened is skipped with a log line and its state kept for status;
    /// every other device is still routed. A device already routed for the
    /// same backing (taken over after a crash) gets its name.
    @discardableResult
    public func route(declared: DeclaredDevices) -> [DeclaredState] {
        var states: [DeclaredState] = []
        for d in declared.devices {
            var state = DeclaredState(device: d, state: "routed", why: nil, devId: nil)
            let existing = lock.withLock { routed.values.first { $0.backing == d.backing } } ?? liveRoute(of: d)
            do throws(BlksnapError) {
                if let existing {
                    state.devId = existing.devId
                    if existing.name != d.name {
                        logger.warning("blksnapd: \(d.backing) is routed already by \(existing.made.node); it keeps its name")
                    }
                } else if d.live {
                    var st = stat()
                    guard stat(d.backing, &st) == 0 else {
                        state.state = "missing"
                        throw BlksnapError(Errno(rawValue: errno), "\(d.backing) is not there")
                    }
                    let attached = try attachLive(d.backing, name: d.name)
                    if let size = d.sizeBytes, attached.sizeBytes != size {
                        logger.warning("blksnapd: declared device \(d.name): \(d.backing) holds \(attached.sizeBytes) bytes, not the declared \(size); routed all the same, as LVM may have resized it")
                    }
                    state.devId = resolve(attached.devId)
                } else {
                    if !isURI(d.backing) {
                        var st = stat()
                        guard stat(d.backing, &st) == 0 else {
                            state.state = "missing"
                            throw BlksnapError(Errno(rawValue: errno), "\(d.backing) is not there")
                        }
                    }
                    let backing = try openBacking(d.backing)
                    if let size = d.sizeBytes, backing.size != size {
                        state.state = "refused"
                        throw BlksnapError(.invalidArgument, "\(d.backing) holds \(backing.size) bytes, not the declared \(size)")
                    }
                    let attached = try attach(backing: backing, label: d.backing, name: d.name)
                    state.devId = resolve(attached.devId)
                }
            } catch {
                if state.state == "routed" { state.state = "refused" }
                state.why = error.message
                logger.error("blksnapd: declared device \(d.name) (\(d.file):\(d.line)) is not routed: \(error.message)")
            }
            states.append(state)
        }
        lock.withLock { self.declared = states }
        return states
    }

    /// The live route of the dm device a live declaration names, if any
    /// (taken over after a crash, or routed by hand before).
    private func liveRoute(of d: DeclaredDevices.Device) -> Routed? {
        guard d.live else { return nil }
        var st = stat()
        guard stat(d.backing, &st) == 0, st.st_mode & S_IFMT == S_IFBLK else { return nil }
        let devId = DevId(major: blksnap_major(st.st_rdev), minor: blksnap_minor(st.st_rdev))
        return lock.withLock { routed[devId].flatMap { $0.live == nil ? nil : $0 } }
    }

    /// The declared devices' states since the last `route(declared:)`,
    /// with a device detached since shown as such.
    public var declaredStates: [DeclaredState] {
        lock.withLock {
            declared.map { s in
                var s = s
                if s.state == "routed", let devId = s.devId, routed[devId] == nil { (s.state, s.why) = ("detached", nil) }
                return s
            }
        }
    }

    /// Whether "/" (as this process sees it) is mounted on a device this
    /// plane routes, or `devId` (another root's device) is one.
    public func servesRoot(orDevice devId: DevId? = nil) -> Bool {
        let all = lock.withLock { routed.values.map(\.devId) }
        return all.contains { $0 == devId || Quiesce.mountpoints(of: $0).contains("/") }
    }

    /// Node of each device this plane made, by major:minor text, for status.
    public var nodes: [String: String] {
        lock.withLock {
            var out: [String: String] = [:]
            for r in routed.values { out[r.devId.description] = r.node }
            for i in images.values { out[i.made.devId.description] = i.nodes.first ?? i.made.node }
            return out
        }
    }

    /// Routed devices' connections where their kind has several, as
    /// "serving/made" by major:minor text, for status: fewer serving than
    /// made means some died and the kernel has fewer queues until a
    /// restart hands it new ones.
    public var connections: [String: String] {
        let all = lock.withLock { Array(routed.values) }
        var out: [String: String] = [:]
        for r in all {
            if let serving = maker.servingConnections(r.made) { out[r.devId.description] = "\(serving)/\(r.made.connections)" }
        }
        return out
    }

    /// Name of each named routed device, by major:minor text, for status.
    public var names: [String: String] {
        lock.withLock {
            var out: [String: String] = [:]
            for r in routed.values { if let n = r.name { out[r.devId.description] = n } }
            return out
        }
    }
}
