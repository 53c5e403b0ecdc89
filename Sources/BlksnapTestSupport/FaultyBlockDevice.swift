import BlksnapEngine
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// A `BlockDevice` that fails, cuts short or delays the calls its
/// `FaultInjector` picks, and passes every other call to the device beneath.
///
/// Put under a routed device's backing store or under difference storage,
/// it shows what the engine does when a disk errs: a failed call throws a
/// `BlksnapError` with the injected errno; a short one first moves a prefix
/// on the device beneath (see `FaultEffect`). Test support only: blksnapd
/// never links it, and a real failing disk is proven by the scenarios.
public final class FaultyBlockDevice: BlockDevice, @unchecked Sendable {
    public let name: String
    public let base: any BlockDevice
    public let injector: FaultInjector

    public init(_ base: any BlockDevice, name: String, injector: FaultInjector) {
        self.base = base
        self.name = name
        self.injector = injector
    }

    public var size: UInt64 { base.size }
    public var alignment: Int { base.alignment }

    /// Runs `body` unless a fault says otherwise; `partial` moves a prefix.
    private func perform(_ kind: FaultKind, offset: UInt64, length: UInt64,
                         partial: (UInt64) throws(BlksnapError) -> Void,
                         body: () throws(BlksnapError) -> Void) throws(BlksnapError) {
        guard let (effect, done, call) = injector.decide(device: name, kind: kind, length: length, alignment: alignment) else {
            return try body()
        }
        injector.record(InjectedFault(device: name, kind: kind, offset: offset, length: length, effect: effect,
                                      done: done, call: call))
        switch effect {
        case .delay(let us):
            usleep(UInt32(max(us, 0)))
            try body()
        case .fail(let e):
            throw BlksnapError(e, "injected: \(kind) of \(name) at \(offset)+\(length) fails")
        case .short(let e):
            if done > 0 { try partial(done) }
            throw BlksnapError(e, "injected: \(kind) of \(name) at \(offset)+\(length) stops after \(done) bytes")
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        try perform(.read, offset: offset, length: UInt64(buffer.count)) { (n) throws(BlksnapError) in
            try base.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Int(n)]), at: offset)
        } body: { () throws(BlksnapError) in
            try base.read(into: buffer, at: offset)
        }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        try perform(.write, offset: offset, length: UInt64(buffer.count)) { (n) throws(BlksnapError) in
            try base.write(UnsafeRawBufferPointer(rebasing: buffer[0..<Int(n)]), at: offset)
        } body: { () throws(BlksnapError) in
            try base.write(buffer, at: offset)
        }
    }

    public func flush() throws(BlksnapError) {
        try perform(.flush, offset: 0, length: 0) { (_) throws(BlksnapError) in
        } body: { () throws(BlksnapError) in
            try base.flush()
        }
    }

    public func discard(at offset: UInt64, length: UInt64) throws(BlksnapError) {
        try perform(.discard, offset: offset, length: length) { (n) throws(BlksnapError) in
            try base.discard(at: offset, length: n)
        } body: { () throws(BlksnapError) in
            try base.discard(at: offset, length: length)
        }
    }
}
