@testable import BlksnapNBD
import Testing

/// A stream that hands out scripted pieces, one per receive call, and
/// records what each call asked for.
final class PieceSource {
    var pieces: [[UInt8]]
    var calls: [(count: Int, wait: Bool)] = []

    init(_ pieces: [[UInt8]]) { self.pieces = pieces }

    func read(_ memory: UnsafeMutableRawPointer, _ count: Int, _ wait: Bool) -> Int {
        calls.append((count, wait))
        guard !pieces.isEmpty else { return 0 }
        var piece = pieces.removeFirst()
        if piece.count > count {
            pieces.insert(Array(piece[count...]), at: 0)
            piece = Array(piece[..<count])
        }
        piece.withUnsafeBytes { memory.copyMemory(from: $0.baseAddress!, byteCount: piece.count) }
        return piece.count
    }
}

func pattern(_ count: Int, seed: Int) -> [UInt8] { (0..<count).map { UInt8(truncatingIfNeeded: $0 * 7 + seed) } }

@Suite struct ReadAheadTests {
    func receive(_ count: Int, _ ahead: inout ReadAhead, _ source: PieceSource) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: count)
        let ok = out.withUnsafeMutableBytes { ahead.receive(into: $0, from: source.read) }
        return ok ? out : nil
    }

    @Test func severalRequestsInOneReceiveCostOneCall() {
        let a = pattern(28, seed: 1), b = pattern(28, seed: 2), c = pattern(28, seed: 3)
        let source = PieceSource([a + b + c])
        var ahead = ReadAhead()
        #expect(receive(28, &ahead, source) == a)
        #expect(receive(28, &ahead, source) == b)
        #expect(receive(28, &ahead, source) == c)
        #expect(source.calls.count == 1)
        #expect(ahead.buffered == 0)
    }

    @Test func aRequestSplitAcrossReceivesComesOutWhole() {
        let header = pattern(28, seed: 4), next = pattern(28, seed: 5)
        let source = PieceSource([Array(header[..<3]), Array(header[3..<20]), Array(header[20...]) + Array(next[..<1]),
                                  Array(next[1...])])
        var ahead = ReadAhead()
        #expect(receive(28, &ahead, source) == header)
        #expect(receive(28, &ahead, source) == next)
        #expect(source.calls.count == 4)
    }

    /// A large payload: what came with its header is taken from the read
    /// ahead, the rest is asked for whole, straight into the payload.
    @Test func theRestOfALargePayloadGoesStraightIntoItsBuffer() {
        let header = pattern(28, seed: 6), payload = pattern(256 << 10, seed: 7), after = pattern(28, seed: 8)
        let source = PieceSource([header + Array(payload[..<1000]), Array(payload[1000...]) + after])
        var ahead = ReadAhead(capacity: 64 << 10)
        #expect(receive(28, &ahead, source) == header)
        #expect(receive(payload.count, &ahead, source) == payload)
        #expect(receive(28, &ahead, source) == after)
        #expect(source.calls.map(\.count) == [64 << 10, payload.count - 1000, 64 << 10])
        #expect(source.calls.map(\.wait) == [false, true, false])
    }

    @Test func endOfStreamInsideARequestIsAFailure() {
        let source = PieceSource([pattern(20, seed: 9)])
        var ahead = ReadAhead()
        #expect(receive(28, &ahead, source) == nil)
    }

    @Test func anErrorOfTheStreamIsAFailure() {
        var ahead = ReadAhead()
        var out = [UInt8](repeating: 0, count: 28)
        let ok = out.withUnsafeMutableBytes { ahead.receive(into: $0) { _, _, _ in -1 } }
        #expect(!ok)
    }
}
