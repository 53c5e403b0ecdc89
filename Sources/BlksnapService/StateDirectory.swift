#if canImport(Glibc)
import Glibc
#endif

/// The daemon's state directory and its lock: a second instance is refused
/// while the first holds the lock.
public struct StateDirectory {
    public let path: String
    public let lockPath: String
    let lockFd: Int32

    public struct Refused: Error, CustomStringConvertible {
        public var description: String
    }

    public init(path: String) throws(Refused) {
        self.path = path
        mkdir(path, 0o700)
        lockPath = path + "/blksnapd.lock"
        lockFd = open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard lockFd >= 0 else {
            throw Refused(description: "cannot open \(lockPath): \(String(cString: strerror(errno)))")
        }
        guard flock(lockFd, LOCK_EX | LOCK_NB) == 0 else {
            close(lockFd)
            throw Refused(description: "another blksnapd is running (it holds \(lockPath))")
        }
        let pid = "\(getpid())\n"
        ftruncate(lockFd, 0)
        _ = pid.withCString { write(lockFd, $0, strlen($0)) }
    }

    public func release() {
        unlink(lockPath)
        close(lockFd)
    }
}
