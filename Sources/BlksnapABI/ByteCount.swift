/// A size as people write it on a command line: 1048576, 512M, 10G, with
/// K, M, G or T for powers of 1024. Shared by blksnapctl and
/// blksnap-backup, so `--size 10G` means the same to both.
public struct ByteCount: Sendable, Equatable {
    public var bytes: UInt64

    public init(bytes: UInt64) { self.bytes = bytes }

    /// nil for anything else, and for a size past UInt64 (no wrap-around).
    public init?(_ text: String) {
        let shifts: [Character: UInt64] = ["K": 10, "M": 20, "G": 30, "T": 40]
        var digits = Substring(text)
        var shift: UInt64 = 0
        if let last = digits.last?.uppercased().first, let s = shifts[last] {
            shift = s
            digits = digits.dropLast()
        }
        guard let n = UInt64(digits), n <= UInt64.max >> shift else { return nil }
        bytes = n << shift
    }
}
