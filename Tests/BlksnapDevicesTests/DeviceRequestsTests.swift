import BlksnapControlProtocol
import BlksnapDevices
import BlksnapEngine
import CBlksnapABI
import FoundationEssentials
import Logging
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// blksnapctl's attach and detach as blksnapd answers them: the errno in
/// the result, blksnapd's why in the payload.
@Suite struct DeviceRequestsTests {
    static let quiet: Logger = {
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        return logger
    }()

    func ask(_ type: blksnap_control_type, _ json: String, _ plane: DataPlane, configDir: String) -> (Int32, String) {
        let (result, payload) = DeviceRequests.answer(type.rawValue, Array(json.utf8), plane, configDir: configDir, logger: Self.quiet)
        let why = (try? JSONDecoder().decode(Refusal.self, from: Data(payload)))?.error ?? String(decoding: payload, as: UTF8.self)
        return (result, why)
    }

    @Test func anAttachedFileIsRepliedAndDetachedByItsNumber() throws {
        let scratch = Scratch()
        let (dataPlane, engine) = plane(FakeMaker(), scratch)
        try dataPlane.start(engine: engine)
        let backing = scratch.file("disk.img", size: 1 << 20)
        let request = String(decoding: try JSONEncoder().encode(AttachRequest(backing: backing)), as: UTF8.self)
        let (result, payload) = DeviceRequests.answer(BLKSNAP_CONTROL_ATTACH.rawValue, Array(request.utf8), dataPlane,
                                                      configDir: scratch.path, logger: Self.quiet)
        #expect(result == 0)
        let reply = try JSONDecoder().decode(AttachReply.self, from: Data(payload))
        #expect(reply.backing == backing && reply.sizeBytes == 1 << 20)
        #expect(engine.routedDevices.map(\.devId.description) == [reply.devId])
        #expect(ask(BLKSNAP_CONTROL_DETACH, #"{"device":"\#(reply.devId)"}"#, dataPlane, configDir: scratch.path).0 == 0)
        #expect(engine.routedDevices.isEmpty)
    }

    @Test func malformedJSONIsEINVALAndSaysSo() {
        let scratch = Scratch()
        let (dataPlane, _) = plane(FakeMaker(), scratch)
        let (result, why) = ask(BLKSNAP_CONTROL_ATTACH, #"{"size":1}"#, dataPlane, configDir: scratch.path)
        #expect(result == -EINVAL)
        #expect(why.hasPrefix("malformed request"))
    }

    @Test func persistWithoutANameIsEINVAL() {
        let scratch = Scratch()
        let (dataPlane, _) = plane(FakeMaker(), scratch)
        let (result, why) = ask(BLKSNAP_CONTROL_ATTACH, #"{"backing":"/x","persist":true}"#, dataPlane, configDir: scratch.path)
        #expect(result == -EINVAL)
        #expect(why.contains("--name"))
    }

    @Test func detachingWhatIsNeitherRoutedNorDeclaredIsENXIO() {
        let scratch = Scratch()
        let (dataPlane, _) = plane(FakeMaker(), scratch)
        let plain = ask(BLKSNAP_CONTROL_DETACH, #"{"device":"nothing"}"#, dataPlane, configDir: scratch.path)
        #expect(plain.0 == -ENXIO && plain.1 == "nothing is not a routed device")
        let forget = ask(BLKSNAP_CONTROL_DETACH, #"{"device":"nothing","forget":true}"#, dataPlane, configDir: scratch.path)
        #expect(forget.0 == -ENXIO && forget.1 == "nothing is neither routed nor declared")
    }
}
