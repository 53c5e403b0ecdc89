import BlksnapABI
@testable import BlksnapEngine
import BlksnapTestSupport
import Testing

// The model-based test of CBT kept across restarts: random writes, MARK_DIRTY,
// TAKEs, periodic saves and TRACKER_REMOVE on one device, interleaved with
// clean stops and crashes at random points (including in the middle of a
// save, after its copy of the map and before it clears the intent record).
// A plain reference keeps the two tables and the numbers. After a clean stop
// and start the restored map must equal the reference; after a crash it must
// have the same generation and numbers and mark, block by block, at least
// what the reference marks (a superset), and the reference then carries on
// from what was restored.

private struct Reference {
    var tracked = false
    var read: [UInt8]
    var write: [UInt8]
    var previous: UInt8 = 0
    var active: UInt8 = 1

    init(blocks: Int) {
        read = [UInt8](repeating: 0, count: blocks)
        write = read
    }

    mutating func mark(_ range: ClosedRange<Int>, both: Bool) {
        guard tracked else { return }
        for b in range where write[b] < active { write[b] = active }
        if both { for b in range where read[b] < previous { read[b] = previous } }
    }

    mutating func take() {
        if !tracked { self = Reference(blocks: read.count); tracked = true }
        read = write
        previous = active
        if active == 255 {
            active = 1
            write = [UInt8](repeating: 0, count: write.count)
        } else {
            active += 1
        }
    }
}

@Suite struct PersistModelTests {
    static let blockShift = 12      // Rig.smallSettings

    @Test(arguments: [1, 2, 3, 4, 5, 6, 7, 8] as [UInt64])
    func restartsAndCrashesAtRandomPoints(seed: UInt64) throws {
        var rng = SplitMix64(seed: seed)
        let size = UInt64(rng.within(2, 5)) << 20 + UInt64(rng.below(8)) * 4096
        let rig = PersistRig(size: size)
        let blocks = Int((size + 4095) >> 12)
        var ref = Reference(blocks: blocks)
        var generation: UUID16?
        var log: [String] = []

        func check(_ what: String, exact: Bool) throws {
            let context = "seed \(seed), after \(log.suffix(12).joined(separator: "; "))"
            guard ref.tracked else {
                #expect(rig.info == nil, "\(what): \(context)")
                return
            }
            let info = try #require(rig.info, "\(what): no tracker; \(context)")
            #expect(info.generationId == generation, "\(what): generation; \(context)")
            #expect(info.snapNumber == ref.previous, "\(what): snap number; \(context)")
            let tables = try #require(rig.tables)
            if exact {
                #expect(tables.write == ref.write, "\(what): write table; \(context)")
                #expect(tables.read == ref.read, "\(what): read table; \(context)")
            } else {
                let missed = zip(tables.write, ref.write).enumerated().filter { $0.element.0 < $0.element.1 }.map(\.offset)
                #expect(missed.isEmpty, "\(what): blocks \(missed.prefix(8)) lost; \(context)")
                ref.write = tables.write
                ref.read = tables.read
            }
        }

        for step in 0..<160 {
            switch rng.below(100) {
            case 0..<45:
                let offset = UInt64(rng.below(Int(size >> 9))) << 9
                let length = min(UInt64(rng.within(1, 64)) << 9, size - offset)
                try rig.write(offset, Int(length))
                ref.mark(Int(offset >> 12)...Int((offset + length - 1) >> 12), both: false)
                log.append("write \(offset)+\(length)")
            case 45..<55 where ref.tracked:
                let block = rng.below(blocks)
                let sector = UInt64(block) << 3
                try rig.engine.markDirty(rig.devId, ranges: [SectorRange(offset: sector, count: 1)])
                ref.mark(block...block, both: true)
                log.append("mark-dirty block \(block)")
            case 45..<70:
                try rig.take()
                ref.take()
                generation = rig.info?.generationId
                log.append("take")
                try check("take", exact: true)
            case 70..<78:
                rig.engine.saveCbt()
                log.append("save")
            case 78..<80 where ref.tracked:
                try rig.engine.removeTracker(rig.devId)
                ref = Reference(blocks: blocks)
                log.append("tracker-remove")
            case 80..<88:
                rig.stop()
                rig.start()
                log.append("clean restart")
                try check("clean restart at step \(step)", exact: true)
            case 88..<94:
                rig.crash()
                rig.start()
                log.append("crash")
                try check("crash at step \(step)", exact: false)
            default:
                // Killed in the middle of a save: the map was copied, a write
                // landed, and the intent record was never cleared.
                if let intent = rig.store.writeIntent {
                    intent.beginSync()
                    let offset = UInt64(rng.below(Int(size >> 12))) << 12
                    try rig.write(offset, 4096)
                    ref.mark(Int(offset >> 12)...Int(offset >> 12), both: false)
                    log.append("write \(offset)+4096 during a save")
                }
                rig.crash()
                rig.start()
                log.append("crash mid-save")
                try check("crash mid-save at step \(step)", exact: false)
            }
        }
        rig.stop()
        rig.start()
        try check("final clean restart", exact: true)
    }
}
