import BlksnapControlProtocol
import Testing
#if canImport(Glibc)
import Glibc
#endif

@Suite struct CompanionTests {
    /// A fake prefix: sbin/blksnapd's companion is bin/blksnapctl.
    @Test func adviceNamesTheToolOrItsFullPath() throws {
        var template = Array("/tmp/blksnap-companion-XXXXXX".utf8CString)
        let root = String(cString: mkdtemp(&template)!)
        defer { _ = system("rm -rf '\(root)'") }
        mkdir(root + "/bin", 0o755)
        mkdir(root + "/sbin", 0o755)
        let tool = root + "/bin/blksnapctl"
        let fd = open(tool, O_CREAT | O_WRONLY, 0o755)
        close(fd)
        #expect(Companion.command("blksnapctl", from: root + "/sbin", path: "/usr/bin") == tool)
        #expect(Companion.command("blksnapctl", from: root + "/bin", path: "/usr/bin") == tool)
        #expect(Companion.command("blksnapctl", from: root + "/sbin", path: "/usr/bin:" + root + "/bin") == "blksnapctl")
        #expect(Companion.command("blksnapctl", from: "/nonexistent", path: "/usr/bin") == "blksnapctl")
        #expect(Companion.preloadCandidates(from: root + "/bin").contains(root + "/bin/../lib/blksnap/libblksnap-preload.so"))
    }
}
