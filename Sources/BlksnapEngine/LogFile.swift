import Logging
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// The log file SETLOG asks for (upstream `log.c`): once set, every log
/// record at or above the requested printk level is also appended there,
/// stamped in the caller's time zone. A NULL path turns it off.
///
/// The daemon puts `LogFileHandler` beside its stderr handler, so the
/// engine, the frontends and the daemon all reach the file.
public final class LogFile: @unchecked Sendable {
    private let lock = Lock()
    private var fd: Int32 = -1
    private var level: UInt32 = 0
    private var tzMinutesWest: Int32 = 0
    private var path: String?

    public init() {}

    deinit { if fd >= 0 { close(fd) } }

    /// Opens (creating, mode 0600) and starts the file, or stops logging to
    /// one. A file that cannot be opened is refused with its errno, as the
    /// module's log_restart does.
    public func configure(path: String?, level: UInt32, tzMinutesWest: Int32) throws(BlksnapError) {
        var newFd: Int32 = -1
        if let path {
            newFd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
            guard newFd >= 0 else { throw BlksnapError(Errno(rawValue: errno), "cannot open the log file \(path)") }
        }
        let old = lock.withLock { () -> Int32 in
            let old = fd
            (fd, self.level, self.tzMinutesWest, self.path) = (newFd, level, tzMinutesWest, path)
            return old
        }
        if old >= 0 { close(old) }
        if path != nil { append(printkLevel: 6, "Start log for module blksnap-swift, level \(level)") }
    }

    /// printk's numbers: 0 emergency ... 3 error, 4 warning, 5 notice,
    /// 6 info, 7 debug.
    static func printkLevel(_ level: Logger.Level) -> UInt32 {
        switch level {
        case .trace, .debug: 7
        case .info: 6
        case .notice: 5
        case .warning: 4
        case .error: 3
        case .critical: 2
        }
    }

    func append(printkLevel: UInt32, _ message: String) {
        lock.withLock {
            guard fd >= 0, printkLevel <= level else { return }
            var t = time(nil) - time_t(tzMinutesWest) * 60
            var tm = tm()
            gmtime_r(&t, &tm)
            func two(_ v: Int32) -> String { v < 10 ? "0\(v)" : "\(v)" }
            let stamp = "\(tm.tm_year + 1900)-\(two(tm.tm_mon + 1))-\(two(tm.tm_mday)) "
                + "\(two(tm.tm_hour)):\(two(tm.tm_min)):\(two(tm.tm_sec))"
            let line = "\(stamp) <\(printkLevel)> \(message)\n"
            _ = line.withCString { write(fd, $0, strlen($0)) }
        }
    }
}

/// A swift-log handler writing into a `LogFile`.
public struct LogFileHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    public var logLevel: Logger.Level = .trace
    let file: LogFile

    public init(file: LogFile) { self.file = file }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        file.append(printkLevel: LogFile.printkLevel(event.level), event.message.description)
    }
}
