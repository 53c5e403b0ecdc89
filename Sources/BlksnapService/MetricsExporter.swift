import BlksnapControlProtocol
import BlksnapEngine
import Prometheus

/// blksnapd's metrics in the Prometheus text format, built at scrape time
/// from what the engine counts anyway.
///
/// Every scrape fills a fresh registry from the engine's atomic counters
/// and status, so there is no second copy of any count to keep in step and
/// a device routed again simply starts its series from zero (a counter
/// reset, which Prometheus expects). The metric names are the contract with
/// the operator's dashboards; the README lists them.
public struct MetricsExporter: Sendable {
    /// What is read at each scrape: the engine, and the status the daemon
    /// completes (declared devices, exports) before showing it.
    let engine: Engine
    let status: @Sendable () -> DaemonStatus

    public init(engine: Engine, status: @escaping @Sendable () -> DaemonStatus) {
        self.engine = engine
        self.status = status
    }

    public enum Name {
        public static let requests = "blksnap_routed_requests_total"
        public static let bytes = "blksnap_routed_bytes_total"
        public static let chunksCopied = "blksnap_chunks_copied_total"
        public static let routedDevices = "blksnap_routed_devices"
        public static let trackers = "blksnap_trackers"
        public static let snapshotsAlive = "blksnap_snapshots_alive"
        public static let snapshotsCreated = "blksnap_snapshots_created_total"
        public static let storageCapacity = "blksnap_diff_storage_capacity_bytes"
        public static let storageFilled = "blksnap_diff_storage_filled_bytes"
        public static let storageRequested = "blksnap_diff_storage_requested_bytes"
        public static let events = "blksnap_events_total"
        public static let cbtTrackers = "blksnap_cbt_trackers_total"
        public static let declaredDevices = "blksnap_declared_devices"
    }

    /// The text a scrape gets.
    public func render() -> [UInt8] {
        let registry = PrometheusCollectorRegistry()
        func count(_ name: String, _ labels: [(String, String)], _ value: UInt64, _ help: String) {
            registry.makeCounter(descriptor: .init(metricName: name, unitName: "", helpText: help), labels: labels)
                .increment(by: Int64(clamping: value))
        }
        func gauge(_ name: String, _ labels: [(String, String)], _ value: UInt64, _ help: String) {
            registry.makeGauge(descriptor: .init(metricName: name, unitName: "", helpText: help), labels: labels)
                .set(to: Double(value))
        }

        let devices = engine.routedDevices
        for d in devices {
            let v = d.counters.values
            let device = d.devId.description
            let requests = "Requests routed through the engine, by device and operation."
            let bytes = "Bytes routed through the engine, by device and operation."
            for (op, n, b) in [("read", v.readRequests, v.readBytes), ("write", v.writeRequests, v.writeBytes),
                               ("discard", v.discardRequests, v.discardBytes)] {
                count(Name.requests, [("device", device), ("op", op)], n, requests)
                count(Name.bytes, [("device", device), ("op", op)], b, bytes)
            }
            count(Name.chunksCopied, [("device", device)], v.chunksCopied,
                  "Chunks of the original copied to the difference storage before a write overwrote them.")
        }
        let status = status()
        gauge(Name.routedDevices, [], UInt64(devices.count), "Devices routed through the engine.")
        gauge(Name.trackers, [], UInt64(status.trackers.count), "Devices with change tracking.")
        gauge(Name.snapshotsAlive, [], UInt64(status.snapshots.count), "Snapshots created and not yet destroyed.")
        for s in status.snapshots {
            let labels = [("snapshot", s.id)]
            gauge(Name.storageCapacity, labels, s.storageCapacitySectors << 9, "Difference storage appended to the snapshot.")
            gauge(Name.storageFilled, labels, s.storageFilledSectors << 9, "Difference storage used by copied chunks.")
            gauge(Name.storageRequested, labels, s.storageRequestedSectors << 9,
                  "Difference storage the snapshot asked for in its events.")
        }
        let e = engine.counters.values
        count(Name.snapshotsCreated, [], e.snapshotsCreated, "Snapshots created.")
        let events = "Snapshot events posted, by kind."
        count(Name.events, [("kind", "low_free_space")], e.lowFreeSpaceEvents, events)
        count(Name.events, [("kind", "corrupted")], e.corruptedEvents, events)
        let origins = "Trackers by how their change tracking began."
        count(Name.cbtTrackers, [("origin", "restored")], e.cbtRestored, origins)
        count(Name.cbtTrackers, [("origin", "restored_after_crash")], e.cbtRestoredAfterCrash, origins)
        count(Name.cbtTrackers, [("origin", "started_anew")], e.cbtStartedAnew, origins)
        for state in DeclaredDevice.State.allCases {
            gauge(Name.declaredDevices, [("state", state.rawValue)],
                  UInt64(status.declared.count { $0.state == state }), "Devices of the configuration, by state.")
        }
        return registry.emitToBuffer()
    }

    /// The responder's handler: /metrics, else 404.
    public var handler: HTTPResponder.Handler {
        { [self] _, path in
            guard path == "/metrics" else {
                return .init(status: 404, body: Array("blksnapd serves /metrics only\n".utf8))
            }
            return .init(status: 200, contentType: "text/plain; version=0.0.4; charset=utf-8", body: render())
        }
    }
}
