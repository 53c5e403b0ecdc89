import BlksnapService
import Testing
#if canImport(Glibc)
import Glibc
#endif

@Suite struct StateDirectoryTests {
    /// A second blksnapd on the same state directory is refused while the
    /// first holds its lock, and may start once the first let go.
    @Test func oneDaemonAtATime() throws {
        var template = Array("/tmp/blksnap-state.XXXXXX".utf8CString)
        let path = String(cString: mkdtemp(&template)!)
        defer { rmdir(path) }
        let first = try StateDirectory(path: path)
        do {
            _ = try StateDirectory(path: path)
            Issue.record("a second daemon got the lock")
        } catch {
            #expect(error.description.hasPrefix("another blksnapd is running"))
        }
        var pid = [CChar](repeating: 0, count: 32)
        let fd = open(first.lockPath, O_RDONLY)
        #expect(read(fd, &pid, pid.count - 1) > 0)
        close(fd)
        #expect(String(cString: pid) == "\(getpid())\n")
        first.release()
        let second = try StateDirectory(path: path)
        second.release()
    }

    @Test func aDirectoryThatCannotBeMadeIsRefused() {
        #expect(throws: StateDirectory.Refused.self) { _ = try StateDirectory(path: "/proc/blksnap-no-such-dir") }
    }
}
