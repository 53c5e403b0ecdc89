/// One seeded generator for every test and the fault injector, so a
/// printed seed replays.
public struct SplitMix64: RandomNumberGenerator {
    public var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    /// 0 ..< n
    public mutating func below(_ n: Int) -> Int { n <= 1 ? 0 : Int(next() % UInt64(n)) }
    /// a ... b
    public mutating func within(_ a: Int, _ b: Int) -> Int { a + below(b - a + 1) }
    /// true with probability pct %
    public mutating func chance(_ pct: Int) -> Bool { below(100) < pct }
}
