/// One FUSE_IOCTL request as libfuse hands it to the CUSE server: the
/// request number and argument, and what the kernel fetched from the caller
/// for the iovecs named in the previous retry (nothing on the first call).
public struct IoctlRequest: Equatable, Sendable {
    public var command: UInt32
    public var argument: UInt64
    /// The concatenated bytes of the input iovecs (`in_buf`).
    public var input: [UInt8]
    /// The total length of the output iovecs (`out_bufsz`).
    public var outputSize: Int
    /// A 32-bit caller (FUSE_IOCTL_COMPAT): its structs have other layouts.
    public var compat: Bool

    public init(command: UInt32, argument: UInt64, input: [UInt8] = [], outputSize: Int = 0, compat: Bool = false) {
        self.command = command
        self.argument = argument
        self.input = input
        self.outputSize = outputSize
        self.compat = compat
    }
}

/// What the server answers to one FUSE_IOCTL request.
public enum IoctlAnswer: Equatable, Sendable {
    /// fuse_reply_err: the ioctl fails with this (positive) errno.
    case error(Int32)
    /// fuse_reply_ioctl_retry: the kernel fetches `input` from the caller
    /// and asks again, and will copy the final data out over `output`.
    case retry(input: [CallerRegion], output: [CallerRegion])
    /// fuse_reply_ioctl: ioctl(2) returns `result` (minus an errno on
    /// failure), and `data` is copied out over the output iovecs in order.
    case reply(result: Int32, data: [UInt8])
}
