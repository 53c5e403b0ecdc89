import CBlksnapABI

/// A 16-byte UUID (`uuid_t`), as snapshots and CBT generations are named.
///
/// Kept as raw bytes: the interface never parses them, only compares and
/// copies, and the tools print them in the usual 8-4-4-4-12 form.
public struct UUID16: Hashable, Sendable, CustomStringConvertible {
    public var bytes: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8,
                       UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8)

    public init(bytes: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8,
                        UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8)) {
        self.bytes = bytes
    }

    public static let zero = UUID16(bytes: (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))

    public init<C: Collection>(array: C) where C.Element == UInt8 {
        precondition(array.count == 16)
        var value = UUID16.zero
        withUnsafeMutableBytes(of: &value.bytes) { dst in
            for (i, b) in array.enumerated() { dst[i] = b }
        }
        self = value
    }

    /// A version 4 (random) UUID, as the module's generate_random_uuid() makes.
    public static func random<G: RandomNumberGenerator>(using generator: inout G) -> UUID16 {
        var raw = (0..<16).map { _ in UInt8.random(in: 0...255, using: &generator) }
        raw[6] = (raw[6] & 0x0F) | 0x40
        raw[8] = (raw[8] & 0x3F) | 0x80
        return UUID16(array: raw)
    }

    public static func random() -> UUID16 {
        var g = SystemRandomNumberGenerator()
        return random(using: &g)
    }

    public var array: [UInt8] { withUnsafeBytes(of: bytes) { Array($0) } }

    public var description: String {
        let hex = array.map { b -> String in
            let s = String(b, radix: 16)
            return b < 16 ? "0" + s : s
        }
        return hex[0..<4].joined() + "-" + hex[4..<6].joined() + "-" + hex[6..<8].joined() + "-"
            + hex[8..<10].joined() + "-" + hex[10..<16].joined()
    }

    public static func == (a: UUID16, b: UUID16) -> Bool { a.array == b.array }
    public func hash(into h: inout Hasher) { h.combine(array) }
}
