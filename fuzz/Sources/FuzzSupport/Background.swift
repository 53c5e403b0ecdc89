import BlksnapEngine

/// A closure run on a thread of its own, and waited for.
public final class Background: @unchecked Sendable {
    private let lock = Lock()
    private let finished = Condition()
    private var done = false

    public init(_ body: @escaping @Sendable () -> Void) {
        startThread { [self] in
            body()
            lock.withLock {
                done = true
                finished.broadcast()
            }
        }
    }

    public func join() {
        lock.withLock { while !done { finished.wait(lock) } }
    }
}
