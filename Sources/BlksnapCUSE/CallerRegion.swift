/// A span of the calling process's memory: what one iovec of the CUSE
/// ioctl retry protocol names, and what the kernel copies in or out.
public struct CallerRegion: Equatable, Hashable, Sendable, CustomStringConvertible {
    public var address: UInt64
    public var count: Int

    public init(address: UInt64, count: Int) {
        self.address = address
        self.count = count
    }

    /// One past the last byte, or nil when the span wraps the address
    /// space (no copy could ever succeed there).
    public var end: UInt64? {
        let (end, overflow) = address.addingReportingOverflow(UInt64(count))
        return overflow ? nil : end
    }

    public func contains(_ other: CallerRegion) -> Bool {
        guard let end, let otherEnd = other.end else { return false }
        return other.address >= address && otherEnd <= end
    }

    /// The byte range of `other` that falls inside this region, as offsets
    /// into each: nil when they do not meet.
    func overlap(_ other: CallerRegion) -> (here: Range<Int>, there: Range<Int>)? {
        guard let end, let otherEnd = other.end else { return nil }
        let low = max(address, other.address)
        let high = min(end, otherEnd)
        guard low < high else { return nil }
        let length = Int(high - low)
        let here = Int(low - address)
        let there = Int(low - other.address)
        return (here..<(here + length), there..<(there + length))
    }

    public var description: String { "0x\(String(address, radix: 16))+\(count)" }
}
