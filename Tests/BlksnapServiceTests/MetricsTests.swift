import BlksnapABI
import BlksnapControlProtocol
import BlksnapEngine
import Logging
import Testing
@testable import BlksnapService
import BlksnapTestSupport
#if canImport(Glibc)
import Glibc
#endif

/// The value of the one sample of `name` whose labels include `labels`.
func sample(_ text: String, _ name: String, _ labels: [String: String] = [:]) -> Double? {
    let found = text.split(separator: "\n").filter { line in
        guard !line.hasPrefix("#"), line.hasPrefix(name) else { return false }
        let rest = line.dropFirst(name.count)
        guard rest.first == " " || rest.first == "{" else { return false }
        return labels.allSatisfy { line.contains("\($0.key)=\"\($0.value)\"") }
    }
    guard found.count == 1, let value = found[0].split(separator: " ").last else { return nil }
    return Double(value)
}

func quietLogger() -> Logger {
    var l = Logger(label: "test")
    l.logLevel = .critical
    return l
}

@Suite struct MetricsExporterTests {
    @Test func countersFollowTheIOAndTheSnapshotCycle() throws {
        var settings = EngineSettings()
        settings.chunkMinimumShift = 16
        settings.diffStorageMinimum = 4096
        let engine = Engine(settings: settings, hooks: VirtualImages(), logger: quietLogger())
        let diskId = DevId(major: 250, minor: 0), storeId = DevId(major: 250, minor: 1)
        let disk = try engine.route(diskId, backing: MemoryBlockDevice(size: 4 << 20))
        try engine.route(storeId, backing: MemoryBlockDevice(size: 8 << 20))
        let exporter = MetricsExporter(engine: engine, status: { DaemonStatus(engine: engine.status()) })
        let d = ["device": "250:0"]

        var text = String(decoding: exporter.render(), as: UTF8.self)
        #expect(sample(text, "blksnap_routed_requests_total", d.merging(["op": "write"]) { a, _ in a }) == 0)
        #expect(sample(text, "blksnap_snapshots_alive") == 0)
        #expect(sample(text, "blksnap_routed_devices") == 2)

        let block = [UInt8](repeating: 7, count: 4096)
        for i in 0..<3 { try block.withUnsafeBytes { try disk.write($0, at: UInt64(i) * 4096) } }
        var into = [UInt8](repeating: 0, count: 8192)
        for _ in 0..<2 { try into.withUnsafeMutableBytes { try disk.read(into: $0, at: 0) } }
        try disk.discard(at: 1 << 20, length: 65536)

        let id = try engine.createSnapshot([diskId])
        try engine.appendStorage(id, device: storeId, ranges: [SectorRange(offset: 0, count: 8192)])
        try engine.takeSnapshot(id)
        // Two chunks of 64 KiB touched after TAKE: two copies, then rewrites copy nothing.
        for offset: UInt64 in [0, 65536, 4096, 65536 + 8192] {
            try block.withUnsafeBytes { try disk.write($0, at: offset) }
        }

        text = String(decoding: exporter.render(), as: UTF8.self)
        func v(_ op: String) -> (Double?, Double?) {
            let l = d.merging(["op": op]) { a, _ in a }
            return (sample(text, "blksnap_routed_requests_total", l), sample(text, "blksnap_routed_bytes_total", l))
        }
        #expect(v("write") == (7, 7 * 4096))
        #expect(v("read") == (2, 2 * 8192))
        #expect(v("discard") == (1, 65536))
        #expect(sample(text, "blksnap_chunks_copied_total", d) == 2)
        #expect(sample(text, "blksnap_snapshots_alive") == 1)
        #expect(sample(text, "blksnap_snapshots_created_total") == 1)
        #expect(sample(text, "blksnap_trackers") == 1)
        let s = ["snapshot": id.description]
        #expect(sample(text, "blksnap_diff_storage_capacity_bytes", s) == Double(8192 * 512))
        #expect(sample(text, "blksnap_diff_storage_filled_bytes", s) == Double(2 * 65536))
        #expect(sample(text, "blksnap_events_total", ["kind": "low_free_space"]) == 1)
        #expect(sample(text, "blksnap_events_total", ["kind": "corrupted"]) == 0)
        #expect(sample(text, "blksnap_cbt_trackers_total", ["origin": "started_anew"]) == 1)
        #expect(sample(text, "blksnap_cbt_trackers_total", ["origin": "restored"]) == 0)
        #expect(text.contains("# TYPE blksnap_routed_bytes_total counter"))
        #expect(text.contains("# TYPE blksnap_snapshots_alive gauge"))

        try engine.destroySnapshot(id)
        engine.counters.countCbt(.restoredAfterCrash)
        text = String(decoding: exporter.render(), as: UTF8.self)
        #expect(sample(text, "blksnap_snapshots_alive") == 0)
        #expect(sample(text, "blksnap_diff_storage_filled_bytes", s) == nil)
        #expect(sample(text, "blksnap_cbt_trackers_total", ["origin": "restored_after_crash"]) == 1)
    }

    @Test func declaredDevicesAreCountedByState() {
        let engine = Engine(logger: quietLogger())
        let exporter = MetricsExporter(engine: engine) {
            var s = DaemonStatus(engine: engine.status())
            s.declared = [
                DeclaredDevice(name: "a", backing: "/a", state: .routed, cbtOrigin: .restored),
                DeclaredDevice(name: "b", backing: "/b", state: .missing, reason: "no such file"),
                DeclaredDevice(name: "c", backing: "/c", state: .routed),
            ]
            return s
        }
        let text = String(decoding: exporter.render(), as: UTF8.self)
        #expect(sample(text, "blksnap_declared_devices", ["state": "routed"]) == 2)
        #expect(sample(text, "blksnap_declared_devices", ["state": "missing"]) == 1)
        #expect(sample(text, "blksnap_declared_devices", ["state": "refused"]) == 0)
    }
}
