/// Little-endian encoding of what blksnapd saves on disk (`CbtStore`,
/// `WriteIntent`), with a reader that never reads past what it was given.
struct ByteWriter {
    var bytes: [UInt8] = []
    mutating func append(_ raw: [UInt8]) { bytes += raw }
    mutating func append<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.littleEndian) { bytes += $0 }
    }
    /// A length-prefixed string.
    mutating func append(_ text: String) {
        let utf8 = Array(text.utf8)
        append(UInt32(utf8.count))
        append(utf8)
    }
}

struct ByteReader {
    let bytes: [UInt8]
    var offset = 0
    init(_ bytes: [UInt8]) { self.bytes = bytes }

    struct Short: Error {}

    mutating func take(_ n: Int) throws(Short) -> ArraySlice<UInt8> {
        guard n >= 0, n <= bytes.count - offset else { throw Short() }
        defer { offset += n }
        return bytes[offset..<(offset + n)]
    }
    mutating func integer<T: FixedWidthInteger>(_: T.Type = T.self) throws(Short) -> T {
        var value: T = 0
        for (i, b) in try take(MemoryLayout<T>.size).enumerated() { value |= T(truncatingIfNeeded: b) << (8 * i) }
        return value
    }
    mutating func string(atMost limit: Int) throws(Short) -> String {
        let n = try integer(UInt32.self)
        guard n <= limit else { throw Short() }
        return String(decoding: try take(Int(n)), as: UTF8.self)
    }
}

/// CRC-32C (Castagnoli), as ext4 and btrfs use for their metadata.
enum CRC32C {
    private static let table: [UInt32] = (0..<256).map { n -> UInt32 in
        var c = UInt32(n)
        for _ in 0..<8 { c = c & 1 != 0 ? 0x82F6_3B78 ^ (c >> 1) : c >> 1 }
        return c
    }

    static func checksum<C: Collection>(_ bytes: C) -> UInt32 where C.Element == UInt8 {
        var crc: UInt32 = 0xFFFF_FFFF
        for b in bytes { crc = table[Int((crc ^ UInt32(b)) & 0xFF)] ^ (crc >> 8) }
        return crc ^ 0xFFFF_FFFF
    }
}
