@testable import BlksnapFUSE
import Logging
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The bytes blksnapd writes itself on a taken-over FUSE connection, and
/// how it finds a connection systemd kept. The take-over itself, on the
/// real kernel, is tests/test-crash-restart.sh and test-crash-systemd.sh.
@Suite struct ConnectionTakeOverTests {
    func u32(_ bytes: [UInt8], _ at: Int) -> UInt32 {
        bytes[at..<at + 4].reversed().reduce(0) { $0 << 8 | UInt32($1) }
    }
    func u64(_ bytes: [UInt8], _ at: Int) -> UInt64 {
        bytes[at..<at + 8].reversed().reduce(0) { $0 << 8 | UInt64($1) }
    }

    @Test func aConnectionsNameCarriesWhatTheKernelSaidInInit() {
        let said = FuseInit(major: 7, minor: 45, maxReadahead: 131072)
        #expect(said.name == "blksnap-devices-7-45-131072")
        #expect(FuseInit(name: said.name) == said)
        #expect(!said.name.contains(":"))   // systemd refuses a colon in FDNAME
    }

    @Test func namesOfSomethingElseAreRefused() {
        for name in ["", "stored", "blksnap-devices", "blksnap-devices-7-45", "blksnap-devices-8-45-1",
                     "blksnap-devices-7-20-1", "blksnap-devices-7-x-1", "other-devices-7-45-131072",
                     "blksnap-devices-7-45-99999999999"] {
            #expect(FuseInit(name: name) == nil, "\(name)")
        }
    }

    /// fuse_in_header then fuse_init_in, as the kernel lays them out.
    @Test func theInitHandedToLibfuseIsTheKernels() {
        let bytes = FuseInit(major: 7, minor: 41, maxReadahead: 65536).request
        #expect(bytes.count == 104)
        #expect(u32(bytes, 0) == 104)                        // len
        #expect(u32(bytes, 4) == 26)                         // FUSE_INIT
        let unique = u64(bytes, 8)
        #expect(unique & 1 == 0)                             // not an interrupt's
        #expect(unique & (1 << 63) == 0)                     // not a resent request's
        #expect(u64(bytes, 16) == 0)                         // nodeid
        #expect(u32(bytes, 40) == 7)
        #expect(u32(bytes, 44) == 41)
        #expect(u32(bytes, 48) == 65536)
        #expect(u32(bytes, 52) & (1 << 22) != 0)             // FUSE_MAX_PAGES: the 1 MiB buffer
        #expect(bytes[56...].allSatisfy { $0 == 0 })         // flags2 and the unused words
    }

    @Test func theResendNotificationIsAHeaderWithCode7() {
        let bytes = FuseInit.resendNotification
        #expect(bytes.count == 16)
        #expect(u32(bytes, 0) == 16)
        #expect(u32(bytes, 4) == 7)                          // FUSE_NOTIFY_RESEND
        #expect(u64(bytes, 8) == 0)                          // unique 0: a notification
    }

    @Test func systemdsStoreIsUsedOnlyWhereTheUnitHasOne() {
        let logger = Logger(label: "test")
        #expect(SystemdFDStore(logger: logger, environment: [:]) == nil)
        #expect(SystemdFDStore(logger: logger, environment: ["NOTIFY_SOCKET": "/run/systemd/notify"]) == nil)
        #expect(SystemdFDStore(logger: logger, environment: ["NOTIFY_SOCKET": "/run/systemd/notify", "FDSTORE": "0"]) == nil)
        #expect(SystemdFDStore(logger: logger, environment: ["NOTIFY_SOCKET": "/run/systemd/notify", "FDSTORE": "8"]) != nil)
    }

    @Test func listenFdsAreTakenOnlyWhenMeantForThisProcess() {
        let me = "\(getpid())"
        #expect(SystemdFDStore.listenFds(["LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a"]).isEmpty)
        #expect(SystemdFDStore.listenFds(["LISTEN_PID": me, "LISTEN_FDS": "0"]).isEmpty)
        #expect(SystemdFDStore.listenFds(["LISTEN_PID": me, "LISTEN_FDS": "-3"]).isEmpty)
        #expect(SystemdFDStore.listenFds(["LISTEN_PID": me, "LISTEN_FDS": "99999"]).isEmpty)
        let kept = SystemdFDStore.listenFds(["LISTEN_PID": me, "LISTEN_FDS": "2", "LISTEN_FDNAMES": "one:blksnap-devices-7-45-1"])
        #expect(kept.map(\.fd) == [3, 4])
        #expect(kept.map(\.name) == ["one", "blksnap-devices-7-45-1"])
    }
}

extension ConnectionTakeOverTests {
    /// The device filesystem and the CUSE device each take their own
    /// connection from what systemd passed; neither takes the other's.
    @Test func eachTakerGetsOnlyItsOwnNames() {
        let me = "\(getpid())"
        let store = SystemdFDStore(logger: Logger(label: "test"), environment: [
            "NOTIFY_SOCKET": "/run/systemd/notify", "FDSTORE": "8", "LISTEN_PID": me, "LISTEN_FDS": "3",
            "LISTEN_FDNAMES": "one:blksnap-devices-7-45-1:blksnap-cuse-7-38"])!
        #expect(store.take(prefix: "blksnap-cuse").map(\.name) == ["blksnap-cuse-7-38"])
        #expect(store.take(prefix: "blksnap-cuse").isEmpty)
        #expect(store.take(prefix: FuseInit.prefix).map(\.fd) == [4])
    }
}
