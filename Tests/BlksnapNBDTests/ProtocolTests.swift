@testable import BlksnapNBD
import SystemPackage
import Testing

@Suite struct RequestParsingTests {
    @Test func headerRoundTrips() throws {
        let request = NBDRequest(flags: NBD.cmdFlagFUA, type: NBDCommand.write.rawValue,
                                 handle: 0x0102_0304_0506_0708, offset: 1 << 40, length: 4096)
        let bytes = request.encoded
        #expect(bytes.count == NBD.requestHeaderSize)
        #expect(Array(bytes[0..<4]) == [0x25, 0x60, 0x95, 0x13])
        #expect(try NBDRequest.parse(bytes).get() == request)
    }

    @Test func badMagicIsAParseError() {
        var bytes = NBDRequest(type: 0, handle: 1, offset: 0, length: 512).encoded
        bytes[0] = 0x99
        #expect(NBDRequest.parse(bytes) == .failure(.badMagic(0x9960_9513)))
    }

    @Test func shortHeaderIsAParseError() {
        let bytes = Array(NBDRequest(type: 0, handle: 1, offset: 0, length: 512).encoded.prefix(20))
        #expect(NBDRequest.parse(bytes) == .failure(.short))
    }

    @Test func onlyWritesCarryAPayload() {
        #expect(NBDRequest(type: NBDCommand.write.rawValue, handle: 1, offset: 0, length: 9).hasPayload)
        #expect(!NBDRequest(type: NBDCommand.writeZeroes.rawValue, handle: 1, offset: 0, length: 9).hasPayload)
        #expect(!NBDRequest(type: NBDCommand.read.rawValue, handle: 1, offset: 0, length: 9).hasPayload)
    }
}

@Suite struct RequestValidationTests {
    static let state = TransmissionState(size: 1 << 20, readOnly: false, structuredReplies: true, metaContextCount: 1)

    func check(_ command: NBDCommand, offset: UInt64 = 0, length: UInt32 = 512, flags: UInt16 = 0,
               state: TransmissionState = Self.state) -> UInt32? {
        NBDRequest(flags: flags, type: command.rawValue, handle: 1, offset: offset, length: length).validate(state)?.error
    }

    @Test func readWithinTheExportIsValid() {
        #expect(check(.read, offset: (1 << 20) - 512, length: 512) == nil)
    }

    @Test func readPastTheEndIsEINVAL() {
        #expect(check(.read, offset: (1 << 20) - 511, length: 512) == NBD.eInval)
    }

    @Test func writePastTheEndIsENOSPC() {
        #expect(check(.write, offset: 1 << 20, length: 1) == NBD.eNoSpc)
    }

    @Test func trimAndWriteZeroesPastTheEndAreENOSPC() {
        #expect(check(.trim, offset: 1 << 20, length: 512) == NBD.eNoSpc)
        #expect(check(.writeZeroes, offset: 1 << 20, length: 512) == NBD.eNoSpc)
    }

    @Test func offsetPlusLengthOverflowIsOutOfRange() {
        #expect(check(.read, offset: UInt64.max - 10, length: 512) == NBD.eInval)
        #expect(check(.write, offset: UInt64.max - 10, length: 512) == NBD.eNoSpc)
    }

    @Test func writesToAReadOnlyExportAreEPERM() {
        var state = Self.state
        state.readOnly = true
        for command in [NBDCommand.write, .trim, .writeZeroes] {
            #expect(check(command, state: state) == NBD.ePerm)
        }
        #expect(check(.read, state: state) == nil)
        #expect(check(.flush, length: 0, state: state) == nil)
    }

    @Test func lengthsOver32MiBAreEINVALForReadAndWrite() {
        #expect(check(.read, length: NBD.maxPayload + 1, state: TransmissionState(size: 1 << 30, readOnly: false, structuredReplies: false, metaContextCount: 0)) == NBD.eInval)
        #expect(check(.write, length: NBD.maxPayload + 1, state: TransmissionState(size: 1 << 30, readOnly: false, structuredReplies: false, metaContextCount: 0)) == NBD.eInval)
        #expect(check(.read, length: NBD.maxPayload, state: TransmissionState(size: 1 << 30, readOnly: false, structuredReplies: false, metaContextCount: 0)) == nil)
    }

    @Test func trimMayExceed32MiB() {
        let big = TransmissionState(size: 1 << 30, readOnly: false, structuredReplies: false, metaContextCount: 0)
        #expect(check(.trim, length: 1 << 29, state: big) == nil)
    }

    @Test func zeroLengthIsEINVAL() {
        #expect(check(.read, length: 0) == NBD.eInval)
        #expect(check(.write, length: 0) == NBD.eInval)
    }

    @Test func flushMustHaveZeroOffsetAndLength() {
        #expect(check(.flush, offset: 0, length: 0) == nil)
        #expect(check(.flush, offset: 512, length: 0) == NBD.eInval)
        #expect(check(.flush, offset: 0, length: 512) == NBD.eInval)
    }

    @Test func unknownCommandIsEINVAL() {
        let r = NBDRequest(type: 42, handle: 1, offset: 0, length: 512)
        #expect(r.validate(Self.state)?.error == NBD.eInval)
    }

    @Test func cacheIsNotAdvertisedSoEINVAL() {
        #expect(check(.cache) == NBD.eInval)
    }

    @Test func unknownFlagIsEINVAL() {
        #expect(check(.read, flags: 1 << 9) == NBD.eInval)
    }

    @Test func flagsValidOnlyOnTheirCommand() {
        #expect(check(.writeZeroes, flags: NBD.cmdFlagNoHole) == nil)
        #expect(check(.write, flags: NBD.cmdFlagNoHole) == NBD.eInval)
        #expect(check(.blockStatus, flags: NBD.cmdFlagReqOne) == nil)
        #expect(check(.read, flags: NBD.cmdFlagReqOne) == NBD.eInval)
        #expect(check(.read, flags: NBD.cmdFlagDF) == nil)
    }

    @Test func fuaIsAcceptedOnEveryCommand() {
        #expect(check(.read, flags: NBD.cmdFlagFUA) == nil)
        #expect(check(.write, flags: NBD.cmdFlagFUA) == nil)
        #expect(check(.trim, flags: NBD.cmdFlagFUA) == nil)
    }

    @Test func dontFragmentNeedsStructuredReplies() {
        var state = Self.state
        state.structuredReplies = false
        #expect(check(.read, flags: NBD.cmdFlagDF, state: state) == NBD.eInval)
    }

    @Test func blockStatusNeedsStructuredRepliesAndAContext() {
        var state = Self.state
        state.metaContextCount = 0
        #expect(check(.blockStatus, state: state) == NBD.eInval)
        state.metaContextCount = 1
        state.structuredReplies = false
        #expect(check(.blockStatus, state: state) == NBD.eInval)
    }

    @Test func blockStatusPastTheEndIsEINVAL() {
        #expect(check(.blockStatus, offset: 1 << 20, length: 512) == NBD.eInval)
    }

    @Test func unalignedRequestsAreEINVALWhenTheDeviceNeedsAlignment() {
        var state = Self.state
        state.minimumBlockSize = 4096
        #expect(check(.read, offset: 512, length: 4096, state: state) == NBD.eInval)
        #expect(check(.read, offset: 4096, length: 512, state: state) == NBD.eInval)
        #expect(check(.read, offset: 4096, length: 4096, state: state) == nil)
    }
}

@Suite struct ErrnoMappingTests {
    @Test func everyWireErrorHasItsErrno() {
        #expect(nbdError(.notPermitted) == NBD.ePerm)
        #expect(nbdError(.readOnlyFileSystem) == NBD.ePerm)
        #expect(nbdError(.ioError) == NBD.eIO)
        #expect(nbdError(.noMemory) == NBD.eNoMem)
        #expect(nbdError(.invalidArgument) == NBD.eInval)
        #expect(nbdError(.noSpace) == NBD.eNoSpc)
        #expect(nbdError(.overflow) == NBD.eOverflow)
        #expect(nbdError(.notSupported) == NBD.eNotSup)
        #expect(nbdError(.socketShutdown) == NBD.eShutdown)
    }

    @Test func quotaAndFileSizeReadAsENOSPC() {
        #expect(nbdError(.diskQuotaExceeded) == NBD.eNoSpc)
        #expect(nbdError(.fileTooLarge) == NBD.eNoSpc)
    }

    @Test func anythingElseIsEINVAL() {
        #expect(nbdError(.badAddress) == NBD.eInval)
        #expect(nbdError(.operationNotSupportedByDevice) == NBD.eInval)
        #expect(nbdError(.noData) == NBD.eInval)
    }
}

@Suite struct ReplyEncodingTests {
    @Test func simpleReplyLayout() {
        let bytes = NBDReply.simple(handle: 7, error: NBD.eIO)
        #expect(bytes.count == 16)
        #expect(bytes.u32(at: 0) == NBD.simpleReplyMagic)
        #expect(bytes.u32(at: 4) == 5)
        #expect(bytes.u64(at: 8) == 7)
    }

    @Test func errorChunkCarriesErrorAndMessage() {
        let bytes = NBDReply.errorChunk(handle: 9, error: NBD.eInval, message: "no")
        #expect(bytes.u32(at: 0) == NBD.structuredReplyMagic)
        #expect(bytes.u16(at: 4) == NBD.replyFlagDone)
        #expect(bytes.u16(at: 6) == NBD.replyTypeError)
        #expect(bytes.u64(at: 8) == 9)
        #expect(bytes.u32(at: 16) == 8)
        #expect(bytes.u32(at: 20) == NBD.eInval)
        #expect(bytes.u16(at: 24) == 2)
        #expect(Array(bytes[26...]) == Array("no".utf8))
    }

    @Test func blockStatusChunkLayout() {
        let bytes = NBDReply.blockStatus(handle: 3, contextId: 2,
                                         extents: [Extent(length: 4096, flags: 1), Extent(length: 512, flags: 0)],
                                         done: false)
        #expect(bytes.u16(at: 4) == 0)
        #expect(bytes.u16(at: 6) == NBD.replyTypeBlockStatus)
        #expect(bytes.u32(at: 16) == 4 + 16)
        #expect(bytes.u32(at: 20) == 2)
        #expect(bytes.u32(at: 24) == 4096)
        #expect(bytes.u32(at: 28) == 1)
        #expect(bytes.u32(at: 32) == 512)
        #expect(bytes.u32(at: 36) == 0)
    }
}
