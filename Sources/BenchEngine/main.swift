// blksnap-bench-engine: in-process throughput of the engine's I/O paths,
// printed side by side with the no-snapshot write as the peer. Figures are
// printed, never asserted; tools/bench-engine builds release and runs this.
import BlksnapABI
import BlksnapEngine
import BlksnapTestSupport
import Logging
#if canImport(Glibc)
import Glibc
#endif

struct Options {
    var deviceMiB = 1024
    var ioKiB = 1024
    var passes = 3
}

var options = Options()
var args = CommandLine.arguments.dropFirst()
while let a = args.popFirst() {
    switch a {
    case "--device-mib": options.deviceMiB = Int(args.popFirst() ?? "") ?? options.deviceMiB
    case "--io-kib": options.ioKiB = Int(args.popFirst() ?? "") ?? options.ioKiB
    case "--passes": options.passes = Int(args.popFirst() ?? "") ?? options.passes
    case "-h", "--help":
        print("""
            usage: blksnap-bench-engine [--device-mib N] [--io-kib N] [--passes N]
            Measures, in one process on in-memory disks: writes with no snapshot,
            first-touch writes under a snapshot (each copies its chunks first),
            rewrites of chunks already copied, and image reads; MB/s and ratios
            to the no-snapshot write. Then the engine's memory for a 1 TiB device.
            """)
        exit(0)
    default:
        print("unknown argument \(a); see --help")
        exit(2)
    }
}

/// A disk of any size that stores nothing: for measuring the engine's own
/// memory on a device far larger than this machine's RAM.
final class NullDevice: BlockDevice, @unchecked Sendable {
    let size: UInt64
    init(size: UInt64) { self.size = size }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlksnapError) {
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
    }
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlksnapError) {}
    func flush() throws(BlksnapError) {}
}

func residentBytes() -> Int {
    guard let fp = fopen("/proc/self/statm", "r") else { return 0 }
    defer { fclose(fp) }
    var size = 0, resident = 0
    _ = withUnsafeMutablePointer(to: &size) { s in
        withUnsafeMutablePointer(to: &resident) { r in
            withVaList([s, r]) { vfscanf(fp, "%d %d", $0) }
        }
    }
    return resident * Int(sysconf(Int32(_SC_PAGESIZE)))
}

let size = UInt64(options.deviceMiB) << 20
let io = options.ioKiB << 10
var logger = Logger(label: "bench")
logger.logLevel = .critical
let settings = EngineSettings()
let engine = Engine(settings: settings, logger: logger)
let original = MemoryBlockDevice(size: size)
let storage = MemoryBlockDevice(size: size * 2 + (64 << 20))
let devId = DevId(major: 7, minor: 0)
let device = try engine.route(devId, backing: original)
let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: io, alignment: 4096)
for i in 0..<io { buffer[i] = UInt8(truncatingIfNeeded: i &* 31) }

/// MB/s of `body` over `bytes`, best of `passes` runs.
func measure(passes: Int, bytes: UInt64, prepare: () throws -> Void = {}, _ body: () throws -> Void) rethrows -> Double {
    var best = 0.0
    for _ in 0..<passes {
        try prepare()
        let start = monotonicNanoseconds()
        try body()
        let seconds = Double(monotonicNanoseconds() - start) / 1e9
        best = max(best, Double(bytes) / 1e6 / seconds)
    }
    return best
}

func writeAll(_ d: some BlockDevice) throws {
    var offset: UInt64 = 0
    while offset < size {
        try d.write(UnsafeRawBufferPointer(buffer), at: offset)
        offset += UInt64(io)
    }
}

func readAll(_ d: some BlockDevice) throws {
    var offset: UInt64 = 0
    while offset < size {
        try d.read(into: buffer, at: offset)
        offset += UInt64(io)
    }
}


// Storage is a routed device of its own, so appending works through the
// public interface with no host disk.
let storageId = DevId(major: 7, minor: 1)
_ = try engine.route(storageId, backing: storage)

func takeFresh() throws -> SnapImage {
    for id in engine.collectSnapshots() { try engine.destroySnapshot(id) }
    let id = try engine.createSnapshot([devId])
    try engine.appendStorage(id, device: storageId, ranges: [SectorRange(offset: 0, count: storage.size >> 9)])
    try engine.takeSnapshot(id)
    return engine.images(of: id)[0]
}

try writeAll(device)   // fault every page in before timing anything
try writeAll(storage)
let plain = try measure(passes: options.passes, bytes: size) { try writeAll(original) }
let noSnapshot = try measure(passes: options.passes, bytes: size) { try writeAll(device) }
let firstTouch = try measure(passes: options.passes, bytes: size, prepare: { _ = try takeFresh() }) { try writeAll(device) }
let rewrite = try measure(passes: options.passes, bytes: size) { try writeAll(device) }
let image = try takeFresh()
let imageUntouched = try measure(passes: options.passes, bytes: size) { try readAll(image) }
try writeAll(device)
let imageStored = try measure(passes: options.passes, bytes: size) { try readAll(image) }
let originalRead = try measure(passes: options.passes, bytes: size) { try readAll(device) }
for id in engine.collectSnapshots() { try engine.destroySnapshot(id) }

/// `x` with `decimals` digits after the point, right-aligned in `width`.
func fixed(_ x: Double, _ decimals: Int, width: Int = 0) -> String {
    var scale = 1.0
    for _ in 0..<decimals { scale *= 10 }
    let n = Int((x * scale).rounded())
    var s = String(n / Int(scale))
    if decimals > 0 {
        let frac = String(abs(n) % Int(scale))
        s += "." + String(repeating: "0", count: decimals - frac.count) + frac
    }
    return String(repeating: " ", count: max(0, width - s.count)) + s
}

func row(_ name: String, _ mbps: Double, _ peer: Double, _ target: String = "") {
    let padded = name + String(repeating: " ", count: max(0, 48 - name.count))
    print(padded + fixed(mbps, 0, width: 8) + " MB/s " + fixed(mbps / peer, 2, width: 6) + "x   " + target)
}

print("blksnap-bench-engine: \(options.deviceMiB) MiB in-memory device, \(options.ioKiB) KiB writes, "
      + "chunk \(image.chunkSize >> 10) KiB, best of \(options.passes)")
print("peer: the same writes through the engine with no snapshot")
row("bare backing store (no engine)", plain, noSnapshot)
row("write, no snapshot (peer)", noSnapshot, noSnapshot)
row("write, first touch under a snapshot", firstTouch, noSnapshot, "target >= 0.33x")
row("rewrite of chunks already copied", rewrite, noSnapshot, "target >= 0.90x")
row("image read, no chunk copied (reads original)", imageUntouched, noSnapshot)
row("image read, every chunk copied (reads storage)", imageStored, noSnapshot)
row("original read", originalRead, noSnapshot)

// Memory for a 1 TiB device: route it over a disk that stores nothing,
// create, take, and measure what the process grew by.
let before = residentBytes()
let hugeId = DevId(major: 7, minor: 9)
_ = try engine.route(hugeId, backing: NullDevice(size: 1 << 40))
let hugeSnap = try engine.createSnapshot([hugeId])
try engine.appendStorage(hugeSnap, device: storageId, ranges: [SectorRange(offset: 0, count: 1 << 20)])
try engine.takeSnapshot(hugeSnap)
let grown = residentBytes() - before
let tracker = engine.tracker(hugeId)!
print("1 TiB device: CBT \(tracker.cbtMap.blockCount) blocks of \(Int(tracker.cbtMap.blockSize) >> 10) KiB (2 maps), "
      + "engine memory after TAKE \(fixed(Double(grown) / 1048576, 1)) MiB (target < 24 MiB)")
