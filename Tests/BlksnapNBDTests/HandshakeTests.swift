import BlksnapEngine
@testable import BlksnapNBD
import Testing

@Suite struct HandshakeTests {
    let disk = memoryExport("disk", size: 1 << 20).0
    let other = memoryExport("other", size: 2 << 20, readOnly: true).0

    @Test func greetingIsFixedNewstyleWithNoZeroes() {
        var out = converse(ClientScript(), exports: [disk]).output
        let (magic, optionMagic, flags) = out.greeting()
        #expect(magic == NBD.magic)
        #expect(optionMagic == NBD.optionMagic)
        #expect(flags == NBD.flagFixedNewstyle | NBD.flagNoZeroes)
    }

    @Test func unknownClientFlagsCloseTheConnection() {
        var script = ClientScript(flags: 1 << 5)
        script.option(NBD.optList)
        var out = converse(script, exports: [disk]).output
        _ = out.greeting()
        #expect(out.atEnd)
    }

    @Test func exportNameWithoutNoZeroesSendsTheZeroes() {
        var script = ClientScript(flags: NBD.clientFixedNewstyle)
        script.option(NBD.optExportName, Array("disk".utf8))
        var out = converse(script, exports: [disk]).output
        _ = out.greeting()
        #expect(out.u64() == 1 << 20)
        let flags = out.u16()
        #expect(flags & NBD.flagHasFlags != 0)
        #expect(flags & NBD.flagReadOnly == 0)
        #expect(out.take(124) == [UInt8](repeating: 0, count: 124))
        #expect(out.atEnd)
    }

    @Test func exportNameWithNoZeroesOmitsThem() {
        var script = ClientScript()
        script.option(NBD.optExportName, Array("disk".utf8))
        var out = converse(script, exports: [disk]).output
        _ = out.greeting()
        _ = out.u64()
        _ = out.u16()
        #expect(out.atEnd)
    }

    @Test func unknownExportNameClosesWithoutReply() {
        var script = ClientScript()
        script.option(NBD.optExportName, Array("nope".utf8))
        var out = converse(script, exports: [disk]).output
        _ = out.greeting()
        #expect(out.atEnd)
    }

    @Test func listNamesEveryExportThenAcks() {
        var script = ClientScript()
        script.option(NBD.optList)
        let replies = optionReplies(script, exports: [disk, other])
        #expect(replies.map(\.type) == [NBD.repServer, NBD.repServer, NBD.repAck])
        let first = replies[0].data
        #expect(first.u32(at: 0) == 4)
        #expect(String(decoding: first[4..<8], as: UTF8.self) == "disk")
        #expect(String(decoding: first[8...], as: UTF8.self) == "a test disk")
    }

    @Test func listWithDataIsInvalid() {
        var script = ClientScript()
        script.option(NBD.optList, [1, 2, 3])
        #expect(optionReplies(script, exports: [disk]).map(\.type) == [NBD.repErrInvalid])
    }

    @Test func unknownOptionIsUnsupportedAndNegotiationGoesOn() {
        var script = ClientScript()
        script.option(99, [0, 0])
        script.option(NBD.optList)
        let replies = optionReplies(script, exports: [disk])
        #expect(replies.map(\.type) == [NBD.repErrUnsup, NBD.repServer, NBD.repAck])
        #expect(replies[0].option == 99)
    }

    @Test func startTLSIsUnsupported() {
        var script = ClientScript()
        script.option(NBD.optStartTLS)
        #expect(optionReplies(script, exports: [disk]).map(\.type) == [NBD.repErrUnsup])
    }

    @Test func abortIsAcknowledgedThenClosed() {
        var script = ClientScript()
        script.option(NBD.optAbort)
        script.option(NBD.optList)
        let replies = optionReplies(script, exports: [disk])
        #expect(replies.map(\.type) == [NBD.repAck])
    }

    @Test func infoAnswersExportAndBlockSizeAndWhatWasAsked() {
        var script = ClientScript()
        script.option(NBD.optInfo, ClientScript.infoData("other", infos: [NBD.infoName, NBD.infoDescription]))
        let replies = optionReplies(script, exports: [disk, other])
        #expect(replies.map(\.type) == [NBD.repInfo, NBD.repInfo, NBD.repInfo, NBD.repInfo, NBD.repAck])
        let export = replies[0].data
        #expect(export.u16(at: 0) == NBD.infoExport)
        #expect(export.u64(at: 2) == 2 << 20)
        #expect(export.u16(at: 10) & NBD.flagReadOnly != 0)
        #expect(replies[1].data.u16(at: 0) == NBD.infoName)
        #expect(String(decoding: replies[1].data[2...], as: UTF8.self) == "other")
        #expect(replies[2].data.u16(at: 0) == NBD.infoDescription)
        let blockSize = replies[3].data
        #expect(blockSize.u16(at: 0) == NBD.infoBlockSize)
        #expect(blockSize.u32(at: 2) == 1)
        #expect(blockSize.u32(at: 6) == 4096)
        #expect(blockSize.u32(at: 10) == 32 << 20)
    }

    @Test func infoForAnUnknownExportIsUnknown() {
        var script = ClientScript()
        script.option(NBD.optInfo, ClientScript.infoData("nope"))
        #expect(optionReplies(script, exports: [disk]).map(\.type) == [NBD.repErrUnknown])
    }

    @Test func infoWithTrailingBytesIsInvalid() {
        var script = ClientScript()
        script.option(NBD.optInfo, ClientScript.infoData("disk") + [0])
        #expect(optionReplies(script, exports: [disk]).map(\.type) == [NBD.repErrInvalid])
    }

    @Test func infoWithANameLongerThanTheDataIsInvalid() {
        var data = WireWriter()
        data.u32(100)
        data.bytes += Array("disk".utf8)
        var script = ClientScript()
        script.option(NBD.optInfo, data.bytes)
        #expect(optionReplies(script, exports: [disk]).map(\.type) == [NBD.repErrInvalid])
    }

    @Test func emptyNameIsTheDefaultExport() {
        var script = ClientScript()
        script.option(NBD.optInfo, ClientScript.infoData("", infos: [NBD.infoName]))
        let replies = optionReplies(script, exports: [disk, other])
        #expect(replies[0].data.u64(at: 2) == 1 << 20)
        #expect(String(decoding: replies[1].data[2...], as: UTF8.self) == "disk")
    }

    @Test func structuredReplyTwiceIsInvalid() {
        var script = ClientScript()
        script.structuredReplies()
        script.structuredReplies()
        #expect(optionReplies(script, exports: [disk]).map(\.type) == [NBD.repAck, NBD.repErrInvalid])
    }

    @Test func structuredReplyWithDataIsInvalid() {
        var script = ClientScript()
        script.option(NBD.optStructuredReply, [0])
        #expect(optionReplies(script, exports: [disk]).map(\.type) == [NBD.repErrInvalid])
    }

    @Test func metaContextsNeedStructuredReplies() {
        var script = ClientScript()
        script.setMeta("disk", [MetaContext.baseAllocationName])
        #expect(optionReplies(script, exports: [disk]).map(\.type) == [NBD.repErrInvalid])
    }

    @Test func setMetaContextNumbersTheSelection() {
        var script = ClientScript()
        script.structuredReplies()
        script.setMeta("disk", ["base:allocation", "qemu:dirty-bitmap:x", "base:allocation"])
        let replies = optionReplies(script, exports: [disk])
        #expect(replies.map(\.type) == [NBD.repAck, NBD.repMetaContext, NBD.repAck])
        #expect(replies[1].data.u32(at: 0) == 1)
        #expect(String(decoding: replies[1].data[4...], as: UTF8.self) == "base:allocation")
    }

    @Test func changedSinceIsOnlySelectedWithChangeTracking() {
        var script = ClientScript()
        script.structuredReplies()
        script.setMeta("disk", ["blksnap:changed-since:1"])
        #expect(optionReplies(script, exports: [disk]).map(\.type) == [NBD.repAck, NBD.repAck])
    }

    @Test func listMetaContextWithTheBlksnapNamespace() {
        let tracked = memoryExport(changes: { CbtReadMap(bytes: [0, 1, 2], blockShift: 12, snapNumber: 2) }).0
        var script = ClientScript()
        script.structuredReplies()
        script.option(NBD.optListMetaContext, ClientScript.metaData("disk", ["blksnap:"]))
        let replies = optionReplies(script, exports: [tracked])
        let names = replies.filter { $0.type == NBD.repMetaContext }.map { String(decoding: $0.data[4...], as: UTF8.self) }
        #expect(names == ["blksnap:changed-since:0", "blksnap:changed-since:1", "blksnap:changed-since:2"])
        #expect(replies.filter { $0.type == NBD.repMetaContext }.allSatisfy { $0.data.u32(at: 0) == 0 })
        #expect(replies.last!.type == NBD.repAck)
    }

    @Test func listMetaContextWithNoQueryListsEverything() {
        let tracked = memoryExport(changes: { CbtReadMap(bytes: [0], blockShift: 12, snapNumber: 1) }).0
        var script = ClientScript()
        script.structuredReplies()
        script.option(NBD.optListMetaContext, ClientScript.metaData("disk", []))
        let names = optionReplies(script, exports: [tracked]).filter { $0.type == NBD.repMetaContext }
            .map { String(decoding: $0.data[4...], as: UTF8.self) }
        #expect(names == ["base:allocation", "blksnap:changed-since:0", "blksnap:changed-since:1"])
    }

    @Test func metaContextForAnUnknownExportIsUnknown() {
        var script = ClientScript()
        script.structuredReplies()
        script.setMeta("nope", ["base:allocation"])
        #expect(optionReplies(script, exports: [disk]).map(\.type) == [NBD.repAck, NBD.repErrUnknown])
    }

    @Test func malformedMetaContextQueryIsInvalid() {
        var data = WireWriter()
        data.string32("disk")
        data.u32(2)
        data.string32("base:allocation")
        var script = ClientScript()
        script.structuredReplies()
        script.option(NBD.optSetMetaContext, data.bytes)
        #expect(optionReplies(script, exports: [disk]).map(\.type) == [NBD.repAck, NBD.repErrInvalid])
    }

    @Test func goReachesTransmissionWithTheNegotiatedFlags() {
        var script = ClientScript()
        script.structuredReplies()
        script.go("disk")
        var out = converse(script, exports: [disk]).output
        _ = out.greeting()
        #expect(out.optionReply().type == NBD.repAck)
        let export = out.optionReply()
        #expect(export.type == NBD.repInfo)
        let flags = export.data.u16(at: 10)
        for f in [NBD.flagSendFlush, NBD.flagSendFUA, NBD.flagSendTrim, NBD.flagSendWriteZeroes,
                  NBD.flagSendDF, NBD.flagCanMultiConn] {
            #expect(flags & f != 0)
        }
        _ = out.optionReply()
        #expect(out.optionReply().type == NBD.repAck)
        #expect(out.atEnd)
    }

    @Test func bogusOptionMagicClosesTheConnection() {
        var script = ClientScript()
        script.w.u64(0x1234)
        script.w.u32(NBD.optList)
        script.w.u32(0)
        var out = converse(script, exports: [disk]).output
        _ = out.greeting()
        #expect(out.atEnd)
    }
}
