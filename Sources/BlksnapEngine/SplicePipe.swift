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
/// buffer of ours, and the NBD server sends a routed device's reads so.
public enum SplicePipe {
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

    /// Room for a 1 MiB read and the reply header before it (a pipe holds
    /// whole pages: 256 of data plus one for the header and one for an
    /// unaligned start). Only 1 MiB where the system refuses more.
    private static let size: Int32 = 2 << 20

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
            let e = spliceAll(from: fds[0], nil, to: target, &to, count: n)
            guard e == 0 else {
                dropCurrent(fds)
                if e == EINVAL { return false }
                throw BlksnapError(Errno(rawValue: e), "splice to descriptor \(target) failed")
            }
            left -= n
        }
        return true
    }

    /// Whether the calling thread's pipe has room for `count` bytes of a
    /// file at `offset`, and for a prefix before them: each pipe slot
    /// holds at most one page, and a splice into a full pipe would wait
    /// for a reader that is this very thread.
    public static func room(for count: Int, at offset: UInt64) -> (data: Bool, prefix: Bool) {
        guard let fds = current() else { return (false, false) }
        let pages = (Int(offset % 4096) + count + 4095) / 4096
        return (pages * 4096 <= Int(fds[2]), (pages + 1) * 4096 <= Int(fds[2]))
    }

    /// Puts `prefix` (where there is room for it: see `room`; else the
    /// caller sends it itself first), then `count` bytes of `source` at
    /// `offset`, into the calling thread's pipe, ready for `drain` on the
    /// same thread: the file's page-cache pages go in by reference. A read
    /// error of the source shows here, before anything reached the target,
    /// so the caller can still answer with it. Returns the bytes in the
    /// pipe, or nil, the pipe left empty, where it cannot take them or the
    /// source cannot be spliced or ends early: the caller then reads the
    /// bytes itself.
    public static func load(prefix: UnsafeRawBufferPointer, from source: Int32, at offset: UInt64,
                            count: Int) -> Int? {
        let room = room(for: count, at: offset)
        guard room.data, let fds = current() else { return nil }
        let inPipe = room.prefix ? prefix.count : 0
        if inPipe > 0 {
            var n: Int
            repeat { n = write(fds[1], prefix.baseAddress!, prefix.count) } while n < 0 && errno == EINTR
            guard n == prefix.count else {
                dropCurrent(fds)
                return nil
            }
        }
        var from = Int64(offset)
        guard spliceAll(from: source, &from, to: fds[1], nil, count: count) == 0 else {
            dropCurrent(fds)
            return nil
        }
        return inPipe + count
    }

    /// Sends the `count` bytes `load` put in the calling thread's pipe to
    /// `target`, in order and whole. False if the target failed (a peer
    /// gone: EPIPE, and SIGPIPE unless the thread blocks it, since splice
    /// has no MSG_NOSIGNAL); the pipe is then dropped with what was left.
    public static func drain(_ count: Int, to target: Int32) -> Bool {
        guard let fds = current() else { return false }
        guard spliceAll(from: fds[0], nil, to: target, nil, count: count) == 0 else {
            dropCurrent(fds)
            return false
        }
        return true
    }

    /// Splices all `count` bytes, the offsets given advancing; 0, or the
    /// errno of the call that failed (EIO where one moved nothing: the
    /// source ended early).
    private static func spliceAll(from source: Int32, _ sourceOffset: UnsafeMutablePointer<Int64>?, to target: Int32,
                                  _ targetOffset: UnsafeMutablePointer<Int64>?, count: Int) -> Int32 {
        var left = count
        while left > 0 {
            let n = blksnap_splice(source, sourceOffset, target, targetOffset, left)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return n < 0 ? errno : EIO }
            left -= n
        }
        return 0
    }

    /// Empties the calling thread's pipe of what `load` put there, when it
    /// is not to be sent after all.
    public static func discard() {
        if let kept = pthread_getspecific(key) { dropCurrent(kept.assumingMemoryBound(to: Int32.self)) }
    }
}
