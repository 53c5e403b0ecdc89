import BlksnapControlProtocol
import CBlksnapABI
import Testing
#if canImport(Glibc)
import Glibc
#endif

@Suite struct UnixSocketTests {
    func scratch() -> String {
        var template = Array("/tmp/blksnap-sock.XXXXXX".utf8CString)
        return String(cString: mkdtemp(&template)!)
    }

    @Test func aPathThatDoesNotFitIsENAMETOOLONGNeverCutShort() throws {
        let long = "/tmp/" + String(repeating: "x", count: 200)
        #expect(throws: SocketError.self) { _ = try UnixSocket.listen(path: long) }
        do { _ = try UnixSocket.connect(path: long) } catch { #expect(error.errno == .fileNameTooLong) }
        do { _ = try UnixSocket.address(long) } catch { #expect(error.errno == .fileNameTooLong) }
        // 107 bytes and its NUL fill sun_path exactly.
        let fits = "/" + String(repeating: "y", count: 106)
        let address = try UnixSocket.address(fits)
        let stored = withUnsafeBytes(of: address.sun_path) { String(decoding: $0.prefix(107), as: UTF8.self) }
        #expect(stored == fits)
        do { _ = try UnixSocket.address(fits + "y") } catch { #expect(error.errno == .fileNameTooLong) }
        do { _ = try UnixSocket.address("") } catch { #expect(error.errno == .invalidArgument) }
    }

    @Test func aListenerIsRootOnlyAndReachable() throws {
        let dir = scratch()
        let path = dir + "/s.sock"
        let fd = try UnixSocket.listen(path: path)
        defer { close(fd); unlink(path); rmdir(dir) }
        var st = stat()
        #expect(stat(path, &st) == 0)
        #expect(st.st_mode & 0o777 == 0o600)
        #expect((st.st_mode & S_IFMT) == S_IFSOCK)
        let client = try UnixSocket.connect(path: path)
        close(client)
    }

    @Test func aGroupListenerIsThatGroupsToo() throws {
        let dir = scratch()
        let path = dir + "/g.sock"
        let fd = try UnixSocket.listen(path: path, group: 4242)
        defer { close(fd); unlink(path); rmdir(dir) }
        var st = stat()
        #expect(stat(path, &st) == 0)
        #expect(st.st_mode & 0o777 == 0o660)
        #expect(st.st_gid == 4242)
    }

    @Test func aStaleSocketIsReplacedAndAnyOtherFileRefused() throws {
        let dir = scratch()
        let path = dir + "/s.sock"
        defer { unlink(path); rmdir(dir) }
        let first = try UnixSocket.listen(path: path)
        close(first)  // the daemon died; its socket file stayed
        let second = try UnixSocket.listen(path: path)
        close(second)
        unlink(path)
        let file = open(path, O_CREAT | O_WRONLY, 0o644)
        close(file)
        do {
            _ = try UnixSocket.listen(path: path)
            Issue.record("a regular file was replaced")
        } catch {
            #expect(error.errno == .fileExists)
        }
        var st = stat()
        #expect(stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG)
    }

    @Test func connectingToNothingSaysWhy() {
        do {
            _ = try UnixSocket.connect(path: "/nonexistent-blksnap-dir/control.sock")
            Issue.record("connected to nothing")
        } catch {
            #expect(error.errno == .noSuchFileOrDirectory)
        }
    }
}
