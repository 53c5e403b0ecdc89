import BlksnapABI

/// One event of a snapshot, as WAIT_EVENT returns it.
public struct SnapshotEvent: Sendable, Equatable {
    public var code: EventCode
    /// Nanoseconds since boot.
    public var timeLabel: Int64
    public var data: [UInt8]
}

/// The events of one snapshot (upstream `event_queue.c`): low free space and
/// corrupted, in the order they happened.
///
/// WAIT_EVENT sleeps on `condition` with only this queue's lock, released
/// while it sleeps, so a waiter never holds up CREATE, TAKE or I/O.
public final class EventQueue: @unchecked Sendable {
    private let lock = Lock()
    private let condition = Condition()
    private var events: [SnapshotEvent] = []
    private var head = 0
    private var closed = false
    private var sleeping = 0
    private let counters: EngineCounters?

    public init(counters: EngineCounters? = nil) {
        self.counters = counters
    }

    public func post(_ code: EventCode, data: [UInt8]) {
        counters?.countEvent(code)
        lock.withLock {
            events.append(SnapshotEvent(code: code, timeLabel: bootNanoseconds(), data: data))
        }
        condition.broadcast()
    }

    /// The oldest event, waiting up to `timeoutMs` for one: ENOENT when none
    /// came, ESRCH when the snapshot was destroyed meanwhile.
    public func wait(timeoutMs: UInt32) throws(BlksnapError) -> SnapshotEvent {
        let deadline = monotonicNanoseconds() + UInt64(timeoutMs) * 1_000_000
        lock.lock()
        defer { lock.unlock() }
        while true {
            if head < events.count {
                let event = events[head]
                head += 1
                if head == events.count {
                    events.removeAll(keepingCapacity: true)
                    head = 0
                }
                return event
            }
            if closed { throw BlksnapError(.noSuchProcess, "the snapshot was destroyed") }
            sleeping += 1
            let woken = condition.wait(lock, untilMonotonic: deadline)
            sleeping -= 1
            if !woken && head == events.count && !closed {
                throw BlksnapError(.noSuchFileOrDirectory, "no event within \(timeoutMs) ms")
            }
        }
    }

    /// Wakes every waiter with ESRCH; DESTROY calls it.
    public func close() {
        lock.withLock { closed = true }
        condition.broadcast()
    }

    /// Callers asleep in `wait` right now: a test's signal that a waiter
    /// is there to be woken, where a sleep would only guess.
    public var waiters: Int { lock.withLock { sleeping } }

    /// Events queued and not yet taken.
    public var pending: [SnapshotEvent] { lock.withLock { Array(events[head...]) } }
}
