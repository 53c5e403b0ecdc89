import BlksnapABI
@testable import BlksnapEngine
import BlksnapTestSupport
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The image's bytes handed out as file ranges, for the FUSE frontend to
/// splice on: a splice holds page references, so a write to the original
/// must wait until the ranges were sent, and what they hold is the image.
@Suite struct ImageFileRangeTests {
    final class Rig {
        let path = "/tmp/blksnap-ranges-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let original: FileBlockDevice
        let area: DiffArea
        let storageDisk = MemoryBlockDevice(size: 4 << 20)
        let copied = Atomic<Bool>(false)
        var wasCopied: Bool { copied.load(ordering: .acquiring) }

        init() throws {
            let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            #expect(fd >= 0)
            let before = [UInt8](repeating: 0xAA, count: 1 << 20)
            #expect(pwrite(fd, before, before.count, 0) == before.count)
            close(fd)
            original = try FileBlockDevice(path: path)
            let storage = DiffStorage(minimum: 0, events: EventQueue(), logger: .init(label: "t"))
            try storage.append(device: storageDisk, deviceId: DevId(major: 8, minor: 0),
                               ranges: [SectorRange(offset: 0, count: 8192)])
            area = DiffArea(devId: DevId(major: 7, minor: 1), original: original, storage: storage,
                            settings: EngineSettings(), onFailure: { _ in })
        }

        deinit { unlink(path) }

        func bytes(_ ranges: [DiffArea.FileRange]) -> [UInt8] {
            var out: [UInt8] = []
            for r in ranges {
                var piece = [UInt8](repeating: 0, count: r.count)
                _ = pread(r.descriptor, &piece, r.count, off_t(r.offset))
                out += piece
            }
            return out
        }
    }

    @Test func aWriteToTheOriginalWaitsUntilTheRangesWereUsed() throws {
        let rig = try Rig()
        var seen: [UInt8] = []
        var writer = pthread_t()
        let used = rig.area.withImageFileRanges(offset: 0, count: 65536) { ranges in
            // The write the kernel would send: copy-on-write, then the original.
            let box = Unmanaged.passRetained(Box { [rig] in
                rig.area.copyOnWrite(offset: 0, length: 4096)
                let after = [UInt8](repeating: 0x55, count: 4096)
                after.withUnsafeBytes { try? rig.original.write($0, at: 0) }
                rig.copied.store(true, ordering: .releasing)
            })
            pthread_create(&writer, nil, { arg in
                Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue().run()
                return nil
            }, box.toOpaque())
            // The copy is stored once the writer waits for these ranges:
            // from then on its original write must be held back.
            let deadline = monotonicNanoseconds() + 10_000_000_000
            while rig.area.copiesWaitingForReaders == 0 && monotonicNanoseconds() < deadline { sched_yield() }
            #expect(rig.area.copiesWaitingForReaders == 1)
            #expect(!rig.wasCopied)
            seen = rig.bytes(ranges)
        }
        pthread_join(writer, nil)
        #expect(used)
        #expect(rig.wasCopied)
        #expect(seen.allSatisfy { $0 == 0xAA } && seen.count == 65536)
        // Now the chunk is stored: its range is in the storage, still the image.
        var after: [UInt8] = []
        #expect(rig.area.withImageFileRanges(offset: 0, count: 65536) { after = rig.bytes($0) } == false)
        let read = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 8)
        defer { read.deallocate() }
        try rig.area.readImage(into: read, at: 0)
        #expect(read.allSatisfy { $0 == 0xAA })
        #expect(after.isEmpty)
    }

    final class Box: @unchecked Sendable {
        let run: () -> Void
        init(_ run: @escaping () -> Void) { self.run = run }
    }
}
