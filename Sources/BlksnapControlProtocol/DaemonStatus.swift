/// What `blksnapctl status` gets: the engine's picture, completed with what
/// only blksnapd knows (its NBD exports, the devices of its configuration),
/// so the engine never holds an NBD URI.
public struct DaemonStatus: Codable, Sendable, Equatable {
    /// What blksnapd exports over NBD: one per routed device and image.
    public struct ExportInfo: Codable, Sendable, Equatable {
        public var name: String
        public var devId: String
        public var uri: String
        public init(name: String, devId: String, uri: String) {
            (self.name, self.devId, self.uri) = (name, devId, uri)
        }
    }
    public var devices: [EngineStatus.Device]
    public var trackers: [EngineStatus.TrackerInfo]
    public var snapshots: [EngineStatus.SnapshotInfo]
    public var exports: [ExportInfo] = []
    /// Devices declared in blksnapd's configuration, routed or not.
    public var declared: [DeclaredDevice] = []

    public init(engine: EngineStatus, exports: [ExportInfo] = [], declared: [DeclaredDevice] = []) {
        (devices, trackers, snapshots) = (engine.devices, engine.trackers, engine.snapshots)
        (self.exports, self.declared) = (exports, declared)
    }

    // Fields added later decode with their defaults, so a blksnapctl reads
    // the status of an older blksnapd.
    private enum CodingKeys: String, CodingKey { case devices, trackers, snapshots, exports, declared }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        devices = try c.decode([EngineStatus.Device].self, forKey: .devices)
        trackers = try c.decode([EngineStatus.TrackerInfo].self, forKey: .trackers)
        snapshots = try c.decode([EngineStatus.SnapshotInfo].self, forKey: .snapshots)
        exports = try c.decodeIfPresent([ExportInfo].self, forKey: .exports) ?? []
        declared = try c.decodeIfPresent([DeclaredDevice].self, forKey: .declared) ?? []
    }
}
