#if canImport(Glibc)
import Glibc
#endif
import SystemPackage

/// Why blksnap-backup stopped: an errno (what the failed call said, or the
/// one that best names the condition) and a sentence for the operator.
public struct BackupError: Error, CustomStringConvertible, Sendable {
    public var errno: Errno
    public var message: String

    public init(_ errno: Errno, _ message: String) {
        self.errno = errno
        self.message = message
    }

    public var description: String { "\(message) (\(errno))" }

    /// The snapshot ran out of difference storage before the copy finished.
    public static func corrupted(_ message: String) -> BackupError { BackupError(.noSpace, message) }

    /// SIGINT or SIGTERM arrived.
    public static let interrupted = BackupError(.interrupted, "interrupted")
}

/// The current errno as a swift-system value.
@inline(__always) func lastErrno() -> Errno { Errno(rawValue: Glibc.errno) }

/// SIGINT and SIGTERM end a backup cleanly: the copy stops, the snapshot
/// is destroyed, the unfinished backup removed.
public func bkpCatchInterrupts() { bkp_catch_interrupts() }

import CBlksnapBackup
