import CBlksnapLinux
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Moves bytes from one file to another inside the kernel, through a pipe
/// kept per thread (splice(2) needs a pipe at one end): page-cache pages
/// of the source go into the pipe by reference and out to the target,
/// where an O_DIRECT target has the device read them from there. A copy
/// on write stores a chunk this way with no copy of its bytes through a
/// buffer of ours.
enum SplicePipe {
    /// The pipe's read end, write end and capacity; closed when its thread ends.
    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key) { raw in
            let fds = raw!.assumingMemoryBound(to: Int32.self)
            close(fds[0])
            close(fds[1])
            fds.deallocate()
        }
        return key
    }()

    private static let size: Int32 = 1 << 20

    private static func current() -> UnsafeMutablePointer<Int32>? {
        if let kept = pthread_getspecific(key) { return kept.assumingMemoryBound(to: Int32.self) }
        let fds = UnsafeMutablePointer<Int32>.allocate(capacity: 3)
        guard blksnap_pipe(fds, size, fds + 2) == 0 else {
            fds.deallocate()
            return nil
        }
        pthread_setspecific(key, fds)
        return fds
    }

    /// A pipe a failure left bytes in is closed; the thread's next move
    /// opens a fresh one.
    private static func dropCurrent(_ fds: UnsafeMutablePointer<Int32>) {
        pthread_setspecific(key, nil)
        close(fds[0])
        close(fds[1])
        fds.deallocate()
    }

    /// Moves `count` bytes of `source` at `sourceOffset` to `target` at
    /// `targetOffset`. False, having moved nothing the caller needs, where
    /// the kernel cannot splice between these files (EINVAL: an O_DIRECT
    /// target's alignment, a file system without splice); a failure of
    /// the target's device throws with its errno.
    static func move(from source: Int32, at sourceOffset: UInt64, to target: Int32, at targetOffset: UInt64,
                     count: Int) throws(BlksnapError) -> Bool {
        guard count > 0 else { return true }
        guard let fds = current() else { return false }
        var from = Int64(sourceOffset), to = Int64(targetOffset)
        var left = count
        while left > 0 {
            let n = blksnap_splice(source, &from, fds[1], nil, min(left, Int(fds[2])))
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                // Nothing is in the pipe: a source that cannot be spliced, or
                // one shorter than it said (the caller reads it as zeros).
                if n < 0 && errno != EINVAL {
                    throw BlksnapError(Errno(rawValue: errno), "splice from descriptor \(source) failed")
                }
                return false
            }
            var inPipe = n
            while inPipe > 0 {
                let m = blksnap_splice(fds[0], nil, target, &to, inPipe)
                if m < 0 && errno == EINTR { continue }
                guard m > 0 else {
                    let e = m < 0 ? errno : EIO
                    dropCurrent(fds)
                    if e == EINVAL { return false }
                    throw BlksnapError(Errno(rawValue: e), "splice to descriptor \(target) failed")
                }
                inPipe -= m
            }
            left -= n
        }
        return true
    }
}
