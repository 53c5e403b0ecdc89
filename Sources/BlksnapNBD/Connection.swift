import BlksnapEngine
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// How much one connection does at once.
public struct ConnectionLimits: Sendable {
    /// Threads executing requests; replies go out as each finishes, so a
    /// slow read does not hold up the writes queued behind it.
    public var workers: Int
    /// Requests read but not yet answered. The reader stops reading past
    /// this, which pushes back on the client through the socket.
    public var maxInFlight: Int
    /// WRITE payload bytes held in the queue: without it 64 requests of
    /// 32 MiB would pin 2 GiB per connection. A single payload larger than
    /// this is still taken when nothing else is queued.
    public var maxBytesInFlight: Int

    /// Clients served at once (the kernel's own connections not counted):
    /// with the two limits above, this bounds what clients can make the
    /// server hold. One more is hung up on as it arrives.
    public var maxConnections: Int

    public init(workers: Int = 8, maxInFlight: Int = 64, maxBytesInFlight: Int = 128 << 20, maxConnections: Int = 64) {
        self.workers = max(workers, 1)
        self.maxInFlight = max(maxInFlight, 1)
        self.maxBytesInFlight = max(maxBytesInFlight, 1)
        self.maxConnections = max(maxConnections, 1)
    }
}

/// One client, from greeting to close (nbdkit's `connections.c` with the
/// request loop of `protocol.c`).
///
/// The thread that calls `run` negotiates, then becomes the reader: it
/// parses each request, refuses invalid ones itself, and queues the rest
/// for `limits.workers` worker threads. Replies may leave out of order, as
/// the spec allows; `writeLock` keeps each reply's bytes together on the
/// wire. `queueLock` guards the queue and the counters below it.
///
/// The connection ends at NBD_CMD_DISC, end of stream, a bad request magic
/// (the stream can no longer be framed) or a failed send; every queued
/// request still runs and `run` returns once the workers are gone. The
/// caller closes the stream.
final class Connection: @unchecked Sendable {
    let id: Int
    private let stream: any ByteStream
    private let exports: ExportTable
    private let limits: ConnectionLimits
    private let logger: Logger

    /// Set by the reader before any worker starts; read-only afterwards.
    private var negotiated: Negotiated!
    private var state: TransmissionState!

    private let writeLock = Lock()
    private let queueLock = Lock()
    private let workAvailable = Condition()
    private let spaceAvailable = Condition()
    private let workersGone = Condition()
    private var queue: [Job] = []
    private var queueHead = 0
    private var inFlight = 0
    private var bytesInFlight = 0
    private var finishing = false
    private var liveWorkers = 0
    private let dead = Atomic<Bool>(false)

    struct Job: @unchecked Sendable {
        var request: NBDRequest
        var command: NBDCommand
        /// A WRITE's data, owned by the job.
        var payload: UnsafeMutableRawBufferPointer?
    }

    init(id: Int, stream: any ByteStream, exports: ExportTable, limits: ConnectionLimits, logger: Logger) {
        self.id = id
        self.stream = stream
        self.exports = exports
        self.limits = limits
        self.logger = logger
    }

    private var label: String { "nbd-connection[\(id)]" }

    /// Negotiates and serves until the client leaves; blocks the caller.
    /// With `preNegotiated` (the kernel's nbd driver, which starts in the
    /// transmission phase) there is no handshake.
    func run(preNegotiated: Negotiated? = nil) {
        let outcome = preNegotiated.map { Handshake.Outcome.transmission($0) }
            ?? Handshake(stream: stream, exports: exports, logger: logger).run()
        switch outcome {
        case .closed(let why):
            logger.debug("\(label): closed during the handshake: \(why)")
            return
        case .transmission(let n):
            negotiated = n
            state = TransmissionState(size: n.export.device.size, readOnly: n.export.readOnly,
                                      structuredReplies: n.structuredReplies,
                                      metaContextCount: n.metaContexts.count,
                                      minimumBlockSize: n.export.minimumBlockSize)
            logger.debug("\(label): export \(n.export.name), structured replies \(n.structuredReplies), contexts \(n.metaContexts.map(\.context.name))")
        }
        liveWorkers = limits.workers
        for _ in 0..<limits.workers {
            startThread { [self] in workerLoop() }
        }
        readLoop()
        queueLock.withLock {
            finishing = true
            workAvailable.broadcast()
            while liveWorkers > 0 { workersGone.wait(queueLock) }
        }
        logger.debug("\(label): closed")
    }

    // MARK: reader

    private func readLoop() {
        let header = UnsafeMutableRawBufferPointer.allocate(byteCount: NBD.requestHeaderSize, alignment: 8)
        defer { header.deallocate() }
        while !dead.load(ordering: .relaxed) {
            guard stream.receive(into: header) else { return }
            let request: NBDRequest
            switch NBDRequest.parse(UnsafeRawBufferPointer(header)) {
            case .success(let r):
                request = r
            case .failure(let why):
                logger.warning("\(label): bad request header (\(why)); closing the connection")
                return
            }
            if let rejection = request.validate(state) {
                if request.hasPayload {
                    guard request.length <= NBD.maxSkippablePayload else {
                        logger.warning("\(label): WRITE of \(request.length) bytes is beyond any limit; closing the connection")
                        return
                    }
                    guard stream.skip(Int(request.length)) else { return }
                }
                logger.debug("\(label): refused: \(rejection.message)")
                send(NBDReply.failure(handle: request.handle, error: rejection.error, message: rejection.message,
                                      structured: state.structuredReplies))
                continue
            }
            let command = request.command!
            if command == .disconnect { return }
            var payload: UnsafeMutableRawBufferPointer?
            if request.hasPayload {
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(request.length),
                                                                    alignment: bufferAlignment)
                guard stream.receive(into: buffer) else {
                    buffer.deallocate()
                    return
                }
                payload = buffer
            }
            enqueue(Job(request: request, command: command, payload: payload))
        }
    }

    private func enqueue(_ job: Job) {
        let bytes = job.payload?.count ?? 0
        queueLock.withLock {
            while inFlight >= limits.maxInFlight
                    || (bytesInFlight > 0 && bytesInFlight + bytes > limits.maxBytesInFlight) {
                spaceAvailable.wait(queueLock)
            }
            queue.append(job)
            inFlight += 1
            bytesInFlight += bytes
            // All idle workers, not one: waking one (signal) cut the futex
            // calls per request from 12-16 to about 5 on the host, but the
            // one woken tends to land on the reader's CPU and wait there
            // (1M writes 30% slower on the host; in the TCG lane every row
            // 3-8x slower than with broadcast, tools/bench-lane).
            workAvailable.broadcast()
        }
    }

    // MARK: workers

    private func workerLoop() {
        // A splice to the socket of a client that went away raises SIGPIPE
        // (splice has no MSG_NOSIGNAL); blocked, the splice fails with
        // EPIPE like a send.
        var pipeSignal = sigset_t()
        sigemptyset(&pipeSignal)
        sigaddset(&pipeSignal, SIGPIPE)
        pthread_sigmask(SIG_BLOCK, &pipeSignal, nil)
        while true {
            queueLock.lock()
            while queueHead == queue.count && !finishing { workAvailable.wait(queueLock) }
            if queueHead == queue.count {
                liveWorkers -= 1
                workersGone.broadcast()
                queueLock.unlock()
                return
            }
            let job = queue[queueHead]
            queueHead += 1
            if queueHead == queue.count {
                queue.removeAll(keepingCapacity: true)
                queueHead = 0
            }
            queueLock.unlock()

            execute(job)
            let bytes = job.payload?.count ?? 0
            job.payload?.deallocate()

            queueLock.withLock {
                inFlight -= 1
                bytesInFlight -= bytes
                // Only the reader waits for space.
                spaceAvailable.signal()
            }
        }
    }

    private var device: any BlockDevice { negotiated.export.device }
    private var bufferAlignment: Int { max(negotiated.export.device.alignment, 16) }

    private func execute(_ job: Job) {
        let r = job.request
        let fua = r.flags & NBD.cmdFlagFUA != 0
        do throws(BlksnapError) {
            switch job.command {
            case .read:
                if sendFromFile(r) { return }
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(r.length), alignment: bufferAlignment)
                defer { buffer.deallocate() }
                try device.read(into: buffer, at: r.offset)
                // The data is all in hand, so the data chunk can be the
                // final one: no error can follow it.
                let head = state.structuredReplies
                    ? NBDReply.offsetDataHeader(handle: r.handle, offset: r.offset, dataLength: r.length)
                    : NBDReply.simple(handle: r.handle, error: 0)
                send(head, UnsafeRawBufferPointer(buffer))
                return
            case .write:
                try device.write(UnsafeRawBufferPointer(job.payload!), at: r.offset)
                if fua { try device.flush() }
            case .flush:
                // Global, not this connection's: every connection to the
                // export writes through the same device and answers a
                // write only once the device has it, so the device's flush
                // (fdatasync of the backing) covers what any connection
                // acknowledged. The kernel, with several connections to a
                // device, sends its FLUSH on one of them and relies on
                // that (NBD_FLAG_CAN_MULTI_CONN).
                try device.flush()
            case .trim:
                try device.discard(at: r.offset, length: UInt64(r.length))
                if fua { try device.flush() }
            case .writeZeroes:
                try writeZeroes(r)
                if fua { try device.flush() }
            case .blockStatus:
                try blockStatus(r)
                return
            case .disconnect, .cache:
                preconditionFailure("\(job.command) is never queued")
            }
            send(NBDReply.simple(handle: r.handle, error: 0))
        } catch {
            logger.warning("\(label): \(job.command) \(r.offset)+\(r.length) failed: \(error)")
            // The engine's message may name files; the client gets the errno.
            send(NBDReply.failure(handle: r.handle, error: nbdError(error.errno),
                                  message: "\(job.command) failed: \(error.errno)",
                                  structured: state.structuredReplies))
        }
    }

    /// NO_HOLE asks for allocated zeros, so only without it, and only where
    /// a discard is known to read back as zeros, may we discard instead.
    private func writeZeroes(_ r: NBDRequest) throws(BlksnapError) {
        if r.flags & NBD.cmdFlagNoHole == 0 && negotiated.export.discardZeroes {
            try device.discard(at: r.offset, length: UInt64(r.length))
            return
        }
        try device.writeZeroes(at: r.offset, length: UInt64(r.length))
    }

    /// One chunk per selected context, the last marked done; all computed
    /// before any is sent, so a failing context leaves no half answer.
    private func blockStatus(_ r: NBDRequest) throws(BlksnapError) {
        let reqOne = r.flags & NBD.cmdFlagReqOne != 0
        var chunks: [UInt8] = []
        let contexts = negotiated.metaContexts
        for (i, (id, context)) in contexts.enumerated() {
            let extents = try context.extents(export: negotiated.export, offset: r.offset, length: r.length,
                                              reqOne: reqOne)
            chunks += NBDReply.blockStatus(handle: r.handle, contextId: id, extents: extents,
                                           done: i == contexts.count - 1)
        }
        send(chunks)
    }

    /// Reads of a routed device at least this long go from its backing
    /// file to the socket by splice: below it the two extra calls (the
    /// header into the pipe, the data out of it) cost more than the copy.
    static let fileSendMinimum = 32 << 10

    /// Sends a READ's reply with its data moved by the kernel from the
    /// backing file to the socket, no copy through a buffer of ours; false
    /// where it does not apply and nothing was sent.
    ///
    /// Only a routed device: its reads want the file's current bytes, so a
    /// page the socket still holds when a later write changes it is no
    /// loss. Never a snapshot image, even where its bytes lie in a file:
    /// the socket may hold a page of the original until the client reads
    /// it, and copy on write may by then have let the original change, so
    /// the image would show bytes it never had.
    private func sendFromFile(_ r: NBDRequest) -> Bool {
        guard r.length >= Self.fileSendMinimum, let socket = stream.descriptor,
              let routed = device as? RoutedDevice, SplicePipe.room(for: Int(r.length), at: r.offset).data,
              let range = routed.fileRange(at: r.offset, count: Int(r.length)) else { return false }
        let head = state.structuredReplies
            ? NBDReply.offsetDataHeader(handle: r.handle, offset: r.offset, dataLength: r.length)
            : NBDReply.simple(handle: r.handle, error: 0)
        let loaded = head.withUnsafeBytes {
            SplicePipe.load(prefix: $0, from: range.descriptor, at: range.offset, count: Int(r.length))
        }
        guard let loaded else { return false }
        let ok = writeLock.withLock { () -> Bool in
            guard !dead.load(ordering: .relaxed) else {
                SplicePipe.discard()
                return false
            }
            // The header goes in the pipe, so header and data in one
            // splice, unless the pipe had only room for the data (a 1 MiB
            // pipe and a 1 MiB read): then it goes just before, MSG_MORE.
            if loaded == Int(r.length) && !sendPrefix(head, to: socket) {
                SplicePipe.discard()
                return false
            }
            return SplicePipe.drain(loaded, to: socket)
        }
        if !ok { lost() }
        return true
    }

    private func sendPrefix(_ bytes: [UInt8], to socket: Int32) -> Bool {
        bytes.withUnsafeBytes { p -> Bool in
            var done = 0
            while done < p.count {
                let n = Glibc.send(socket, p.baseAddress! + done, p.count - done, Int32(MSG_NOSIGNAL | MSG_MORE))
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { return false }
                done += n
            }
            return true
        }
    }

    // MARK: sending

    private func send(_ bytes: [UInt8]) {
        let ok = writeLock.withLock { stream.send(bytes) }
        if !ok { lost() }
    }

    private func send(_ header: [UInt8], _ data: UnsafeRawBufferPointer) {
        let ok = writeLock.withLock { stream.send(header, data) }
        if !ok { lost() }
    }

    /// A send failed: the client is gone, so the reader is woken and stops;
    /// queued requests still run, their replies dropped.
    private func lost() {
        if !dead.exchange(true, ordering: .relaxed) {
            logger.debug("\(label): the client went away")
            stream.shutdown()
        }
    }
}
