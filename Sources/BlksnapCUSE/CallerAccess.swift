/// Direct access to the memory of the process behind one ioctl, apart from
/// the kernel's copies.
///
/// On CUSE the kernel answers EFAULT by itself when an iovec cannot be
/// copied, which is not the module's errno; so a region is checked before
/// it is ever named in a retry. Arrays too large for one CUSE transfer are
/// read and written through it directly. Tests fake it over a fake address
/// space.
public protocol CallerAccess {
    /// False only when the bytes surely cannot be read; true when they can,
    /// or when this cannot be told (the kernel's own copy then decides).
    func canRead(_ region: CallerRegion) -> Bool
    /// False only when the bytes surely cannot be written; as `canRead`.
    func canWrite(_ region: CallerRegion) -> Bool
    /// The bytes, or nil when they cannot be read.
    func read(_ region: CallerRegion) -> [UInt8]?
    /// Stores the bytes; false when that failed.
    func write(_ bytes: [UInt8], at address: UInt64) -> Bool
}
