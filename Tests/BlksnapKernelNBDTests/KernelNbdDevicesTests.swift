import BlksnapABI
import BlksnapDevices
import BlksnapEngine
@testable import BlksnapKernelNBD
import BlksnapNBD
import Logging
import SystemPackage
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The kernel's nbd driver as far as the maker sees it: it keeps a
/// duplicate of every socket it is handed (the kernel holds a reference),
/// and can drop one as the kernel does when a request times out.
final class FakeNbdDriver: NbdDriver, @unchecked Sendable {
    enum Call: Equatable {
        case connect(index: Int, sockets: Int, flags: UInt64)
        case reconfigure(index: Int, sockets: Int)
        case disconnect(index: Int)
    }

    private let lock = Lock()
    private let changed = Condition()
    private var _calls: [Call] = []
    private var sockets: [Int: [Int32]] = [:]
    var configured: [Int: String] = [:]

    var calls: [Call] { lock.withLock { _calls } }

    private func record(_ call: Call, _ index: Int, _ handed: [Int32]) {
        lock.withLock {
            _calls.append(call)
            sockets[index, default: []] += handed.map { dup($0) }
            changed.broadcast()
        }
    }

    func connect(index: Int, sockets handed: [Int32], size: UInt64, serverFlags: UInt64,
                 requestTimeout: UInt64, deadTimeout: UInt64, backend: String) throws(Errno) {
        record(.connect(index: index, sockets: handed.count, flags: serverFlags), index, handed)
    }

    func reconfigure(index: Int, sockets handed: [Int32], deadTimeout: UInt64, backend: String) throws(Errno) {
        record(.reconfigure(index: index, sockets: handed.count), index, handed)
    }

    /// As the kernel does: every socket of the device is shut.
    func disconnect(index: Int) throws(Errno) {
        lock.withLock {
            _calls.append(.disconnect(index: index))
            for fd in sockets.removeValue(forKey: index) ?? [] {
                Glibc.shutdown(fd, Int32(SHUT_RDWR))
                close(fd)
            }
        }
    }

    func isConfigured(_ index: Int) -> Bool { lock.withLock { configured[index] != nil } }
    func backend(of index: Int) -> String? { lock.withLock { configured[index] } }

    /// The sockets the device has, in the order they were handed over.
    func socketsOf(_ index: Int) -> [Int32] { lock.withLock { sockets[index] ?? [] } }

    /// A request timed out on the `n`th socket: the kernel shuts it.
    func drop(_ index: Int, socket n: Int) {
        lock.withLock {
            let fd = sockets[index]!.remove(at: n)
            Glibc.shutdown(fd, Int32(SHUT_RDWR))
            close(fd)
        }
    }

    /// Waits (at most 10 s) until `count` calls were made.
    func waitForCalls(_ count: Int) -> Bool {
        let deadline = monotonicNanoseconds() + 10_000_000_000
        return lock.withLock {
            while _calls.count < count {
                guard changed.wait(lock, untilMonotonic: deadline) else { return _calls.count >= count }
            }
            return true
        }
    }

    deinit { for fd in sockets.values.joined() { close(fd) } }
}

/// A disk whose writes are durable only once flushed: a FLUSH on one
/// connection must make what every connection acknowledged durable.
final class VolatileDevice: BlockDevice, @unchecked Sendable {
    let size: UInt64 = 1 << 20
    private let lock = Lock()
    private var pending: Set<UInt64> = []
    private var durable: Set<UInt64> = []

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
    }
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        _ = lock.withLock { pending.insert(offset) }
    }
    func flush() throws(BlksnapError) {
        lock.withLock {
            durable.formUnion(pending)
            pending = []
        }
    }
    var durableOffsets: Set<UInt64> { lock.withLock { durable } }
}

/// Sends one request on a socket the "kernel" holds and returns the reply's error.
func exchange(_ fd: Int32, _ command: NBDCommand, handle: UInt64, offset: UInt64 = 0, payload: [UInt8] = []) -> UInt32? {
    let bytes = NBDRequest(type: command.rawValue, handle: handle, offset: offset, length: UInt32(payload.count)).encoded + payload
    guard bytes.withUnsafeBytes({ Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }) == bytes.count else { return nil }
    var reply = [UInt8](repeating: 0, count: 16)
    guard reply.withUnsafeMutableBytes({ recv(fd, $0.baseAddress, 16, Int32(MSG_WAITALL)) }) == 16 else { return nil }
    let word = { (at: Int) in reply[at..<(at + 4)].reduce(UInt32(0)) { $0 << 8 | UInt32($1) } }
    let handleBack = reply[8..<16].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
    guard word(0) == NBD.simpleReplyMagic, handleBack == handle else { return nil }
    return word(4)
}

func quietLogger() -> Logger {
    var logger = Logger(label: "test")
    logger.logLevel = .critical
    return logger
}

func nbd(_ index: Int, connections: Int) -> MadeDevice {
    MadeDevice(name: "nbd\(index)", node: "/dev/nbd\(index)", devId: DevId(major: 43, minor: UInt32(index)),
               index: index, connections: connections)
}

/// Polls `condition` for at most 10 s: for a server thread's state that no
/// signal announces to the test.
func eventually(_ condition: () -> Bool) -> Bool {
    for _ in 0..<1000 {
        if condition() { return true }
        usleep(10_000)
    }
    return condition()
}

/// A maker over a fake driver and a real server; stop the server at the end.
func fixture(configured: [Int: String] = [:]) throws -> (Server, FakeNbdDriver, KernelNbdDevices) {
    let server = try Server(exports: [], logger: quietLogger())
    let driver = FakeNbdDriver()
    driver.configured = configured
    return (server, driver, KernelNbdDevices(server: server, logger: quietLogger(), driver: driver))
}

@Suite struct KernelNbdDevicesTests {
    @Test func aDeviceIsConnectedWithOneServedSocketPerConnection() throws {
        let (server, driver, maker) = try fixture()
        defer { server.stop() }
        maker.connectionsPerDevice = 3
        let made = nbd(5, connections: maker.connectionsPerDevice)
        try maker.bind(made, to: VolatileDevice(), backend: "b")
        guard driver.calls.count == 1, case .connect(5, 3, let serverFlags) = driver.calls[0] else {
            Issue.record("expected one CONNECT with 3 sockets, got \(driver.calls)")
            return
        }
        // Without it the kernel refuses more than one connection.
        #expect(UInt16(serverFlags) & NBD.flagCanMultiConn != 0)
        #expect(maker.connectionCount(made) == 3)
        let sockets = driver.socketsOf(5)
        for (i, fd) in sockets.enumerated() {
            #expect(exchange(fd, .flush, handle: UInt64(i)) == 0, "socket \(i) is served")
        }
    }

    @Test func aFlushOnOneConnectionCoversWritesAcknowledgedOnTheOthers() throws {
        let (server, driver, maker) = try fixture()
        defer { server.stop() }
        let device = VolatileDevice()
        try maker.bind(nbd(6, connections: 3), to: device, backend: "b")
        let sockets = driver.socketsOf(6)
        try #require(sockets.count == 3)
        #expect(exchange(sockets[0], .write, handle: 1, offset: 0, payload: [UInt8](repeating: 1, count: 512)) == 0)
        #expect(exchange(sockets[1], .write, handle: 2, offset: 4096, payload: [UInt8](repeating: 2, count: 512)) == 0)
        #expect(device.durableOffsets.isEmpty)
        #expect(exchange(sockets[2], .flush, handle: 3) == 0)
        #expect(device.durableOffsets == [0, 4096])
    }

    @Test func aDroppedConnectionIsReplacedByExactlyOne() throws {
        let (server, driver, maker) = try fixture()
        defer { server.stop() }
        let made = nbd(7, connections: 3)
        try maker.bind(made, to: VolatileDevice(), backend: "b")
        driver.drop(7, socket: 1)
        try #require(driver.waitForCalls(2))
        #expect(driver.calls == [.connect(index: 7, sockets: 3, flags: driver.flags(0)), .reconfigure(index: 7, sockets: 1)])
        #expect(maker.connectionCount(made) == 3)
        for (i, fd) in driver.socketsOf(7).enumerated() {
            #expect(exchange(fd, .flush, handle: UInt64(i)) == 0, "socket \(i) is served after the reconnect")
        }
    }

    @Test func anUnboundDeviceIsNotReconnected() throws {
        let (server, driver, maker) = try fixture()
        let made = nbd(8, connections: 2)
        try maker.bind(made, to: VolatileDevice(), backend: "b")
        #expect(server.connectionCount == 2)
        maker.unbind(made)
        // Each connection thread decides whether to report the loss as it
        // leaves the registry, so once it is empty the reports are made.
        #expect(eventually { server.connectionCount == 0 })
        server.stop()
        #expect(driver.calls.count == 2)
        #expect(driver.calls.last == .disconnect(index: 8))
        #expect(maker.connectionCount(made) == 0)
    }

    @Test func aDeviceLeftToTheNextBlksnapdStaysConfiguredAndIsServedNoMore() throws {
        let (server, driver, maker) = try fixture()
        defer { server.stop() }
        let made = nbd(9, connections: 2)
        let device = VolatileDevice()
        try maker.bind(made, to: device, backend: "b")
        let sockets = driver.socketsOf(9)
        #expect(exchange(sockets[0], .write, handle: 1, offset: 0, payload: [1]) == 0)
        #expect(maker.leave(made))
        // Its connection threads are gone when leave returns, not reported
        // lost (no reconnect), and the device was not disconnected.
        #expect(server.connectionCount == 0)
        #expect(driver.calls == [.connect(index: 9, sockets: 2, flags: driver.flags(0))])
        #expect(maker.connectionCount(made) == 0)
        // The kernel's ends see the connection end; a request sent now
        // reaches nothing: it waits for the next blksnapd.
        for fd in sockets {
            #expect(exchange(fd, .write, handle: 2, offset: 4096, payload: [2]) == nil)
        }
        try device.flush()
        #expect(device.durableOffsets == [0])
        // Only a bound device can be left.
        #expect(!maker.leave(made))
    }

    @Test func aReclaimedDeviceGetsAsManySocketsAsItWasMadeWith() throws {
        let (server, driver, maker) = try fixture(configured: [9: "b"])
        defer { server.stop() }
        maker.connectionsPerDevice = 1
        try maker.reclaim(nbd(9, connections: 4), as: VolatileDevice(), backend: "b")
        #expect(driver.calls == [.reconfigure(index: 9, sockets: 4)])
        #expect(server.connectionCount == 4)
    }

    @Test func aSavedCountOutOfRangeIsRefusedBeforeAnySocketIsMade() throws {
        let (server, driver, maker) = try fixture(configured: [10: "b"])
        defer { server.stop() }
        for count in [0, -1, NetlinkNbdDriver.maxSockets + 1, Int.max] {
            let error = #expect(throws: BlksnapError.self) {
                try maker.reclaim(nbd(10, connections: count), as: VolatileDevice(), backend: "b")
            }
            #expect(error?.errno == .invalidArgument)
        }
        #expect(driver.calls.isEmpty)
        #expect(server.connectionCount == 0)
        // Refused, the number was given back.
        try maker.reclaim(nbd(10, connections: 2), as: VolatileDevice(), backend: "b")
        #expect(driver.calls == [.reconfigure(index: 10, sockets: 2)])
    }

    @Test func aDeviceShowingAnotherBackendIsNotTakenOver() throws {
        let (server, driver, maker) = try fixture(configured: [11: "someone else"])
        defer { server.stop() }
        let error = #expect(throws: BlksnapError.self) {
            try maker.reclaim(nbd(11, connections: 2), as: VolatileDevice(), backend: "b")
        }
        #expect(error?.errno == .resourceBusy)
        #expect(driver.calls.isEmpty)
    }
}

extension FakeNbdDriver {
    /// The server flags of the `n`th call, a CONNECT.
    func flags(_ n: Int) -> UInt64 {
        guard case .connect(_, _, let f) = calls[n] else { return 0 }
        return f
    }
}
