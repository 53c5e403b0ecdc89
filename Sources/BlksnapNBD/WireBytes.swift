/// Big-endian encoding into a growing byte array: every NBD field is
/// network byte order, whatever the host.
public struct WireWriter: Sendable {
    public var bytes: [UInt8]

    public init(_ bytes: [UInt8] = []) { self.bytes = bytes }

    public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.bigEndian) { bytes += $0 } }
    public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.bigEndian) { bytes += $0 } }
    public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.bigEndian) { bytes += $0 } }

    /// A string preceded by its 32-bit length, as options and replies carry them.
    public mutating func string32(_ s: String) {
        let utf8 = Array(s.utf8)
        u32(UInt32(utf8.count))
        bytes += utf8
    }
}

/// Big-endian decoding of a byte buffer; every read returns nil rather
/// than run past the end, so a short option is an answer (INVALID), never
/// a crash.
public struct WireReader {
    private let base: UnsafeRawBufferPointer
    public private(set) var position = 0

    public init(_ base: UnsafeRawBufferPointer) { self.base = base }

    public var remaining: Int { base.count - position }

    private mutating func load<T: FixedWidthInteger>(_: T.Type) -> T? {
        let n = MemoryLayout<T>.size
        guard remaining >= n else { return nil }
        var v: T = 0
        withUnsafeMutableBytes(of: &v) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: base[position..<(position + n)])) }
        position += n
        return T(bigEndian: v)
    }

    public mutating func u16() -> UInt16? { load(UInt16.self) }
    public mutating func u32() -> UInt32? { load(UInt32.self) }
    public mutating func u64() -> UInt64? { load(UInt64.self) }

    public mutating func bytes(_ count: Int) -> [UInt8]? {
        guard count >= 0, remaining >= count else { return nil }
        defer { position += count }
        return Array(base[position..<(position + count)])
    }

    /// A protocol string: at most 4096 bytes of UTF-8 without NUL.
    public mutating func string(_ count: Int) -> String? {
        guard count <= NBD.maxString, let raw = bytes(count), !raw.contains(0) else { return nil }
        return String(validating: raw, as: UTF8.self)
    }
}
