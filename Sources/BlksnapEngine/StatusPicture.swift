import BlksnapABI
import BlksnapControlProtocol

/// Something that can say what a backing store is, for status.
public protocol Describable {
    var displayName: String { get }
}

extension Engine {
    /// One consistent picture, taken under the control lock.
    public func status() -> EngineStatus {
        lock.withLock {
            let trackerInfos = trackerOrder.map { devId -> EngineStatus.TrackerInfo in
                let t = trackers[devId]!
                let info = t.cbtMap.info(devId: devId)
                return .init(devId: devId.description, blockSize: info.blockSize, blockCount: info.blockCount,
                             capacityBytes: info.deviceCapacity, generationId: info.generationId.description,
                             snapNumber: info.snapNumber, snapshot: t.snapshot?.id.description, cbtOrigin: t.cbtOrigin)
            }
            let snapshotInfos = snapshots.map { s in
                EngineStatus.SnapshotInfo(
                    id: s.id.description, taken: s.isTaken, corrupted: s.isCorrupted, devices: s.devIds.map(\.description),
                    storageCapacitySectors: s.storage.capacitySectors, storageFilledSectors: s.storage.filledSectors,
                    storageRequestedSectors: s.storage.requestedSectors,
                    images: s.images.map {
                        .init(originalDevId: $0.originalDevId.description, imageDevId: $0.devId.description,
                              storedChunks: $0.diffArea.storedChunks, corrupted: $0.isCorrupted)
                    })
            }
            let deviceInfos = devices.values.sorted { $0.devId < $1.devId }.map { d in
                EngineStatus.Device(devId: d.devId.description, sizeBytes: d.size,
                                    backing: (d.backing as? Describable)?.displayName ?? "\(type(of: d.backing))",
                                    tracked: trackers[d.devId] != nil,
                                    cbt: d.store == nil ? nil : d.cbtOutcome.description)
            }
            return EngineStatus(devices: deviceInfos, trackers: trackerInfos, snapshots: snapshotInfos)
        }
    }
}

extension FileBlockDevice: Describable {
    public var displayName: String { path }
}
