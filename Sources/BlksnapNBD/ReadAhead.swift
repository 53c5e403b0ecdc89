/// The receiving side of a connection's stream: small reads (request
/// headers, small payloads) come out of bytes read ahead, so several
/// requests the client sent together cost one receive call between them;
/// the rest of a large payload goes from the socket straight into its own
/// buffer.
///
/// At most `capacity` bytes of a payload are ever copied out of the read
/// ahead: those that arrived with the header before them. Used by one
/// thread at a time (the connection's reader).
struct ReadAhead: ~Copyable {
    /// Reads into the memory given, at most the count given; `wait` asks
    /// for the whole count (MSG_WAITALL). Returns the bytes read, 0 at end
    /// of stream, -1 on an error.
    typealias Source = (UnsafeMutableRawPointer, Int, _ wait: Bool) -> Int

    /// A remainder this large goes straight into the caller's buffer.
    static let directMinimum = 16 << 10

    private let inbox: UnsafeMutableRawBufferPointer
    private var start = 0
    private var end = 0

    init(capacity: Int = 64 << 10) {
        inbox = .allocate(byteCount: max(capacity, 1), alignment: 16)
    }

    deinit { inbox.deallocate() }

    /// Bytes read ahead and not yet handed out.
    var buffered: Int { end - start }

    /// Fills `buffer`; false at end of stream or on error.
    mutating func receive(into buffer: UnsafeMutableRawBufferPointer, from source: Source) -> Bool {
        var done = takeBuffered(into: buffer, at: 0)
        while done < buffer.count {
            let left = buffer.count - done
            if left >= Self.directMinimum {
                let n = source(buffer.baseAddress! + done, left, true)
                if n <= 0 { return false }
                done += n
            } else {
                let n = source(inbox.baseAddress!, inbox.count, false)
                if n <= 0 { return false }
                (start, end) = (0, n)
                done += takeBuffered(into: buffer, at: done)
            }
        }
        return true
    }

    private mutating func takeBuffered(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) -> Int {
        let n = min(end - start, buffer.count - offset)
        guard n > 0 else { return 0 }
        (buffer.baseAddress! + offset).copyMemory(from: inbox.baseAddress! + start, byteCount: n)
        start += n
        return n
    }
}
