import BlksnapEngine
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// After a kill -9: every change to what a data plane made is written to
/// its saved list (`SavedDevices`, devices.json in the state directory),
/// and the next blksnapd's `start` hands the list it finds to `recover`,
/// which serves the routed devices again where the maker can (kernel NBD)
/// and undoes the rest.
extension DataPlane {
    /// Takes over the devices of a blksnapd that died: routed devices are
    /// served again where the maker can keep them alive (kernel NBD), so
    /// that what is mounted on them carries on; images are undone, since
    /// their snapshots died with the engine's memory (as with the module,
    /// snapshots and change tracking do not outlive it).
    func recover(_ saved: SavedDevices, engine: Engine) {
        var others = SavedDevices()
        for image in saved.images {
            guard image.kind == maker.kind else {
                others.images.append(image)
                continue
            }
            for n in image.nodes ?? [] { unlink(n) }
            maker.abandon(image.made, backend: image.backend)
            logger.warning("blksnapd: removed \(image.node), an image of a snapshot that died with the previous blksnapd")
        }
        for d in saved.routed {
            guard d.kind == maker.kind, let label = d.backing else {
                logger.warning("blksnapd: \(d.node) was made as a \(d.kind) device by a blksnapd that died; this one makes \(maker.kind) devices and leaves it alone")
                others.routed.append(d)
                continue
            }
            do throws(BlksnapError) {
                let backing = try openBacking(label)
                guard backing.size == d.sizeBytes ?? backing.size else {
                    throw BlksnapError(.invalidArgument, "\(label) now holds \(backing.size) bytes, not \(d.sizeBytes ?? 0)")
                }
                // A live route keeps the device-mapper device's number.
                let routedId = d.live?.devId ?? d.made.devId
                let device = try engine.route(routedId, backing: backing, store: store(for: label, backing: backing))
                do throws(BlksnapError) {
                    try maker.reclaim(d.made, as: device, backend: d.backend)
                } catch {
                    // Never served a write: its CBT stays as restored, so a
                    // new attach still knows it follows a crash.
                    try? engine.unroute(routedId, saveCbt: false)
                    throw error
                }
                added(d.made, device: device, label: label, backend: d.backend, name: d.declaredName, live: d.live)
                logger.notice("blksnapd: \(d.node) (\(d.made.devId)) routes \(label) again; what the previous blksnapd acknowledged is there, and waiting requests go on")
            } catch {
                maker.abandon(d.made, backend: d.backend)
                logger.error("blksnapd: \(d.node) cannot be served again (\(error.message)); it fails its requests. Unmount what is on it, then `blksnapctl attach \(label)` routes the same data anew")
            }
        }
        lock.withLock {
            foreign = others
            persist()
        }
    }

    /// Writes the saved list; under `lock`. A list that cannot be written
    /// is logged, not thrown: the device itself is fine, only a crash
    /// could not be recovered from.
    func persist() {
        guard let listPath else { return }
        var list = foreign
        let kind = maker.kind
        for r in routed.values.sorted(by: { $0.made.index < $1.made.index }) {
            var saved = SavedDevices.Device(kind: kind, made: r.made, backend: r.backend, backing: r.backing, sizeBytes: r.size)
            saved.live = r.live
            saved.declaredName = r.name
            list.routed.append(saved)
        }
        for i in images.values.sorted(by: { $0.made.index < $1.made.index }) {
            list.images.append(.init(kind: kind, made: i.made, backend: i.backend, nodes: i.nodes))
        }
        do {
            try list.store(to: listPath)
        } catch {
            logger.error("blksnapd: \(error); a blksnapd started after a crash will not find these devices")
        }
    }
}
