#if canImport(Glibc)
import Glibc
#endif

/// Whether `condition` holds within about a second. It yields before it
/// sleeps: what it waits for is a thread that is already unwinding, and a
/// fixed millisecond's sleep for it was most of an input's time.
public func eventually(_ condition: () -> Bool) -> Bool {
    for _ in 0..<1000 {
        if condition() { return true }
        sched_yield()
    }
    for _ in 0..<1000 {
        if condition() { return true }
        usleep(1000)
    }
    return condition()
}
