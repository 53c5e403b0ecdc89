@testable import BlksnapEngine
import Dispatch
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// What the flushes and the waiters did, in order; the first flush holds
/// until `release`, so a test can act while it runs.
private final class FlushLog: @unchecked Sendable {
    private let lock = Lock()
    private let changed = Condition()
    private var list: [String] = []
    private var released = false
    private var flushes = 0
    var failWith: Int32 = 0

    func add(_ s: String) { lock.withLock { list.append(s); changed.broadcast() } }
    var events: [String] { lock.withLock { list } }
    func waitFor(_ s: String) { lock.withLock { while !list.contains(s) { changed.wait(lock) } } }
    func release() { lock.withLock { released = true; changed.broadcast() } }

    func flush() -> Int32 {
        let n = lock.withLock { flushes += 1; return flushes }
        add("begin \(n)")
        if n == 1 { lock.withLock { while !released { changed.wait(lock) } } }
        add("end \(n)")
        return failWith
    }
}

@Suite struct GroupFlushTests {
    /// A ticket taken while a flush runs needs the next one: the running
    /// flush may have begun before the caller's write returned.
    @Test func aTicketTakenDuringAFlushWaitsForTheNextOne() {
        let log = FlushLog()
        let group = GroupFlush { log.flush() }
        let first = group.ticket()
        #expect(first == 1)
        let a = DispatchGroup()
        DispatchQueue.global().async(group: a) {
            #expect(group.wait(for: first) == 0)
            log.add("A returned")
        }
        log.waitFor("begin 1")
        let second = group.ticket()
        #expect(second == 2)
        #expect(!group.isDone(second))
        DispatchQueue.global().async(group: a) {
            #expect(group.wait(for: second) == 0)
            log.add("B returned")
        }
        log.release()
        a.wait()
        let events = log.events
        func at(_ s: String) -> Int { events.firstIndex(of: s) ?? -1 }
        #expect(at("A returned") > at("end 1"))
        #expect(at("begin 2") > at("end 1"))
        #expect(at("B returned") > at("end 2"))
        #expect(group.isDone(second))
    }

    /// Every ticket taken before a flush began is served by that one flush.
    @Test func waitersWithTheSameTicketShareOneFlush() {
        let log = FlushLog()
        let group = GroupFlush { log.flush() }
        let a = DispatchGroup()
        let first = group.ticket()
        DispatchQueue.global().async(group: a) { _ = group.wait(for: first) }
        log.waitFor("begin 1")
        let tickets = (0..<5).map { _ in group.ticket() }
        #expect(Set(tickets) == [2])
        for t in tickets { DispatchQueue.global().async(group: a) { #expect(group.wait(for: t) == 0) } }
        log.release()
        a.wait()
        #expect(log.events.filter { $0.hasPrefix("begin") }.count == 2)
    }

    /// A failed flush fails its waiters with its errno.
    @Test func aFailedFlushFailsItsWaiters() {
        let log = FlushLog()
        log.release()
        log.failWith = EIO
        let group = GroupFlush { log.flush() }
        #expect(group.wait(for: group.ticket()) == EIO)
        log.failWith = 0
        #expect(group.wait(for: group.ticket()) == 0)
    }
}
