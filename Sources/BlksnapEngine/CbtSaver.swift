/// Saves every kept CBT map at a fixed interval (`Engine.saveCbt`), so that
/// after a crash the write-intent record only has to cover what was written
/// since: each save clears it. Its own thread; `stop` wakes it at once.
public final class CbtSaver: @unchecked Sendable {
    private let lock = Lock()
    private let wake = Condition()
    private var stopped = false
    private var running = false

    public init() {}

    public func start(engine: Engine, intervalSeconds: UInt64) {
        lock.withLock { running = true }
        startThread { [self] in
            lock.lock()
            while !stopped {
                let deadline = monotonicNanoseconds() + intervalSeconds * 1_000_000_000
                while !stopped && monotonicNanoseconds() < deadline { _ = wake.wait(lock, untilMonotonic: deadline) }
                guard !stopped else { break }
                lock.unlock()
                engine.saveCbt()
                lock.lock()
            }
            running = false
            wake.broadcast()
            lock.unlock()
        }
    }

    /// Returns once the thread has finished any save it was in.
    public func stop() {
        lock.withLock {
            stopped = true
            wake.broadcast()
            while running { wake.wait(lock) }
        }
    }
}
