import Glibc
import Testing
@testable import BlksnapCUSE

/// What blksnapd writes itself on a kept CUSE connection, and the count of
/// requests in flight a kill -9 leaves behind. The take-over on the real
/// kernel is tests/test-crash-cuse.sh (the stock-kernel lane).
@Suite struct KeptSessionTests {
    func u32(_ bytes: [UInt8], _ at: Int) -> UInt32 {
        bytes[at..<at + 4].reversed().reduce(0) { $0 << 8 | UInt32($1) }
    }
    func u64(_ bytes: [UInt8], _ at: Int) -> UInt64 {
        bytes[at..<at + 8].reversed().reduce(0) { $0 << 8 | UInt64($1) }
    }

    @Test func aConnectionsNameCarriesWhatTheKernelSaidInInit() {
        let said = CUSEInit(major: 7, minor: 38)
        #expect(said.name == "blksnap-cuse-7-38")
        #expect(CUSEInit(name: said.name) == said)
        #expect(said.name.hasPrefix(CUSEDevice.keptPrefix))
        #expect(!said.name.hasPrefix("blksnap-devices"))    // never taken for the device filesystem
    }

    @Test func namesOfSomethingElseAreRefused() {
        for name in ["", "blksnap-cuse", "blksnap-cuse-7", "blksnap-cuse-8-38", "blksnap-cuse-7-5",
                     "blksnap-cuse-7-x", "blksnap-devices-7-38-131072", "blksnap-cuse-7-38-1"] {
            #expect(CUSEInit(name: name) == nil, "\(name)")
        }
    }

    /// fuse_in_header then cuse_init_in, as the kernel lays them out.
    @Test func theInitHandedToLibfuseIsCUSEs() {
        let bytes = CUSEInit(major: 7, minor: 38).request
        #expect(bytes.count == 56)
        #expect(u32(bytes, 0) == 56)                         // len
        #expect(u32(bytes, 4) == 4096)                       // CUSE_INIT
        let unique = u64(bytes, 8)
        #expect(unique & 1 == 0)                             // not an interrupt's
        #expect(unique & (1 << 63) == 0)                     // not a resent request's
        #expect(u64(bytes, 16) == 0)                         // nodeid
        #expect(u32(bytes, 40) == 7)
        #expect(u32(bytes, 44) == 38)
        #expect(u32(bytes, 52) == 1)                         // CUSE_UNRESTRICTED_IOCTL
    }

    @Test func theResendNotificationIsAHeaderWithCode7() throws {
        var ends: [Int32] = [0, 0]
        try #require(pipe(&ends) == 0)
        defer { close(ends[0]) }
        #expect(CUSEInit.resend(on: ends[1]) == nil)
        close(ends[1])
        var bytes = [UInt8](repeating: 0, count: 32)
        #expect(read(ends[0], &bytes, 32) == 16)
        #expect(u32(bytes, 0) == 16)
        #expect(u32(bytes, 4) == 7)                          // FUSE_NOTIFY_RESEND
        #expect(u64(bytes, 8) == 0)                          // unique 0: a notification
        #expect(CUSEInit.resend(on: -1) == EBADF)
    }

    /// A record left with requests counted (a kill -9 in their middle) says
    /// so to the next opener, which starts from 0.
    @Test func theCountInFlightOutlivesItsWriter() throws {
        let path = "/tmp/blksnap-inflight-\(getpid())-\(Int.random(in: 0..<1_000_000))"
        defer { unlink(path) }
        do {
            let first = try InFlightRecord(path: path)
            #expect(first.previous == 0)
            first.begin(); first.begin(); first.end()
        }
        let second = try InFlightRecord(path: path)
        #expect(second.previous == 1)
        second.begin(); second.end()
        let third = try InFlightRecord(path: path)
        #expect(third.previous == 0)
    }
}
