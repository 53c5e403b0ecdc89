import BlksnapControlProtocol
import FoundationEssentials
import Testing

/// The JSON of the control socket is a contract between a blksnapctl and a
/// blksnapd that may be of different versions: these pin its field names.
@Suite struct MessagesTests {
    func json<T: Encodable>(_ value: T) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return String(decoding: try encoder.encode(value), as: UTF8.self)
    }

    /// The top-level field names of a JSON object.
    struct Keys: Decodable {
        struct Key: CodingKey {
            var stringValue: String
            var intValue: Int? { nil }
            init(stringValue: String) { self.stringValue = stringValue }
            init?(intValue: Int) { nil }
        }
        var names: Set<String>
        init(from decoder: any Decoder) throws {
            names = Set(try decoder.container(keyedBy: Key.self).allKeys.map(\.stringValue))
        }
    }

    @Test func anAttachRequestLeavesOutWhatIsNotSet() throws {
        #expect(try json(AttachRequest(backing: "/disk.img")) == #"{"backing":"/disk.img"}"#)
        let full = try json(AttachRequest(backing: "/d", size: 1 << 30, live: true, name: "vm1", persist: true))
        #expect(full == #"{"backing":"/d","live":true,"name":"vm1","persist":true,"size":1073741824}"#)
        #expect(try json(DetachRequest(device: "vm1", forget: true)) == #"{"device":"vm1","forget":true}"#)
    }

    @Test func requestsAndRepliesReadWhatTheyWrite() throws {
        let attach = AttachRequest(backing: "nbd://host/disk", size: 512, name: "a")
        #expect(try JSONDecoder().decode(AttachRequest.self, from: JSONEncoder().encode(attach)) == attach)
        let detach = DetachRequest(device: "7:64", forget: true)
        #expect(try JSONDecoder().decode(DetachRequest.self, from: JSONEncoder().encode(detach)) == detach)
        let reply = AttachReply(node: "/dev/loop64", devId: "7:64", backing: "/d", sizeBytes: 4096, link: "/dev/disk/by-blksnap/a")
        #expect(try JSONDecoder().decode(AttachReply.self, from: JSONEncoder().encode(reply)) == reply)
    }

    @Test func aRefusalAndAnAttachReplyReadAsBlksnapdWritesThem() throws {
        let refusal = try JSONDecoder().decode(Refusal.self, from: Data(#"{"error":"busy"}"#.utf8))
        #expect(refusal.error == "busy")
        let reply = try JSONDecoder().decode(AttachReply.self, from: Data(
            #"{"node":"/dev/nbd3","devId":"43:3","backing":"/x","sizeBytes":1048576}"#.utf8))
        #expect(reply == AttachReply(node: "/dev/nbd3", devId: "43:3", backing: "/x", sizeBytes: 1 << 20))
    }

    @Test func aDetachRequestWithoutItsDeviceIsRefused() {
        #expect(throws: DecodingError.self) { try JSONDecoder().decode(DetachRequest.self, from: Data(#"{"live":true}"#.utf8)) }
    }

    static let engine = EngineStatus(
        devices: [.init(devId: "7:64", sizeBytes: 1 << 20, backing: "/d", tracked: true, cbt: "restored")],
        trackers: [.init(devId: "7:64", blockSize: 65536, blockCount: 16, capacityBytes: 1 << 20,
                         generationId: "g", snapNumber: 2, snapshot: nil, cbtOrigin: .restored)],
        snapshots: [.init(id: "s", taken: true, corrupted: false, devices: ["7:64"], storageCapacitySectors: 8,
                          storageFilledSectors: 1, storageRequestedSectors: 0,
                          images: [.init(originalDevId: "7:64", imageDevId: "251:0", storedChunks: 1, corrupted: false)])])

    @Test func theDaemonStatusIsFlatAndReadsBack() throws {
        let status = DaemonStatus(engine: Self.engine,
                                  exports: [.init(name: "loop64", devId: "7:64", uri: "nbd+unix:///loop64?socket=/s")],
                                  declared: [DeclaredDevice(name: "vm1", backing: "/d", state: .routed, cbtOrigin: .restored)])
        let data = try JSONEncoder().encode(status)
        #expect(try JSONDecoder().decode(Keys.self, from: data).names == ["devices", "trackers", "snapshots", "exports", "declared"])
        #expect(try JSONDecoder().decode(DaemonStatus.self, from: data) == status)
        #expect(String(decoding: data, as: UTF8.self).contains(#""cbtOrigin":"restored""#))
    }

    /// A blksnapctl reads the status of an older blksnapd, which sent no
    /// exports and no declared devices.
    @Test func anOlderStatusReadsWithEmptyExportsAndDeclarations() throws {
        let engineOnly = try JSONEncoder().encode(Self.engine)
        let status = try JSONDecoder().decode(DaemonStatus.self, from: engineOnly)
        #expect(status == DaemonStatus(engine: Self.engine))
        #expect(status.exports.isEmpty && status.declared.isEmpty)
    }

    @Test func theEngineStatusCarriesNoExports() throws {
        let data = try JSONEncoder().encode(Self.engine)
        #expect(try JSONDecoder().decode(Keys.self, from: data).names == ["devices", "trackers", "snapshots"])
    }
}
