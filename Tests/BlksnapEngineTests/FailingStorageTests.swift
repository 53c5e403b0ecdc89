import BlksnapABI
@testable import BlksnapEngine
import BlksnapTestSupport
import Dispatch
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

// The storage disk dies under threads: writers on two originals, readers on
// their images, and delays injected on every disk to vary the interleaving.
// The model test covers each fault one step at a time; this covers them at
// once, with a bounded wait so that a deadlock fails instead of hanging.

private let hangLimitSeconds = 30

private final class Failures: @unchecked Sendable {
    private let lock = Lock()
    private var list: [String] = []
    func add(_ s: String) { lock.withLock { if list.count < 20 { list.append(s) } } }
    var all: [String] { lock.withLock { list } }
}

private final class Log: @unchecked Sendable {
    private let lock = Lock()
    private var list: [(device: Int, offset: Int, seq: Int, count: Int)] = []
    func add(_ e: (device: Int, offset: Int, seq: Int, count: Int)) { lock.withLock { list.append(e) } }
    var all: [(device: Int, offset: Int, seq: Int, count: Int)] { lock.withLock { list } }
}

private func run(_ group: DispatchGroup, _ body: @escaping @Sendable () -> Void) {
    group.enter()
    BlksnapEngine.startThread { body(); group.leave() }
}

/// Bytes a writer puts at a place: one value per writer and sequence, so a
/// lost or reordered write shows.
private func pattern(_ w: Int, _ seq: Int, _ count: Int) -> [UInt8] {
    [UInt8](repeating: UInt8(truncatingIfNeeded: w &* 61 &+ seq &* 7 &+ 1), count: count)
}

private func same(_ a: [UInt8], _ b: ArraySlice<UInt8>) -> Bool {
    a.count == b.count && a.withUnsafeBytes { pa in b.withUnsafeBytes { pb in memcmp(pa.baseAddress!, pb.baseAddress!, a.count) == 0 } }
}

@Suite struct FailingStorageTests {
    @Test(arguments: [UInt64(0xD1E5_0001), 0xD1E5_0002, 0xD1E5_0003])
    func storageDyingUnderThreadsCorruptsOnceAndLosesNoWrite(seed: UInt64) throws {
        let size = 1 << 20
        let writers = 4
        let region = size / writers
        let rig = Rig(devices: 0, size: UInt64(size), storage: 32 << 20)
        let injector = FaultInjector(seed: seed, rules: [
            // 40 chunk copies succeed, then every storage write fails.
            FaultRule(devices: ["storage"], kinds: [.write], when: .from(40), effects: [.fail(.ioError), .short(.ioError)]),
            FaultRule(when: .random(0.05), effects: [.delay(microseconds: 200)]),
        ])
        rig.host.disks[Rig.storageId] = FaultyBlockDevice(rig.storageDisk, name: "storage", injector: injector)
        let devices = try (0..<2).map { d in
            try rig.engine.route(DevId(major: 7, minor: UInt32(d)),
                                 backing: FaultyBlockDevice(MemoryBlockDevice(size: UInt64(size)), name: "dev\(d)", injector: injector))
        }
        let healthyId = DevId(major: 8, minor: 1)
        rig.host.disks[healthyId] = MemoryBlockDevice(size: 32 << 20)

        var initial: [[UInt8]] = []
        for d in 0..<2 {
            var bytes = [UInt8](repeating: 0, count: size)
            for i in stride(from: 0, to: size, by: 512) { bytes[i] = UInt8(truncatingIfNeeded: i >> 9); bytes[i + 1] = UInt8(d) }
            try devices[d].writeBytes(bytes, at: 0)
            initial.append(bytes)
        }
        let atTake = initial
        let devIds = devices.map(\.devId)
        let id = try rig.engine.createSnapshot(devIds)
        try rig.engine.appendStorage(id, device: Rig.storageId, ranges: [SectorRange(offset: 0, count: UInt64(16 << 20) >> 9)])
        try rig.engine.takeSnapshot(id)
        let snapshot = try #require(rig.engine.snapshot(id))
        let images = snapshot.images

        let failures = Failures()
        let left = Atomic<Int>(writers)
        let logs = (0..<writers).map { _ in Log() }
        let eio = Atomic<Int>(0)
        let group = DispatchGroup()
        for w in 0..<writers {
            run(group) {
                var rng = SplitMix64(seed: seed &+ UInt64(w))
                for seq in 0..<300 {
                    let device = rng.below(2)
                    let offset = w * region + rng.below(region)
                    let count = min(rng.within(1, 16 << 10), (w + 1) * region - offset)
                    do {
                        try devices[device].writeBytes(pattern(w, seq, count), at: UInt64(offset))
                    } catch {
                        failures.add("writer \(w): an original write failed: \(error)")
                    }
                    logs[w].add((device, offset, seq, count))
                }
                left.subtract(1, ordering: .sequentiallyConsistent)
            }
        }
        for r in 0..<2 {
            run(group) {
                var rng = SplitMix64(seed: seed &+ 100 &+ UInt64(r))
                var failed = [false, false]
                while left.load(ordering: .sequentiallyConsistent) > 0 {
                    let d = rng.below(2)
                    let offset = rng.below(size)
                    let n = min(rng.within(1, 16 << 10), size - offset)
                    do {
                        let got = try images[d].readBytes(at: UInt64(offset), count: n)
                        if failed[d] { failures.add("reader \(r): image \(d) read again after EIO") }
                        if !same(got, atTake[d][offset..<(offset + n)]) {
                            failures.add("reader \(r): image \(d) at \(offset)+\(n) is not the content at TAKE")
                        }
                    } catch let e as BlksnapError {
                        if e.errno.rawValue != 5 { failures.add("reader \(r): image read failed with \(e), not EIO") }
                        failed[d] = true
                        eio.add(1, ordering: .sequentiallyConsistent)
                    } catch {
                        failures.add("reader \(r): \(error)")
                    }
                }
            }
        }
        guard group.wait(timeout: .now() + .seconds(hangLimitSeconds)) == .success else {
            Issue.record("threads still running after \(hangLimitSeconds) s: deadlock or livelock")
            return
        }
        let injected = injector.log
        print("fault seed 0x\(String(seed, radix: 16)): \(writers * 300) writes, \(injected.count) faults injected "
              + "(\(injected.filter { $0.errno != nil }.count) failed storage writes, "
              + "\(injected.filter { $0.errno == nil }.count) delays), \(eio.load(ordering: .relaxed)) image reads EIO")
        #expect(failures.all.isEmpty, "\(failures.all)")
        #expect(snapshot.isCorrupted)
        #expect(injected.contains { $0.errno != nil })

        // One corrupted event per device, with the storage's EIO.
        var corrupted: [DevId] = []
        while let event = try? rig.engine.waitEvent(id, timeoutMs: 0) {
            guard event.code == .corrupted else { continue }
            let data = EventCorrupted(wire: Array(event.data.prefix(EventCorrupted.size)))
            #expect(data.errCode == 5)
            corrupted.append(data.origDevId)
        }
        #expect(corrupted.sorted() == devIds.sorted(), "corrupted events for \(corrupted)")
        for image in images {
            #expect(throws: BlksnapError.self) { try image.readBytes(at: 0, count: 512) }
        }

        // Every write is on its original, in each writer's order.
        var final = initial
        for w in 0..<writers {
            for l in logs[w].all {
                final[l.device].replaceSubrange(l.offset..<(l.offset + l.count), with: pattern(w, l.seq, l.count))
            }
        }
        injector.isEnabled = false
        for d in 0..<2 {
            #expect(try devices[d].readBytes(at: 0, count: size) == final[d], "original \(d) lost a write")
        }

        // The engine carries on: destroy, then a new snapshot on a healthy disk.
        try rig.engine.destroySnapshot(id)
        injector.isEnabled = true
        let id2 = try rig.engine.createSnapshot(devIds)
        try rig.engine.appendStorage(id2, device: healthyId, ranges: [SectorRange(offset: 0, count: UInt64(16 << 20) >> 9)])
        try rig.engine.takeSnapshot(id2)
        try devices[0].writeBytes([UInt8](repeating: 0xAB, count: 4096), at: 0)
        let image2 = try #require(rig.engine.images(of: id2).first)
        #expect(try image2.readBytes(at: 0, count: size) == final[0], "the new image is not the point in time")
        #expect(rig.engine.snapshot(id2)?.isCorrupted == false)
        try rig.engine.destroySnapshot(id2)
    }
}
