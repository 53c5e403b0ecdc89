import BlksnapEngine
import Testing
@testable import BlksnapService
#if canImport(Glibc)
import Glibc
#endif

/// A datagram socket standing in for systemd's notify socket.
final class NotifyListener {
    let fd: Int32
    let name: String

    /// `abstract`: a name in the abstract namespace, given as "@name".
    init(abstract: Bool) {
        fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let unique = "blksnap-notify-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        name = abstract ? "@" + unique : "/tmp/" + unique
        var bytes = Array(name.utf8)
        if abstract { bytes[0] = 0 }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in for (i, b) in bytes.enumerated() { raw[i] = b } }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count + (abstract ? 0 : 1))
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) }
        }
        precondition(rc == 0, "bind \(name): \(errno)")
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    func receive() -> String? {
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = recv(fd, &buffer, buffer.count, 0)
        return n < 0 ? nil : String(decoding: buffer[0..<n], as: UTF8.self)
    }

    deinit {
        close(fd)
        if !name.hasPrefix("@") { unlink(name) }
    }
}

@Suite struct SystemdNotifyTests {
    @Test(arguments: [false, true])
    func readyStatusAndStoppingArriveAsOneDatagramEach(abstract: Bool) throws {
        let listener = NotifyListener(abstract: abstract)
        let notify = SystemdNotify(environment: listener.name)
        #expect(notify.isEnabled)
        try notify.ready(status: "2 devices routed")
        #expect(listener.receive() == "READY=1\nSTATUS=2 devices routed\n")
        try notify.status("line one\nREADY=1")
        #expect(listener.receive() == "STATUS=line one READY=1\n")
        try notify.stopping()
        #expect(listener.receive() == "STOPPING=1\n")
    }

    @Test func withoutNotifySocketNothingIsSent() throws {
        let notify = SystemdNotify(environment: nil)
        #expect(!notify.isEnabled)
        try notify.ready()
        #expect(!SystemdNotify(environment: "").isEnabled)
    }

    @Test func aRelativeOrMissingSocketIsAnError() {
        #expect(throws: BlksnapError.self) { try SystemdNotify(environment: "relative/path").ready() }
        #expect(throws: BlksnapError.self) { try SystemdNotify(environment: "@").ready() }
        #expect(throws: BlksnapError.self) { try SystemdNotify(environment: "/nonexistent/notify.sock").ready() }
        #expect(throws: BlksnapError.self) {
            try SystemdNotify(environment: "/" + String(repeating: "x", count: 200)).ready()
        }
    }
}
