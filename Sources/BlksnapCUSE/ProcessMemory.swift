#if canImport(Glibc)
import Glibc
#endif

/// The address space of a calling process, reached with process_vm_readv
/// and process_vm_writev (the daemon runs as root; the caller is blocked in
/// its ioctl meanwhile), and /proc/PID/maps for write permission.
///
/// Anything that stops us from looking (no pid in our namespace, EPERM
/// under a ptrace policy, ESRCH) answers "cannot tell" to the checks, so a
/// valid call is never refused: the kernel's own copy then decides.
public struct ProcessMemory: CallerAccess, Sendable {
    public let pid: pid_t

    public init(pid: pid_t) { self.pid = pid }

    public func canRead(_ region: CallerRegion) -> Bool {
        guard region.count > 0 else { return true }
        guard region.end != nil else { return false }
        guard pid > 0, let readv = ProcessVM.readv else { return true }
        // One byte per page proves the whole page, without copying it all.
        var probes: [UInt64] = [region.address]
        var page = (region.address / ProcessVM.pageSize + 1) * ProcessVM.pageSize
        while page < region.address + UInt64(region.count) {
            probes.append(page)
            page += ProcessVM.pageSize
        }
        var scratch = [UInt8](repeating: 0, count: ProcessVM.maxIovecs)
        for batch in stride(from: 0, to: probes.count, by: ProcessVM.maxIovecs) {
            let chunk = probes[batch..<min(batch + ProcessVM.maxIovecs, probes.count)]
            let remote = chunk.map { iovec(iov_base: UnsafeMutableRawPointer(bitPattern: UInt($0)), iov_len: 1) }
            let got = scratch.withUnsafeMutableBytes { local -> Int in
                var iov = iovec(iov_base: local.baseAddress, iov_len: chunk.count)
                return remote.withUnsafeBufferPointer { readv(pid, &iov, 1, $0.baseAddress, UInt($0.count), 0) }
            }
            if got == chunk.count { continue }
            return got >= 0 ? false : errno != EFAULT
        }
        return true
    }

    public func canWrite(_ region: CallerRegion) -> Bool {
        guard canRead(region) else { return false }
        guard region.count > 0, pid > 0, let end = region.end else { return true }
        guard let maps = MemoryMaps(pid: pid) else { return true }
        return maps.allowWrite(from: region.address, to: end)
    }

    public func read(_ region: CallerRegion) -> [UInt8]? {
        guard region.count > 0 else { return [] }
        guard pid > 0, region.end != nil, let readv = ProcessVM.readv else { return nil }
        var bytes = [UInt8](repeating: 0, count: region.count)
        let got = bytes.withUnsafeMutableBytes { local -> Int in
            var here = iovec(iov_base: local.baseAddress, iov_len: region.count)
            var there = iovec(iov_base: UnsafeMutableRawPointer(bitPattern: UInt(region.address)), iov_len: region.count)
            return readv(pid, &here, 1, &there, 1, 0)
        }
        return got == region.count ? bytes : nil
    }

    public func write(_ bytes: [UInt8], at address: UInt64) -> Bool {
        guard !bytes.isEmpty else { return true }
        guard pid > 0, CallerRegion(address: address, count: bytes.count).end != nil,
              let writev = ProcessVM.writev else { return false }
        let put = bytes.withUnsafeBytes { local -> Int in
            var here = iovec(iov_base: UnsafeMutableRawPointer(mutating: local.baseAddress), iov_len: bytes.count)
            var there = iovec(iov_base: UnsafeMutableRawPointer(bitPattern: UInt(address)), iov_len: bytes.count)
            return writev(pid, &here, 1, &there, 1, 0)
        }
        return put == bytes.count
    }
}

/// process_vm_readv/writev, which Swift's Glibc module does not declare
/// (they sit behind _GNU_SOURCE): found in libc at run time.
enum ProcessVM {
    typealias Call = @convention(c) (pid_t, UnsafePointer<iovec>?, UInt, UnsafePointer<iovec>?, UInt, UInt) -> Int

    static let readv: Call? = lookup("process_vm_readv")
    static let writev: Call? = lookup("process_vm_writev")
    static let pageSize = UInt64(sysconf(Int32(_SC_PAGESIZE)))
    /// IOV_MAX: the most iovecs one call takes.
    static let maxIovecs = 1024

    private static func lookup(_ name: String) -> Call? {
        guard let symbol = dlsym(nil, name) else { return nil }
        return unsafeBitCast(symbol, to: Call.self)
    }
}

/// The mappings of a process, from /proc/PID/maps: which spans may be
/// written (copy_to_user fails on a read-only mapping that can be read).
struct MemoryMaps {
    private var spans: [(start: UInt64, end: UInt64, writable: Bool)] = []

    init?(pid: pid_t) {
        guard let file = fopen("/proc/\(pid)/maps", "r") else { return nil }
        defer { fclose(file) }
        var line = [CChar](repeating: 0, count: 4096)
        while fgets(&line, Int32(line.count), file) != nil {
            let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            let fields = text.split(separator: " ", maxSplits: 2)
            guard fields.count >= 2 else { continue }
            let bounds = fields[0].split(separator: "-")
            guard bounds.count == 2, let start = UInt64(bounds[0], radix: 16), let end = UInt64(bounds[1], radix: 16)
            else { continue }
            spans.append((start, end, fields[1].dropFirst().first == "w"))
        }
    }

    /// Whether writable mappings cover every byte of [start, end) without a gap.
    func allowWrite(from start: UInt64, to end: UInt64) -> Bool {
        var next = start
        for span in spans.sorted(by: { $0.start < $1.start }) where span.end > next && span.start <= next {
            guard span.writable else { return false }
            next = span.end
            if next >= end { return true }
        }
        return next >= end
    }
}
