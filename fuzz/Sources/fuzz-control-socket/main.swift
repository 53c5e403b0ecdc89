import BlksnapABI
import BlksnapEngine
import CBlksnapABI
import FuzzSupport
@testable import BlksnapControlServer
#if canImport(Glibc)
import Glibc
#endif

// Harness: blksnapd's control socket (`ControlServer.serve`), fed the input
// as one client's byte stream over a socketpair, with the client's end
// read to the end. IOCTL frames are defused first (WAIT_EVENT's timeout 0,
// SETLOG's path NULL): both are right to wait and to create a file, but
// not in a fuzzer. Promises: the connection ends (no hang: libFuzzer's
// -timeout), every reply is well formed, a bad magic or a broken frame
// ends the connection without a reply, each whole frame before it gets
// exactly one reply, with an ABI errno, EINVAL for an unknown type, and
// writes only into the frame's OUT regions; run as another user than root,
// the first header gets EACCES and the end. Announced lengths are read as
// they arrive, so tools/fuzz runs this with a malloc limit far below them.

/// The most bytes a frame may announce and still surely be served; past
/// it, the server's own caps decide and the harness only checks replies.
let surelyServed = 64 << 10

struct Expected {
    var type: UInt32
    var frame: IoctlFrame?
}

/// The input cut into frames as the protocol frames it, each IOCTL frame
/// defused; `certain` is false when the last frame announced more than
/// `surelyServed` bytes.
func frames(_ bytes: [UInt8]) -> (stream: [UInt8], expected: [Expected], certain: Bool) {
    var input = FuzzInput(bytes)
    var stream: [UInt8] = [], expected: [Expected] = []
    while input.remaining >= IoctlFrame.headerSize {
        let start = input.position
        var header = FuzzInput(Array(bytes[start..<(start + IoctlFrame.headerSize)]))
        let magic = header.u32(), type = header.u32()
        _ = header.u32()
        let regionCount = header.u32()
        _ = header.u64()
        let payload = Int(header.u32())
        guard magic == BLKSNAP_CONTROL_MAGIC else { return (stream + input.rest(), expected, true) }
        if type == BLKSNAP_CONTROL_IOCTL.rawValue {
            // Walk the regions as the server will, before trusting the lenient reader.
            var walk = input
            _ = walk.take(IoctlFrame.headerSize)
            var total = 0
            for _ in 0..<regionCount {
                guard walk.remaining >= IoctlFrame.regionHeaderSize else { return (stream + input.rest(), expected, true) }
                _ = walk.u64()
                let length = Int(walk.u32()), flow = walk.u32()
                total += length
                guard total <= surelyServed else { return (stream + input.rest(), expected, false) }
                if flow & BLKSNAP_ABI_IN.rawValue != 0 {
                    guard walk.remaining >= length else { return (stream + input.rest(), expected, true) }
                    _ = walk.take(length)
                }
            }
            var frame = IoctlFrame.read(&input)!
            frame.defuse()
            stream += frame.encoded
            expected.append(Expected(type: type, frame: frame))
        } else {
            // The caps README.md states: over its cap, a request is closed unread.
            let cap = type == BLKSNAP_CONTROL_STATUS.rawValue ? 0
                : [BLKSNAP_CONTROL_ATTACH.rawValue, BLKSNAP_CONTROL_DETACH.rawValue].contains(type) ? 64 << 10
                : Int(BLKSNAP_CONTROL_MAX_BYTES)
            guard payload <= cap else { return (stream + input.rest(), expected, true) }
            guard payload <= surelyServed else { return (stream + input.rest(), expected, false) }
            guard input.remaining >= IoctlFrame.headerSize + payload else { return (stream + input.rest(), expected, true) }
            stream += input.take(IoctlFrame.headerSize + payload)
            expected.append(Expected(type: type, frame: nil))
        }
    }
    return (stream + input.rest(), expected, true)
}

@_cdecl("fuzz_control_socket_main")
public func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    runFuzzer(argc, argv) { fuzzOneInput($0, $1) }
}

let root = getuid() == 0

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    weak var gone: Engine?
    weak var peerGone: Background?
    do {
        let engine = makeFuzzEngine()
        gone = engine
        peerGone = converse(FuzzInput(data, size).bytes, engine)
    }
    // The leak check: the peer thread lets go of what it holds just after
    // join returns, so LeakSanitizer's check after each input would race
    // it (tools/fuzz turns that check off here); an engine or a thread
    // still alive a second later is held by a cycle or a lost thread.
    promise(eventually { gone == nil && peerGone == nil }, "the engine or the peer thread outlived the input by a second")
    return 0
}

/// Serves one connection and checks the replies; returns the peer thread.
func converse(_ bytes: [UInt8], _ engine: Engine) -> Background {
    let (stream, expected, certain) = frames(bytes)
    defer { engine.destroyAll() }
    let server = ControlServer(path: "/nonexistent", control: Control(engine: engine), logger: silentLogger)
    var fds: [Int32] = [-1, -1]
    promise(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0, "socketpair")
    let client = fds[1]
    final class Box: @unchecked Sendable { var replies: [UInt8] = [] }
    let box = Box()
    let peer = Background {
        var sent = 0
        while sent < stream.count {
            let n = stream.withUnsafeBytes { send(client, $0.baseAddress! + sent, stream.count - sent, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { break }
            sent += n
        }
        shutdown(client, Int32(SHUT_WR))
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buffer.withUnsafeMutableBytes { recv(client, $0.baseAddress!, $0.count, 0) }
            if n <= 0 { break }
            box.replies += buffer[0..<n]
        }
    }
    server.serve(fds[0])
    shutdown(fds[0], Int32(SHUT_RDWR))
    peer.join()
    close(fds[0])
    close(fds[1])
    check(replies: box.replies, expected: expected, certain: certain)
    return peer
}

func check(replies bytes: [UInt8], expected: [Expected], certain: Bool) {
    var r = FuzzInput(bytes)
    var count = 0
    while !r.isAtEnd {
        promise(r.remaining >= 16, "a reply header cut short")
        let magic = r.u32(), result = Int32(bitPattern: r.u32()), writes = r.u32(), payload = Int(r.u32())
        promise(magic == BLKSNAP_CONTROL_MAGIC, "a reply without the magic")
        promise(count < expected.count || !certain, "\(count + 1) replies to \(expected.count) whole frames")
        let frame = count < expected.count ? expected[count] : nil
        for _ in 0..<writes {
            promise(r.remaining >= 16, "a write header cut short")
            let address = r.u64(), length = Int(r.u32())
            _ = r.u32()
            promise(r.remaining >= length, "a write's bytes cut short")
            _ = r.take(length)
            if let f = frame?.frame {
                promise(f.regions.contains { $0.takesBack && $0.contains(address, length) },
                        "a write of \(length) bytes at 0x\(String(address, radix: 16)) outside the OUT regions")
            }
        }
        promise(r.remaining >= payload, "a reply payload cut short")
        _ = r.take(payload)
        if let frame {
            if !root {
                promise(result == -EACCES && count == 0, "a non-root peer got \(result) in reply \(count + 1)")
            } else if frame.type == BLKSNAP_CONTROL_IOCTL.rawValue {
                promise(result >= 0 || abiErrnos.contains(-result), "an ioctl failed with \(-result)")
            } else if ![BLKSNAP_CONTROL_STATUS.rawValue, BLKSNAP_CONTROL_ATTACH.rawValue,
                        BLKSNAP_CONTROL_DETACH.rawValue].contains(frame.type) {
                promise(result == -EINVAL, "unknown type \(frame.type) got \(result)")
            }
        }
        count += 1
    }
    // A stranger gets EACCES for its first header and is hung up on.
    let due = root ? expected.count : min(expected.count, 1)
    promise(count == due || !certain, "\(count) replies to \(expected.count) whole frames")
}
