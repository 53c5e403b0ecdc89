import BlksnapTestSupport

/// The fuzzer's bytes read as a stream of decisions. Past the end every
/// read gives zeros, so any prefix of an input is itself a valid input and
/// libFuzzer's shrinking keeps working.
public struct FuzzInput {
    public let bytes: [UInt8]
    public private(set) var position = 0

    public init(_ start: UnsafePointer<UInt8>?, _ count: Int) {
        bytes = count > 0 ? Array(UnsafeBufferPointer(start: start, count: count)) : []
    }

    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    public var isAtEnd: Bool { position >= bytes.count }
    public var remaining: Int { max(bytes.count - position, 0) }

    public mutating func u8() -> UInt8 {
        defer { position += 1 }
        return position < bytes.count ? bytes[position] : 0
    }

    public mutating func u16() -> UInt16 { UInt16(u8()) | UInt16(u8()) << 8 }
    public mutating func u32() -> UInt32 { UInt32(u16()) | UInt32(u16()) << 16 }
    public mutating func u64() -> UInt64 { UInt64(u32()) | UInt64(u32()) << 32 }

    /// Big-endian, as every NBD field.
    public mutating func u16be() -> UInt16 { UInt16(u8()) << 8 | UInt16(u8()) }
    public mutating func u32be() -> UInt32 { UInt32(u16be()) << 16 | UInt32(u16be()) }
    public mutating func u64be() -> UInt64 { UInt64(u32be()) << 32 | UInt64(u32be()) }

    /// Up to `count` bytes: fewer when the input ends first.
    public mutating func take(_ count: Int) -> [UInt8] {
        let n = min(max(count, 0), remaining)
        guard n > 0 else { return [] }
        defer { position += n }
        return Array(bytes[position..<(position + n)])
    }

    public mutating func rest() -> [UInt8] { take(remaining) }
}

/// "Random" caller memory must come out the same when libFuzzer replays an
/// input: the tests' seeded generator makes it.
extension SplitMix64 {
    public mutating func bytes(_ count: Int) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(count)
        while out.count < count {
            let v = next()
            for i in 0..<min(8, count - out.count) { out.append(UInt8(truncatingIfNeeded: v >> (8 * UInt64(i)))) }
        }
        return out
    }
}
