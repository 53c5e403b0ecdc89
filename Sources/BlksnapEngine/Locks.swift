#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A pthread mutex on the heap, so it never moves. Hot paths take it
/// directly (no actor hop, no allocation); `Condition` waits on it.
public final class Lock: @unchecked Sendable {
    fileprivate let mutex: UnsafeMutablePointer<pthread_mutex_t>

    public init() {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        precondition(pthread_mutex_init(mutex, nil) == 0)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    @inline(__always) public func lock() { pthread_mutex_lock(mutex) }
    @inline(__always) public func unlock() { pthread_mutex_unlock(mutex) }

    @inline(__always)
    public func withLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        lock()
        defer { unlock() }
        return try body()
    }
}

/// A condition variable bound to one `Lock`, on the monotonic clock so a
/// wall-clock step never stretches a timeout.
public final class Condition: @unchecked Sendable {
    private let cond: UnsafeMutablePointer<pthread_cond_t>

    public init() {
        cond = .allocate(capacity: 1)
        cond.initialize(to: pthread_cond_t())
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        precondition(pthread_cond_init(cond, &attr) == 0)
        pthread_condattr_destroy(&attr)
    }

    deinit {
        pthread_cond_destroy(cond)
        cond.deallocate()
    }

    /// Waits with `lock` held; returns with it held.
    public func wait(_ lock: Lock) { pthread_cond_wait(cond, lock.mutex) }

    /// Waits until the monotonic deadline (nanoseconds); false on timeout.
    public func wait(_ lock: Lock, untilMonotonic deadline: UInt64) -> Bool {
        var ts = timespec(tv_sec: Int(deadline / 1_000_000_000), tv_nsec: Int(deadline % 1_000_000_000))
        return pthread_cond_timedwait(cond, lock.mutex, &ts) != ETIMEDOUT
    }

    public func broadcast() { pthread_cond_broadcast(cond) }

    /// Wakes one waiter: where any waiter can take the work, waking all of
    /// them per item only has the others race for the lock and sleep again.
    public func signal() { pthread_cond_signal(cond) }
}

/// A reader-writer lock that prefers writers: I/O to a device takes it
/// shared, TAKE and tracker changes exclusive, and a TAKE must not starve
/// behind a steady stream of writes.
public final class ReadWriteLock: @unchecked Sendable {
    private let rw: UnsafeMutablePointer<pthread_rwlock_t>

    public init() {
        rw = .allocate(capacity: 1)
        rw.initialize(to: pthread_rwlock_t())
        var attr = pthread_rwlockattr_t()
        pthread_rwlockattr_init(&attr)
        pthread_rwlockattr_setkind_np(&attr, Int32(PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP))
        precondition(pthread_rwlock_init(rw, &attr) == 0)
        pthread_rwlockattr_destroy(&attr)
    }

    deinit {
        pthread_rwlock_destroy(rw)
        rw.deallocate()
    }

    @inline(__always) public func lockShared() { pthread_rwlock_rdlock(rw) }
    @inline(__always) public func lockExclusive() { pthread_rwlock_wrlock(rw) }
    @inline(__always) public func unlock() { pthread_rwlock_unlock(rw) }
}

/// Nanoseconds on CLOCK_MONOTONIC.
public func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// Nanoseconds since boot (CLOCK_BOOTTIME), the clock of event time labels.
public func bootNanoseconds() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_BOOTTIME, &ts)
    return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
}
