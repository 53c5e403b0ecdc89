import BlksnapEngine
@testable import BlksnapNBD
import BlksnapTestSupport
import Synchronization
import Testing

/// A memory disk that counts flushes and discards and can be made to fail.
final class ProbeDevice: BlockDevice, @unchecked Sendable {
    let inner: MemoryBlockDevice
    let flushes = Atomic<Int>(0)
    let discards = Atomic<Int>(0)
    let failReads: BlksnapError?

    init(size: UInt64, failReads: BlksnapError? = nil) {
        inner = MemoryBlockDevice(size: size)
        self.failReads = failReads
    }

    var size: UInt64 { inner.size }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        if let failReads { throw failReads }
        try inner.read(into: buffer, at: offset)
    }
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        try inner.write(buffer, at: offset)
    }
    func flush() throws(BlksnapError) { flushes.add(1, ordering: .relaxed) }
    func discard(at offset: UInt64, length: UInt64) throws(BlksnapError) {
        discards.add(1, ordering: .relaxed)
        try inner.discard(at: offset, length: length)
    }
}

/// Scripts that negotiate with GO and then send requests.
func transmission(structured: Bool, contexts: [String] = [], export: String = "disk",
                  _ requests: (inout ClientScript) -> Void) -> ClientScript {
    var script = ClientScript()
    if structured { script.structuredReplies() }
    if !contexts.isEmpty { script.setMeta(export, contexts) }
    script.go(export)
    requests(&script)
    return script
}

/// Skips the greeting and option replies up to the ACK of GO.
func skipHandshake(_ out: inout ServerOutput) {
    _ = out.greeting()
    while true {
        let r = out.optionReply()
        if r.option == NBD.optGo && r.type != NBD.repInfo { break }
    }
}

func run(_ script: ClientScript, exports: [Export], workers: Int = 4,
         readLengths: [UInt64: Int] = [:]) -> [ServerOutput.Reply] {
    var out = converse(script, exports: exports, workers: workers).output
    skipHandshake(&out)
    return out.replies(readLengths: readLengths)
}

@Suite struct TransmissionTests {
    @Test func simpleRepliesWriteThenRead() throws {
        let (export, device) = memoryExport()
        let data = (0..<4096).map { UInt8($0 % 251) }
        let script = transmission(structured: false) {
            $0.request(.write, handle: 1, offset: 8192, length: 4096, payload: data)
            $0.request(.disconnect, handle: 0)
        }
        let replies = run(script, exports: [export])
        #expect(replies == [.simple(handle: 1, error: 0, data: [])])
        var back = [UInt8](repeating: 0, count: 4096)
        try back.withUnsafeMutableBytes { try device.read(into: $0, at: 8192) }
        #expect(back == data)
    }

    @Test func simpleReadReplyCarriesTheData() throws {
        let (export, device) = memoryExport()
        let data = [UInt8](repeating: 0xAB, count: 512)
        try data.withUnsafeBytes { try device.write($0, at: 512) }
        let script = transmission(structured: false) { $0.request(.read, handle: 5, offset: 512, length: 512) }
        #expect(run(script, exports: [export], readLengths: [5: 512]) == [.simple(handle: 5, error: 0, data: data)])
    }

    @Test func structuredReadIsOneFinalOffsetDataChunk() throws {
        let (export, device) = memoryExport()
        let data = (0..<1000).map { UInt8($0 & 0xff) }
        try data.withUnsafeBytes { try device.write($0, at: 3) }
        let script = transmission(structured: true) { $0.request(.read, handle: 6, offset: 3, length: 1000) }
        let replies = run(script, exports: [export])
        guard case .chunk(6, let flags, let type, let payload) = replies.first else {
            Issue.record("expected a chunk, got \(replies)")
            return
        }
        #expect(replies.count == 1)
        #expect(flags == NBD.replyFlagDone)
        #expect(type == NBD.replyTypeOffsetData)
        #expect(payload.u64(at: 0) == 3)
        #expect(Array(payload[8...]) == data)
    }

    @Test func readPastTheEndIsAnErrorChunkAndTheConnectionGoesOn() {
        let (export, _) = memoryExport(size: 1 << 20)
        let script = transmission(structured: true) {
            $0.request(.read, handle: 1, offset: 1 << 20, length: 512)
            $0.request(.read, handle: 2, offset: 0, length: 512)
        }
        let replies = run(script, exports: [export])
        guard case .chunk(1, NBD.replyFlagDone, NBD.replyTypeError, let payload) = replies.first(where: { $0.handle == 1 }) else {
            Issue.record("expected an error chunk, got \(replies)")
            return
        }
        #expect(payload.u32(at: 0) == NBD.eInval)
        #expect(replies.contains { if case .chunk(2, _, NBD.replyTypeOffsetData, _) = $0 { true } else { false } })
    }

    @Test func readPastTheEndWithoutStructuredRepliesIsASimpleEINVAL() {
        let (export, _) = memoryExport(size: 1 << 20)
        let script = transmission(structured: false) { $0.request(.read, handle: 1, offset: (1 << 20) - 1, length: 2) }
        #expect(run(script, exports: [export]) == [.simple(handle: 1, error: NBD.eInval, data: [])])
    }

    @Test func writeToAReadOnlyExportIsEPERMAndItsPayloadSkipped() throws {
        let (export, device) = memoryExport(readOnly: true)
        let script = transmission(structured: false) {
            $0.request(.write, handle: 1, offset: 0, length: 512, payload: [UInt8](repeating: 7, count: 512))
            $0.request(.flush, handle: 2)
        }
        let replies = run(script, exports: [export], workers: 1)
        #expect(replies.contains(.simple(handle: 1, error: NBD.ePerm, data: [])))
        #expect(replies.contains(.simple(handle: 2, error: 0, data: [])))
        var back = [UInt8](repeating: 1, count: 512)
        try back.withUnsafeMutableBytes { try device.read(into: $0, at: 0) }
        #expect(back == [UInt8](repeating: 0, count: 512))
    }

    @Test func writePastTheEndIsENOSPC() {
        let (export, _) = memoryExport(size: 1 << 20)
        let script = transmission(structured: false) {
            $0.request(.write, handle: 1, offset: (1 << 20) - 256, length: 512, payload: [UInt8](repeating: 1, count: 512))
        }
        #expect(run(script, exports: [export]) == [.simple(handle: 1, error: NBD.eNoSpc, data: [])])
    }

    @Test func oversizedWriteIsEINVALAndTheStreamStaysInStep() {
        let (export, _) = memoryExport(size: 64 << 20)
        let length = NBD.maxPayload + 4096
        let script = transmission(structured: false) {
            $0.request(.write, handle: 1, offset: 0, length: length, payload: [UInt8](repeating: 0, count: Int(length)))
            $0.request(.flush, handle: 2)
        }
        let replies = run(script, exports: [export], workers: 1)
        #expect(replies == [.simple(handle: 1, error: NBD.eInval, data: []), .simple(handle: 2, error: 0, data: [])])
    }

    @Test func absurdWriteLengthDropsTheConnection() {
        let (export, _) = memoryExport()
        let script = transmission(structured: false) {
            $0.request(.write, handle: 1, offset: 0, length: UInt32.max)
            $0.request(.flush, handle: 2)
        }
        #expect(run(script, exports: [export]) == [])
    }

    @Test func badRequestMagicDropsTheConnection() {
        let (export, _) = memoryExport()
        let script = transmission(structured: false) {
            var header = NBDRequest(type: NBDCommand.flush.rawValue, handle: 1, offset: 0, length: 0).encoded
            header[3] ^= 0xff
            $0.w.bytes += header
            $0.request(.flush, handle: 2)
        }
        #expect(run(script, exports: [export]) == [])
    }

    @Test func nothingIsReadAfterDisconnect() {
        let (export, _) = memoryExport()
        let script = transmission(structured: false) {
            $0.request(.flush, handle: 1)
            $0.request(.disconnect, handle: 2)
            $0.request(.flush, handle: 3)
        }
        let (out, stream) = converse(script, exports: [export])
        var o = out
        skipHandshake(&o)
        #expect(o.replies() == [.simple(handle: 1, error: 0, data: [])])
        #expect(stream.consumed == script.bytes.count - NBD.requestHeaderSize)
    }

    /// The spec: a server that advertises FUA must accept the flag on any
    /// command; on FLUSH it means nothing more than FLUSH.
    @Test func flushWithFuaIsAFlush() {
        let probe = ProbeDevice(size: 1 << 20)
        let export = Export(name: "disk", device: probe)
        let script = transmission(structured: false) {
            $0.request(.flush, handle: 1, flags: NBD.cmdFlagFUA)
        }
        #expect(run(script, exports: [export]) == [.simple(handle: 1, error: 0, data: [])])
        #expect(probe.flushes.load(ordering: .relaxed) == 1)
    }

    /// NBD_CMD_DISC never gets a reply, whatever its flags: the server
    /// just closes, as it would for a plain DISC.
    @Test func disconnectWithUnknownFlagsStillDisconnects() {
        let (export, _) = memoryExport()
        let script = transmission(structured: false) {
            $0.request(.flush, handle: 1)
            $0.request(.disconnect, handle: 2, flags: 0x8000)
            $0.request(.flush, handle: 3)
        }
        let (out, stream) = converse(script, exports: [export])
        var o = out
        skipHandshake(&o)
        #expect(o.replies() == [.simple(handle: 1, error: 0, data: [])])
        #expect(stream.consumed == script.bytes.count - NBD.requestHeaderSize)
    }

    @Test func fuaWriteIsFlushedBeforeTheReply() {
        let probe = ProbeDevice(size: 1 << 20)
        let export = Export(name: "disk", device: probe)
        let script = transmission(structured: false) {
            $0.request(.write, handle: 1, offset: 0, length: 512, flags: NBD.cmdFlagFUA, payload: [UInt8](repeating: 1, count: 512))
            $0.request(.write, handle: 2, offset: 512, length: 512, payload: [UInt8](repeating: 1, count: 512))
        }
        _ = run(script, exports: [export])
        #expect(probe.flushes.load(ordering: .relaxed) == 1)
    }

    @Test func trimDiscards() throws {
        let probe = ProbeDevice(size: 1 << 20)
        try [UInt8](repeating: 9, count: 4096).withUnsafeBytes { try probe.write($0, at: 0) }
        let export = Export(name: "disk", device: probe)
        let script = transmission(structured: false) { $0.request(.trim, handle: 1, offset: 0, length: 4096) }
        #expect(run(script, exports: [export]) == [.simple(handle: 1, error: 0, data: [])])
        #expect(probe.discards.load(ordering: .relaxed) == 1)
    }

    @Test func writeZeroesWritesZerosByDefault() throws {
        let probe = ProbeDevice(size: 4 << 20)
        try [UInt8](repeating: 9, count: 3 << 20).withUnsafeBytes { try probe.write($0, at: 0) }
        let export = Export(name: "disk", device: probe, discardZeroes: false)
        let script = transmission(structured: false) { $0.request(.writeZeroes, handle: 1, offset: 4096, length: (2 << 20) + 512) }
        #expect(run(script, exports: [export]) == [.simple(handle: 1, error: 0, data: [])])
        #expect(probe.discards.load(ordering: .relaxed) == 0)
        let bytes = probe.inner.snapshotBytes()
        #expect(bytes[0..<4096].allSatisfy { $0 == 9 })
        #expect(bytes[4096..<(4096 + (2 << 20) + 512)].allSatisfy { $0 == 0 })
        #expect(bytes[4096 + (2 << 20) + 512] == 9)
    }

    @Test func writeZeroesMayDiscardWhenDiscardZeroes() {
        let probe = ProbeDevice(size: 1 << 20)
        let export = Export(name: "disk", device: probe, discardZeroes: true)
        let script = transmission(structured: false) { $0.request(.writeZeroes, handle: 1, offset: 0, length: 8192) }
        _ = run(script, exports: [export])
        #expect(probe.discards.load(ordering: .relaxed) == 1)
    }

    @Test func writeZeroesWithNoHoleNeverDiscards() throws {
        let probe = ProbeDevice(size: 1 << 20)
        try [UInt8](repeating: 9, count: 8192).withUnsafeBytes { try probe.write($0, at: 0) }
        let export = Export(name: "disk", device: probe, discardZeroes: true)
        let script = transmission(structured: false) {
            $0.request(.writeZeroes, handle: 1, offset: 0, length: 8192, flags: NBD.cmdFlagNoHole)
        }
        _ = run(script, exports: [export])
        #expect(probe.discards.load(ordering: .relaxed) == 0)
        #expect(probe.inner.snapshotBytes()[0..<8192].allSatisfy { $0 == 0 })
    }

    @Test func deviceErrorsReachTheClientAsNBDErrors() {
        let probe = ProbeDevice(size: 1 << 20, failReads: BlksnapError(.ioError, "disk on fire at /secret/path"))
        let export = Export(name: "disk", device: probe)
        let script = transmission(structured: true) { $0.request(.read, handle: 1, offset: 0, length: 512) }
        let replies = run(script, exports: [export])
        guard case .chunk(1, _, NBD.replyTypeError, let payload) = replies.first else {
            Issue.record("expected an error chunk, got \(replies)")
            return
        }
        #expect(payload.u32(at: 0) == NBD.eIO)
        #expect(!String(decoding: payload[6...], as: UTF8.self).contains("/secret/path"))
    }

    @Test func manyRequestsInFlightAreEachAnsweredOnce() throws {
        let (export, device) = memoryExport(size: 4 << 20)
        let pattern = (0..<(4 << 20)).map { UInt8(truncatingIfNeeded: $0 / 4096 &* 31) }
        try pattern.withUnsafeBytes { try device.write($0, at: 0) }
        let script = transmission(structured: true) {
            for i in 0..<200 { $0.request(.read, handle: UInt64(i), offset: UInt64(i % 1024) * 4096, length: 4096) }
        }
        let replies = run(script, exports: [export], workers: 8)
        #expect(replies.count == 200)
        #expect(Set(replies.map(\.handle)) == Set((0..<200).map(UInt64.init)))
        for case .chunk(let handle, _, NBD.replyTypeOffsetData, let payload) in replies {
            let offset = Int(payload.u64(at: 0))
            #expect(offset == Int(handle % 1024) * 4096)
            #expect(Array(payload[8...]) == Array(pattern[offset..<(offset + 4096)]))
        }
    }

    @Test func writesBeyondTheByteBudgetWaitTheirTurn() throws {
        let (export, device) = memoryExport(size: 4 << 20)
        let script = transmission(structured: false) {
            for i in 0..<32 {
                $0.request(.write, handle: UInt64(i), offset: UInt64(i) * 65536, length: 65536,
                           payload: [UInt8](repeating: UInt8(i + 1), count: 65536))
            }
        }
        var out = converse(script, exports: [export],
                           limits: ConnectionLimits(workers: 3, maxInFlight: 8, maxBytesInFlight: 100_000)).output
        skipHandshake(&out)
        let replies = out.replies()
        #expect(Set(replies) == Set((0..<32).map { ServerOutput.Reply.simple(handle: UInt64($0), error: 0, data: []) }))
        let bytes = device.snapshotBytes()
        for i in 0..<32 { #expect(bytes[i * 65536 + 100] == UInt8(i + 1)) }
    }

    @Test func blockStatusWithoutContextsIsEINVAL() {
        let (export, _) = memoryExport()
        let script = transmission(structured: true) { $0.request(.blockStatus, handle: 1, offset: 0, length: 4096) }
        let replies = run(script, exports: [export])
        guard case .chunk(1, _, NBD.replyTypeError, let payload) = replies.first else {
            Issue.record("expected an error chunk, got \(replies)")
            return
        }
        #expect(payload.u32(at: 0) == NBD.eInval)
    }

    @Test func baseAllocationIsOneAllocatedExtent() {
        let (export, _) = memoryExport()
        let script = transmission(structured: true, contexts: ["base:allocation"]) {
            $0.request(.blockStatus, handle: 1, offset: 4096, length: 65536)
        }
        let replies = run(script, exports: [export])
        #expect(replies == [.chunk(handle: 1, flags: NBD.replyFlagDone, type: NBD.replyTypeBlockStatus,
                                   payload: [0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0])])
    }

    @Test func changedSinceAnswersFromTheReadMap() {
        // Blocks of 4 KiB: 0 unchanged, 1-2 changed after snapshot 1, 3 before.
        let map = CbtReadMap(bytes: [0, 2, 2, 1, 0, 0, 0, 0], blockShift: 12, snapNumber: 2)
        let (export, _) = memoryExport(size: 32768, changes: { map })
        let script = transmission(structured: true, contexts: ["base:allocation", "blksnap:changed-since:1"]) {
            $0.request(.blockStatus, handle: 1, offset: 0, length: 32768)
        }
        let replies = run(script, exports: [export])
        #expect(replies.count == 2)
        guard case .chunk(1, 0, NBD.replyTypeBlockStatus, let base) = replies[0],
              case .chunk(1, NBD.replyFlagDone, NBD.replyTypeBlockStatus, let changed) = replies[1] else {
            Issue.record("expected two block status chunks, got \(replies)")
            return
        }
        #expect(base.u32(at: 0) == 1)
        #expect(changed.u32(at: 0) == 2)
        let extents = stride(from: 4, to: changed.count, by: 8).map { Extent(length: changed.u32(at: $0), flags: changed.u32(at: $0 + 4)) }
        #expect(extents == [Extent(length: 4096, flags: 0), Extent(length: 8192, flags: 1), Extent(length: 20480, flags: 0)])
    }

    @Test func unreadableMapIsAnErrorNotUnchanged() {
        let (export, _) = memoryExport(changes: { () throws(BlksnapError) -> CbtReadMap in
            throw BlksnapError(.noData, "not tracked")
        })
        let script = transmission(structured: true, contexts: ["blksnap:changed-since:0"]) {
            $0.request(.blockStatus, handle: 1, offset: 0, length: 4096)
        }
        let replies = run(script, exports: [export])
        guard case .chunk(1, _, NBD.replyTypeError, let payload) = replies.first else {
            Issue.record("expected an error chunk, got \(replies)")
            return
        }
        #expect(payload.u32(at: 0) == NBD.eInval)
    }

    @Test func goForAnotherExportDropsTheContexts() {
        let (disk, _) = memoryExport("disk")
        let (other, _) = memoryExport("other")
        var script = ClientScript()
        script.structuredReplies()
        script.setMeta("disk", ["base:allocation"])
        script.go("other")
        script.request(.blockStatus, handle: 1, offset: 0, length: 4096)
        let replies = run(script, exports: [disk, other])
        guard case .chunk(1, _, NBD.replyTypeError, _) = replies.first else {
            Issue.record("expected an error chunk, got \(replies)")
            return
        }
    }
}
