import BlksnapABI
@testable import BlksnapEngine
import Testing
#if canImport(Glibc)
import Glibc
#endif

@Suite struct EventQueueTests {
    @Test func nothingQueuedTimesOutWithENOENT() {
        let q = EventQueue()
        let start = monotonicNanoseconds()
        #expect { try q.wait(timeoutMs: 30) } throws: { ($0 as? BlksnapError)?.errno == .noSuchFileOrDirectory }
        #expect(monotonicNanoseconds() - start >= 25_000_000)
    }

    @Test func eventsComeOutInOrderWithBootTimeLabels() throws {
        let q = EventQueue()
        q.post(.lowFreeSpace, data: [1])
        q.post(.corrupted, data: [2])
        let a = try q.wait(timeoutMs: 0)
        let b = try q.wait(timeoutMs: 0)
        #expect(a.code == .lowFreeSpace && b.code == .corrupted)
        #expect(a.timeLabel > 0 && b.timeLabel >= a.timeLabel)
    }

    @Test func closingWakesWaitersWithESRCH() {
        let q = EventQueue()
        startThread {
            let asleepBy = ContinuousClock.now + .seconds(5)
            while q.waiters == 0 && ContinuousClock.now < asleepBy { sched_yield() }
            // Closed only once a waiter sleeps: unseen, the wait times out
            // with ENOENT and the test fails.
            if q.waiters == 1 { q.close() }
        }
        #expect { try q.wait(timeoutMs: 10_000) } throws: { ($0 as? BlksnapError)?.errno == .noSuchProcess }
    }
}
