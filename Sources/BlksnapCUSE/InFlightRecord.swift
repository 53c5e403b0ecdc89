import BlksnapEngine
#if canImport(Glibc)
import Glibc
#endif

/// How many requests of /dev/blksnap blksnapd is answering at this moment,
/// in a shared mapping of a small file: a store to it reaches the page
/// cache at once, so it outlives a kill -9, and the next blksnapd reads
/// what the dead one left unanswered.
///
/// It matters where the kernel cannot send those requests again (before
/// Linux 6.9): their callers would wait for ever, so a kept connection is
/// let go when the count is not 0. A request is counted from the moment
/// its handler starts: one that libfuse had read in the instant before
/// is not seen.
final class InFlightRecord: @unchecked Sendable {
    let path: String
    /// What the file held when opened: the count a blksnapd that died left
    /// (0 after a clean stop, or for a new file).
    let previous: Int64
    private let lock = Lock()
    private let slot: UnsafeMutablePointer<Int64>
    private var count: Int64 = 0

    init(path: String) throws(BlksnapError) {
        self.path = path
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { throw BlksnapError(.init(rawValue: errno), "cannot open \(path)") }
        defer { close(fd) }
        var left: Int64 = 0
        let read = withUnsafeMutableBytes(of: &left) { pread(fd, $0.baseAddress, 8, 0) }
        previous = read == 8 ? Int64(littleEndian: left) : 0
        guard ftruncate(fd, 8) == 0 else { throw BlksnapError(.init(rawValue: errno), "cannot size \(path)") }
        guard let map = mmap(nil, 8, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), map != MAP_FAILED else {
            throw BlksnapError(.init(rawValue: errno), "cannot map \(path)")
        }
        slot = map.bindMemory(to: Int64.self, capacity: 1)
        slot.pointee = 0
    }

    deinit { munmap(slot, 8) }

    func begin() { lock.withLock { count += 1; slot.pointee = count.littleEndian } }
    func end() { lock.withLock { count -= 1; slot.pointee = count.littleEndian } }
}
