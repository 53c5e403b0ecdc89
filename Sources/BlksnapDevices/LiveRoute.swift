import BlksnapABI
import BlksnapEngine
import CBlksnapLinux
import Logging
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Routing a device-mapper device that is already mounted and written
/// (an LVM logical volume), without unmounting it.
///
/// A second, hidden dm device gets the same table, so it reaches the same
/// storage; a routed kernel NBD device serves it; then the original is
/// suspended (dm drains what is in flight, and freezes a filesystem on
/// it), its table replaced by one linear target onto the NBD device, and
/// resumed. The original keeps its name, number and mounts, and from then
/// on each of its writes reaches the engine before the storage: the engine
/// routes it under the original's own number, which is what the tools
/// name. Only kernel NBD will do: a dm table can map onto any block device,
/// but a FUSE+loop device dies with blksnapd, and the volume with it.
///
/// Only tables of linear and striped targets are copied: they map sectors
/// and hold nothing else, so two devices with the same table see the same
/// data. While a volume is live-routed, LVM must not change its table
/// (lvextend, lvreduce, pvmove, lvremove, lvconvert): LVM would load a
/// table from its metadata and the volume's writes would stop passing
/// through the engine. Each TAKE checks the table still maps onto our
/// device and refuses (ENODEV) if it does not.
extension DataPlane {
    static let kernelNbdKind = "kernel NBD"

    /// `blksnapctl attach --live /dev/mapper/NAME` (or /dev/VG/LV, /dev/dm-N);
    /// `name` gives it the stable link /dev/disk/by-blksnap/NAME.
    public func attachLive(_ path: String, name stableName: String? = nil) throws(BlksnapError) -> Attached {
        guard let engine = lock.withLock({ engine }) else { throw BlksnapError(.ioError, "the data plane is not started") }
        guard maker.kind == Self.kernelNbdKind else {
            throw BlksnapError(.operationNotSupportedByDevice,
                               "live routing needs kernel NBD devices, and this blksnapd makes \(maker.kind) ones: "
                               + "load the driver (modprobe nbd max_part=0) and start blksnapd with --devices nbd")
        }
        var st = stat()
        guard stat(path, &st) == 0 else { throw BlksnapError(Errno(rawValue: errno), "cannot attach \(path)") }
        guard st.st_mode & S_IFMT == S_IFBLK else {
            throw BlksnapError(.invalidArgument, "\(path) is not a block device; --live routes device-mapper devices")
        }
        let devId = DevId(major: blksnap_major(st.st_rdev), minor: blksnap_minor(st.st_rdev))
        guard let name = DeviceMapper.name(of: devId) else {
            throw BlksnapError(.invalidArgument,
                               "\(path) (\(devId)) is not a device-mapper device; --live routes LVM volumes and other dm devices, "
                               + "`blksnapctl attach` without --live routes an unmounted disk")
        }
        if let stableName {
            guard DeclaredDevices.isValidName(stableName) else {
                throw BlksnapError(.invalidArgument, "\(stableName) is not a device name (letters, digits, '.', '_', '-'; at most 64)")
            }
            if let other = lock.withLock({ routed.values.first { $0.name == stableName } }) {
                throw BlksnapError(.fileExists, "the name \(stableName) is taken by \(other.node)")
            }
        }
        guard lock.withLock({ routed[devId] == nil }), !name.hasPrefix(Self.basePrefix) else {
            throw BlksnapError(.resourceBusy, "\(path) (\(name)) is live-routed already")
        }
        let table = try DeviceMapper.table(name)
        if let odd = table.first(where: { !DeviceMapper.supportedTargets.contains($0.type) }) {
            throw BlksnapError(.invalidArgument,
                               "\(name) has a \(odd.type) target; live routing copies tables of "
                               + DeviceMapper.supportedTargets.sorted().joined(separator: " and ") + " targets only")
        }
        if table.contains(where: { $0.arguments.split(separator: " ").contains { $0.hasPrefix("43:") || $0.hasPrefix("/dev/nbd") } }) {
            throw BlksnapError(.resourceBusy, "\(name) maps onto an nbd device: it is routed already")
        }
        let sectors = DeviceMapper.sectors(table)
        let ownTable = try saveTable(table.map { $0.line }, name: name, suffix: "table")
        let base = Self.basePrefix + name
        try DeviceMapper.dmsetup(["create", base, ownTable])
        // Where no udev makes /dev/mapper nodes (an initramfs, the lane).
        _ = try? DeviceMapper.dmsetup(["mknodes", base])
        var undo: [() -> Void] = [{ _ = try? DeviceMapper.dmsetup(["remove", base]) }]
        func unwind() { for u in undo.reversed() { u() } }
        do throws(BlksnapError) {
            let label = "/dev/mapper/" + base
            let backing = try FileBlockDevice(path: label, exclusive: true)
            guard backing.size == sectors << 9 else {
                throw BlksnapError(.ioError, "\(label) holds \(backing.size) bytes, not the \(sectors << 9) its table maps")
            }
            let made = try maker.reserve(image: false)
            undo.append { [maker] in maker.release(made) }
            let backend = Self.backend(routing: "live " + name)
            let device = try engine.route(devId, backing: backing)
            undo.append { _ = try? engine.unroute(devId) }
            try maker.bind(made, to: device, backend: backend)
            undo.append { [maker] in maker.unbind(made) }
            let routedTable = try saveTable(["0 \(sectors) linear \(made.node) 0"], name: name, suffix: "routed")
            try DeviceMapper.swapTable(of: name, toTableIn: routedTable)
            let live = SavedDevices.Live(name: name, devId: devId, tableFile: ownTable)
            let link = added(made, device: device, label: label, backend: backend, name: stableName, live: live)
            logger.notice("blksnapd: /dev/mapper/\(name) (\(devId)) is live-routed through \(made.node); its writes reach the engine first. If blksnapd cannot come back, \(live.restoreHint)")
            return Attached(node: "/dev/mapper/" + name, devId: devId.description, backing: label, sizeBytes: backing.size, link: link)
        } catch {
            unwind()
            throw error
        }
    }

    /// `blksnapctl detach --live`: the device gets its own table back,
    /// live, and the hidden copy and the NBD device go. Refused while a
    /// snapshot names it. The engine lets go first, so no snapshot can be
    /// created on a device whose writes are about to stop passing through.
    public func detachLive(_ devId: DevId) throws(BlksnapError) {
        guard let engine = lock.withLock({ engine }) else { throw BlksnapError(.ioError, "the data plane is not started") }
        guard let r = lock.withLock({ routed[devId] }), let live = r.live else {
            throw BlksnapError(.noSuchAddressOrDevice, "\(devId) is not live-routed")
        }
        // A detach that failed after this left the device unrouted, still
        // served through NBD: carry on from there.
        if engine.routedDevice(devId) != nil { try engine.unroute(devId) }
        do throws(BlksnapError) {
            try DeviceMapper.swapTable(of: live.name, toTableIn: live.tableFile)
        } catch {
            logger.error("blksnapd: /dev/mapper/\(live.name) still maps onto \(r.made.node), which keeps serving it: \(error.message); \(live.restoreHint)")
            throw error
        }
        onDevice?(.removed(name: r.made.name))
        maker.unbind(r.made)
        maker.release(r.made)
        for l in r.links { unlink(l) }
        do throws(BlksnapError) {
            try DeviceMapper.dmsetup(["remove", Self.basePrefix + live.name])
        } catch {
            logger.warning("blksnapd: \(error.message); remove it with dmsetup remove \(Self.basePrefix + live.name)")
        }
        lock.withLock {
            _ = routed.removeValue(forKey: devId)
            persist()
        }
        unlink(live.tableFile)
        unlink(tableDirectory + "/\(live.name).routed")
        logger.info("blksnapd: /dev/mapper/\(live.name) has its own table back and is no longer routed")
    }

    /// Whether each live-routed device among `devIds` still maps onto its
    /// NBD device: LVM may have loaded a table of its own since.
    func checkLiveTables(_ devIds: [DevId]) throws(BlksnapError) {
        let entries = lock.withLock { devIds.compactMap { routed[$0] } }
        for r in entries {
            guard let live = r.live else { continue }
            let table = try DeviceMapper.table(live.name)
            let ours = table.count == 1 && table[0].type == "linear"
                && [r.made.node, r.made.devId.description].contains(String(table[0].arguments.split(separator: " ").first ?? ""))
            guard ours else {
                throw BlksnapError(.operationNotSupportedByDevice,
                                   "/dev/mapper/\(live.name) no longer maps onto \(r.made.node) (was its table changed by LVM?): "
                                   + "its writes may not reach the engine; detach --live and attach --live it again")
            }
        }
    }

    static let basePrefix = "blksnap-base-"

    /// Where live tables are kept: beside the saved list, or /run/blksnap.
    var tableDirectory: String {
        let dir = listPath.map { path in String(path[..<(path.lastIndex(of: "/") ?? path.endIndex)]) } ?? "/run/blksnap"
        return dir + "/live"
    }

    /// Writes a table (one line a target) with fsync, for dmsetup to read.
    private func saveTable(_ lines: [String], name: String, suffix: String) throws(BlksnapError) -> String {
        mkdir(tableDirectory, 0o700)
        let path = tableDirectory + "/\(name).\(suffix)"
        do {
            let fd = try FileDescriptor.open(path, .writeOnly, options: [.create, .truncate, .closeOnExec],
                                             permissions: [.ownerReadWrite])
            try fd.closeAfter {
                _ = try fd.writeAll(Array((lines.joined(separator: "\n") + "\n").utf8))
                fsync(fd.rawValue)
            }
        } catch {
            throw BlksnapError(error as? Errno ?? .ioError, "cannot write \(path)")
        }
        return path
    }
}
