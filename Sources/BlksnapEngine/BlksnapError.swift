import SystemPackage

/// The one error of the engine: an errno the tools understand, and why.
///
/// Frontends turn it into a reply (a negative ioctl result, an NBD error)
/// through one mapping each; the message goes to the log, never the wire.
public struct BlksnapError: Error, CustomStringConvertible, Sendable {
    public var errno: Errno
    public var message: String

    public init(_ errno: Errno, _ message: String) {
        self.errno = errno
        self.message = message
    }

    public var description: String { "\(message) (errno \(errno.rawValue): \(errno))" }
}
