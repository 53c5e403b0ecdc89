#if canImport(Glibc)
import Glibc
#endif

/// A closure run on a thread of its own, and joined. Joined with
/// pthread_join rather than a flag, so that once `join` returns the thread
/// has let go of everything it held: a harness's leak check can then look
/// at once instead of polling for a thread that is still unwinding (polling
/// made that check most of an input's time).
public final class Background: @unchecked Sendable {
    private var thread = pthread_t()
    private var joined = false

    public init(_ body: @escaping @Sendable () -> Void) {
        final class Box {
            let body: @Sendable () -> Void
            init(_ body: @escaping @Sendable () -> Void) { self.body = body }
        }
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        let rc = pthread_create(&thread, nil, { arg in
            Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue().body()
            return nil
        }, box)
        precondition(rc == 0, "pthread_create failed: \(rc)")
    }

    public func join() {
        guard !joined else { return }
        joined = true
        pthread_join(thread, nil)
    }

    deinit { join() }
}
