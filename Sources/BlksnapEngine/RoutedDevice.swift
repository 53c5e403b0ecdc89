import BlksnapABI

/// A block device whose writes reach the engine before its backing store:
/// the only kind of device blksnap-swift tracks or snapshots.
///
/// A program in user space sees only the writes that pass through it, so
/// the frontends (NBD, FUSE) expose this object as the device, and every
/// write goes through `write`, which marks the CBT map and copies chunks on
/// write before the backing store is touched.
///
/// `gate` is held shared by every write and exclusive while TAKE switches
/// maps or a tracker comes or goes, so no write is ever half-way across a
/// switch. Reads need no gate: they never change what an image sees.
public final class RoutedDevice: BlockDevice, @unchecked Sendable {
    public let devId: DevId
    public let backing: any BlockDevice
    public let size: UInt64
    let gate = ReadWriteLock()
    /// Changed with `gate` exclusive.
    var tracker: Tracker?
    /// Where this device's CBT map is kept across restarts (nil: nowhere).
    public let store: CbtStore?
    /// How its tracking began when it was routed; guarded by the engine's lock.
    public internal(set) var cbtOutcome: CbtStore.Outcome = .none
    /// Requests and bytes routed, chunks copied on write: for metrics.
    public let counters = DeviceCounters()

    init(devId: DevId, backing: any BlockDevice, store: CbtStore? = nil) {
        self.devId = devId
        self.backing = backing
        self.size = backing.size
        self.store = store
    }

    public var alignment: Int { backing.alignment }

    private func check(_ offset: UInt64, _ length: UInt64) throws(BlksnapError) {
        guard offset <= size, length <= size - offset else {
            throw BlksnapError(.noSpace, "I/O at \(offset)+\(length) past the end of \(devId) (\(size) bytes)")
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        try check(offset, UInt64(buffer.count))
        counters.countRead(buffer.count)
        try backing.read(into: buffer, at: offset)
    }

    /// A read of the routed device is a read of its backing store, so the
    /// backing's file serves it as it is. Counted here: the caller reads it.
    public func fileRange(at offset: UInt64, count: Int) -> (descriptor: Int32, offset: UInt64)? {
        guard offset <= size, UInt64(count) <= size - offset,
              let range = backing.fileRange(at: offset, count: count) else { return nil }
        counters.countRead(count)
        return range
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        try check(offset, UInt64(buffer.count))
        gate.lockShared()
        defer { gate.unlock() }
        tracker?.beforeWrite(offset: offset, length: UInt64(buffer.count))
        counters.countWrite(buffer.count)
        try backing.write(buffer, at: offset)
    }

    /// A discard changes what the device reads back, so it is tracked and
    /// copied on write exactly like a write.
    public func discard(at offset: UInt64, length: UInt64) throws(BlksnapError) {
        try check(offset, length)
        gate.lockShared()
        defer { gate.unlock() }
        tracker?.beforeWrite(offset: offset, length: length)
        counters.countDiscard(length)
        try backing.discard(at: offset, length: length)
    }

    public func flush() throws(BlksnapError) { try backing.flush() }
}
