import BlksnapEngine
import BlksnapTestSupport
import Glibc
import Logging
import Testing
@testable import BlksnapCUSE

// What runs without CUSE: the refusals before a session is made. The
// session itself (cuse_lowlevel_new, the loop, the node) needs /dev/cuse.

private func device(_ configure: (inout CUSEDevice.Configuration) -> Void) -> CUSEDevice {
    var logger = Logger(label: "test")
    logger.logLevel = .critical
    var configuration = CUSEDevice.Configuration()
    configure(&configuration)
    return CUSEDevice(control: Control(engine: Engine(host: FakeHost(), logger: logger)), configuration: configuration)
}

@Test func startWithoutCUSESaysSoWithENOENT() {
    let d = device { $0.cusePath = "/nonexistent-\(getpid())/cuse" }
    do {
        try d.start()
        Issue.record("start succeeded without /dev/cuse")
    } catch {
        #expect(error.errno.rawValue == ENOENT)
        #expect(error.message.contains("no /nonexistent-"))
        #expect(error.message.contains("--mode shim"))
    }
    #expect(!d.isRunning)
}

@Test func startRefusesANameThatIsTaken() {
    // /dev/null stands in for /dev/cuse; "null" is a node that exists.
    let d = device {
        $0.cusePath = "/dev/null"
        $0.name = "null"
    }
    do {
        try d.start()
        Issue.record("start succeeded over an existing node")
    } catch {
        #expect(error.errno.rawValue == EEXIST)
    }
}

@Test func stopWithoutStartDoesNothing() {
    let d = device { _ in }
    d.stop()
    #expect(!d.isRunning)
    #expect(d.devicePath == "/dev/blksnap")
}
