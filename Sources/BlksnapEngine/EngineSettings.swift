/// The module's parameters, with the module's defaults (Kconfig of v1).
///
/// blksnapd exposes each as a kebab-case option; the upstream shell tests
/// load the module with `diffStorageMinimum = 262144`.
public struct EngineSettings: Sendable, Equatable {
    /// Sectors asked for at CREATE and in each later low-free-space event.
    public var diffStorageMinimum: UInt64 = 2_097_152
    /// The tracking block starts at 2^shift bytes and doubles until the map
    /// has at most `trackingBlockMaximumCount` blocks, or 2^26 is reached.
    public var trackingBlockMinimumShift: Int = 16
    public var trackingBlockMaximumShift: Int = 26
    public var trackingBlockMaximumCount: UInt64 = 2_097_152
    /// Chunks (the unit of copy-on-write) size themselves the same way.
    public var chunkMinimumShift: Int = 18
    public var chunkMaximumShift: Int = 26
    public var chunkMaximumCount: UInt64 = 2_097_152
    /// How many chunk buffers each device keeps for reuse.
    public var chunkMaximumInCache: Int = 64

    public init() {}

    /// Smallest shift >= minimum whose block count fits, capped at maximum.
    static func shift(capacity: UInt64, minimum: Int, maximum: Int, maximumCount: UInt64,
                      atLeast floorShift: Int = 9) -> (shift: Int, count: UInt64) {
        var shift = max(min(minimum, maximum), floorShift)
        func count(_ s: Int) -> UInt64 { (capacity + (1 << UInt64(s)) - 1) >> UInt64(s) }
        while count(shift) > maximumCount && shift < maximum { shift += 1 }
        return (shift, count(shift))
    }
}
