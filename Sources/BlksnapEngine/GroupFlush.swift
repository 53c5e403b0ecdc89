#if canImport(Glibc)
import Glibc
#endif

/// Flushes of a file shared by every writer waiting for one (group
/// commit), run by a thread of their own: a writer takes a ticket once its
/// write has returned, the number of the first flush to begin after that,
/// which asks for that flush at once; it may do other work while the flush
/// runs and then waits until that flush (or a later one) has finished. One
/// flush serves every ticket taken before it began.
///
/// A flush costs about a millisecond or more on a disk with a write cache
/// whatever it covers, so writers that each flush under one lock queue
/// behind one another's flushes; with this, concurrent writers pay for
/// about one, and a writer overlaps it with its copy-on-write.
final class GroupFlush: @unchecked Sendable {
    private let lock = Lock()
    private let changed = Condition()
    private var started: UInt64 = 0
    private var finished: UInt64 = 0
    /// The highest ticket given out.
    private var wanted: UInt64 = 0
    private var stopped = false
    private var flushing = false
    /// The number of the last flush that failed, and its errno.
    private var failed: UInt64 = 0
    private var failure: Int32 = 0
    private let flush: @Sendable () -> Int32

    /// `flush` makes every write that returned before it began durable and
    /// returns 0 or an errno.
    init(_ flush: @escaping @Sendable () -> Int32) {
        self.flush = flush
        startThread { [self] in run() }
    }

    private func run() {
        lock.lock()
        while true {
            if stopped { break }
            guard wanted > started else {
                changed.wait(lock)
                continue
            }
            started += 1
            let number = started
            flushing = true
            lock.unlock()
            let result = flush()
            lock.lock()
            flushing = false
            finished = number
            if result != 0 { (failed, failure) = (number, result) }
            changed.broadcast()
        }
        lock.unlock()
    }

    /// Ends the thread; waiters from then on fail with ECANCELED. Returns
    /// once no flush runs, so the caller may close what `flush` uses.
    func stop() {
        lock.withLock {
            stopped = true
            changed.broadcast()
            while flushing { changed.wait(lock) }
        }
    }

    /// The first flush that begins from now on, asked for: a write that has
    /// returned is durable once it has finished.
    func ticket() -> UInt64 {
        lock.withLock {
            wanted = started + 1
            changed.broadcast()
            return wanted
        }
    }

    /// Whether flush `ticket` (or a later one) has finished.
    func isDone(_ ticket: UInt64) -> Bool { lock.withLock { finished >= ticket } }

    /// Returns once flush `ticket` or a later one has finished: 0, or the
    /// errno of a flush from `ticket` on that failed (a later flush covers
    /// the ticket's writes too, so its failure is theirs).
    func wait(for ticket: UInt64) -> Int32 {
        lock.lock()
        defer { lock.unlock() }
        while finished < ticket {
            if stopped { return ECANCELED }
            changed.wait(lock)
        }
        return failed >= ticket ? failure : 0
    }
}
