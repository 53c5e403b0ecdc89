import CBlksnapABI

/// The framing of blksnap_control.h: a request header and its payload; a
/// reply header, the caller writes (IOCTL only), then the payload. Built
/// here once for blksnapd's server and for every client.
public enum ControlFrame {
    /// A request of a type that carries a payload (STATUS, ATTACH, DETACH).
    /// A payload over BLKSNAP_CONTROL_MAX_BYTES is never sent: nil.
    public static func request(type: blksnap_control_type, payload: [UInt8] = []) -> [UInt8]? {
        guard payload.count <= Int(BLKSNAP_CONTROL_MAX_BYTES) else { return nil }
        var header = blksnap_control_request()
        header.magic = BLKSNAP_CONTROL_MAGIC
        header.type = type.rawValue
        header.payload_length = UInt32(payload.count)
        return bytes(of: header) + payload
    }

    /// One memory write a reply carries back to the caller.
    public struct Write: Sendable, Equatable {
        public var address: UInt64
        public var bytes: [UInt8]
        public init(address: UInt64, bytes: [UInt8]) { (self.address, self.bytes) = (address, bytes) }
    }

    /// The pieces of a reply, in order. Writes and payload come from
    /// blksnapd itself (an ioctl's regions were capped when they came in).
    public static func reply(result: Int32, writes: [Write] = [], payload: [UInt8] = []) -> [[UInt8]] {
        var header = blksnap_control_reply()
        header.magic = BLKSNAP_CONTROL_MAGIC
        header.result = result
        header.write_count = UInt32(writes.count)
        header.payload_length = UInt32(payload.count)
        var pieces = [bytes(of: header)]
        for w in writes {
            var wh = blksnap_control_write()
            wh.address = w.address
            wh.length = UInt32(w.bytes.count)
            pieces.append(bytes(of: wh))
            pieces.append(w.bytes)
        }
        pieces.append(payload)
        return pieces
    }

    public static func bytes<T>(of value: T) -> [UInt8] { withUnsafeBytes(of: value) { Array($0) } }
}
