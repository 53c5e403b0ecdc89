/// The memory of the process that issued an ioctl, as the dispatcher sees
/// it: the struct at the argument address and the arrays its pointer fields
/// designate.
///
/// Each way in implements it its own way: the preload shim ships the
/// caller's buffers with the request; CUSE fetches them with
/// `fuse_reply_ioctl_retry`. The dispatcher only reads through it, and
/// returns what to write back in its `ControlReply`; it checks `canWrite`
/// first, so a bad output pointer gives the module's errno, not a crash.
public protocol CallerMemory {
    /// `count` bytes at `address`, or nil when they cannot be read.
    func read(at address: UInt64, count: Int) -> [UInt8]?
    /// Whether `count` bytes at `address` may be written back.
    func canWrite(at address: UInt64, count: Int) -> Bool
}

/// Bytes to copy into the caller at an address.
public struct CallerWrite: Equatable, Sendable {
    public var address: UInt64
    public var bytes: [UInt8]
    public init(address: UInt64, bytes: [UInt8]) {
        self.address = address
        self.bytes = bytes
    }
}

/// What one ioctl gives back: its return value or errno, and the bytes to
/// copy out, which may accompany an error (a collect call's count).
public struct ControlReply: Equatable, Sendable {
    public enum Status: Equatable, Sendable {
        case success(Int32)
        case failure(Int32)   // a positive errno
    }
    public var status: Status
    public var writes: [CallerWrite]

    /// The value ioctl(2) returns in the kernel's convention: the result,
    /// or minus the errno.
    public var kernelResult: Int32 {
        switch status {
        case .success(let v): v
        case .failure(let e): -e
        }
    }
}
