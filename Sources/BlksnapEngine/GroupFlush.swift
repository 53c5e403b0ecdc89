/// One flush of a file shared by every writer waiting for one (group
/// commit): a writer takes a ticket once its write has returned, the
/// number of the first flush to begin after that, and waits until that
/// flush (or a later one) has finished. One flush serves every ticket
/// taken before it began.
///
/// A flush costs about a millisecond or more on a disk with a write cache
/// whatever it covers, so writers that each flush under one lock queue
/// behind one another's flushes; with this, concurrent writers pay for
/// about one.
final class GroupFlush: @unchecked Sendable {
    private let lock = Lock()
    private let done = Condition()
    private var started: UInt64 = 0
    private var finished: UInt64 = 0
    private var running = false
    /// The number of the last flush that failed, and its errno.
    private var failed: UInt64 = 0
    private var failure: Int32 = 0
    private let flush: () -> Int32

    /// `flush` makes every write that returned before it began durable and
    /// returns 0 or an errno.
    init(_ flush: @escaping () -> Int32) { self.flush = flush }

    /// The first flush that begins from now on: a write that has returned
    /// is durable once it has finished.
    func ticket() -> UInt64 { lock.withLock { started + 1 } }

    /// Whether flush `ticket` (or a later one) has finished.
    func isDone(_ ticket: UInt64) -> Bool { lock.withLock { finished >= ticket } }

    /// Returns once flush `ticket` or a later one has finished, starting
    /// one where none runs: 0, or the errno of a flush from `ticket` on
    /// that failed (a later flush covers the ticket's writes too, so its
    /// failure is theirs).
    func wait(for ticket: UInt64) -> Int32 {
        lock.lock()
        defer { lock.unlock() }
        while finished < ticket {
            if running {
                done.wait(lock)
                continue
            }
            running = true
            started += 1
            let number = started
            lock.unlock()
            let result = flush()
            lock.lock()
            running = false
            finished = number
            if result != 0 { (failed, failure) = (number, result) }
            done.broadcast()
        }
        return failed >= ticket ? failure : 0
    }
}
