import BlksnapEngine
import BlksnapTestSupport
import SystemPackage
import Testing

// The fault injector itself: what the model and the thread tests rely on.

@Suite struct FaultyBlockDeviceTests {
    @Test func scheduledCallsFailAndOthersPassThrough() throws {
        let base = MemoryBlockDevice(size: 1 << 16)
        let injector = FaultInjector(seed: 1, rules: [
            FaultRule(kinds: [.write], when: .calls([1, 3]), effects: [.fail(.noSpace)]),
        ])
        let disk = FaultyBlockDevice(base, name: "d", injector: injector)
        var errnos: [Errno?] = []
        for i in 0..<5 {
            do { try disk.writeBytes([UInt8(i + 1)], at: UInt64(i)); errnos.append(nil) } catch let e as BlksnapError {
                errnos.append(e.errno)
            }
        }
        #expect(errnos == [nil, .noSpace, nil, .noSpace, nil])
        // A failed write moves nothing.
        #expect(base.snapshotBytes()[0..<5] == [1, 0, 3, 0, 5])
        #expect(injector.log.map(\.call) == [1, 3])
        // Reads were not in the rule.
        #expect(try disk.readBytes(at: 0, count: 5) == [1, 0, 3, 0, 5])
    }

    @Test func aShortWriteMovesAPrefixThenFails() throws {
        let base = MemoryBlockDevice(size: 1 << 16)
        let injector = FaultInjector(seed: 7, rules: [FaultRule(kinds: [.write], when: .from(0), effects: [.short(.ioError)])])
        let disk = FaultyBlockDevice(base, name: "d", injector: injector)
        let data = [UInt8](repeating: 0xAA, count: 8192)
        #expect(throws: BlksnapError.self) { try disk.writeBytes(data, at: 0) }
        let fault = try #require(injector.log.first)
        #expect(fault.errno == .ioError && fault.done < 8192)
        let landed = base.snapshotBytes()
        #expect(landed[0..<Int(fault.done)].allSatisfy { $0 == 0xAA })
        #expect(landed[Int(fault.done)..<8192].allSatisfy { $0 == 0 })
    }

    @Test func aSeedReplaysAndDisabledInjectsNothing() throws {
        func faults(_ seed: UInt64) -> [String] {
            let injector = FaultInjector(seed: seed, rules: [FaultRule(when: .random(0.3), effects: [.fail(.ioError), .delay(microseconds: 1)])])
            let disk = FaultyBlockDevice(MemoryBlockDevice(size: 4096), name: "d", injector: injector)
            for i in 0..<200 { _ = try? disk.readBytes(at: UInt64(i % 4096), count: 1) }
            return injector.log.map(\.description)
        }
        #expect(faults(42) == faults(42))
        #expect(faults(42) != faults(43))
        #expect(faults(42).count > 20)

        let injector = FaultInjector(seed: 1, rules: [FaultRule(when: .from(0), effects: [.fail(.ioError)])])
        let disk = FaultyBlockDevice(MemoryBlockDevice(size: 4096), name: "d", injector: injector)
        injector.isEnabled = false
        try disk.writeBytes([1, 2, 3], at: 0)
        try disk.flush()
        #expect(injector.log.isEmpty)
        injector.isEnabled = true
        #expect(throws: BlksnapError.self) { try disk.flush() }
    }
}
