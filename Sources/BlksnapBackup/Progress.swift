#if canImport(Glibc)
import Glibc
#endif

/// Progress on stderr: on a terminal one line per device, redrawn in place
/// (bytes, rate, time left); with `--json` one JSON object per line; else
/// (a log file, a pipe) one plain line per device when it is done. Stdout
/// is kept for the result.
public final class ProgressReporter: @unchecked Sendable {
    public enum Style: Sendable { case terminal, json, plain }
    public let style: Style
    private var started = 0.0
    private var lastDraw = 0.0

    public init(json: Bool) {
        style = json ? .json : (isatty(2) != 0 ? .terminal : .plain)
    }

    private func emit(_ line: String) {
        var bytes = Array(line.utf8)
        bytes.withUnsafeMutableBytes { raw in
            var off = 0
            while off < raw.count {
                let n = write(2, raw.baseAddress! + off, raw.count - off)
                if n <= 0 { if n < 0 && Glibc.errno == EINTR { continue }; return }
                off += n
            }
        }
    }

    /// A message for the operator.
    public func note(_ message: String) {
        switch style {
        case .json: emit(#"{"event":"message","message":"# + JSONText.quote(message) + "}\n")
        default: emit("blksnap-backup: \(message)\n")
        }
    }

    public func deviceStarted(_ name: String, total: UInt64, kind: String) {
        started = monotonicSeconds()
        lastDraw = 0
        if style == .json {
            emit(#"{"event":"start","device":"# + JSONText.quote(name) + #","kind":"\#(kind)","total":\#(total)}"# + "\n")
        }
    }

    public func deviceProgress(_ name: String, done: UInt64, total: UInt64, written: UInt64) {
        let now = monotonicSeconds()
        let elapsed = max(now - started, 1e-6)
        let rate = Double(done) / elapsed
        let eta = rate > 0 && total > done ? Double(total - done) / rate : 0
        switch style {
        case .json:
            emit(#"{"event":"progress","device":"# + JSONText.quote(name) + #","done":\#(done),"total":\#(total),"written":\#(written),"# +
                 #""rate":\#(Int(rate)),"eta":\#(Int(eta.rounded()))}"# + "\n")
        case .terminal:
            guard now - lastDraw >= 0.2 else { return }
            lastDraw = now
            let pct = total > 0 ? Double(done) * 100 / Double(total) : 100
            emit("\r\u{1B}[K\(name): \(Self.bytes(done)) / \(Self.bytes(total)) (\(Int(pct))%), \(Self.bytes(UInt64(rate)))/s, "
                 + "\(Self.duration(eta)) left")
        case .plain:
            break
        }
    }

    public func deviceFinished(_ name: String, scanned: UInt64, written: UInt64) {
        let elapsed = max(monotonicSeconds() - started, 1e-6)
        let rate = Double(scanned) / elapsed
        switch style {
        case .json:
            emit(#"{"event":"done","device":"# + JSONText.quote(name) + #","scanned":\#(scanned),"written":\#(written),"# +
                 #""seconds":\#((elapsed * 1000).rounded() / 1000)}"# + "\n")
        case .terminal:
            emit("\r\u{1B}[K\(name): \(Self.bytes(scanned)) read, \(Self.bytes(written)) written, \(Self.bytes(UInt64(rate)))/s, "
                 + "\(Self.duration(elapsed))\n")
        case .plain:
            emit("\(name): \(Self.bytes(scanned)) read, \(Self.bytes(written)) written, \(Self.bytes(UInt64(rate)))/s, "
                 + "\(Self.duration(elapsed))\n")
        }
    }

    public static func bytes(_ n: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var v = Double(n)
        var u = 0
        while v >= 1024 && u < units.count - 1 { v /= 1024; u += 1 }
        return u == 0 ? "\(n) B" : "\((v * 10).rounded() / 10) \(units[u])"
    }

    public static func duration(_ s: Double) -> String {
        let t = Int(s.rounded())
        return t >= 3600 ? "\(t / 3600)h\(t / 60 % 60)m" : t >= 60 ? "\(t / 60)m\(t % 60)s" : String(format1(s)) + "s"
    }

    static func format1(_ v: Double) -> String { "\((v * 10).rounded() / 10)" }
}

/// JSON string quoting for the hand-built progress lines (one per tick:
/// an encoder would be the slower half of the line).
public enum JSONText {
    public static func quote(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if u.value < 0x20 {
                    let hex = String(u.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    out.unicodeScalars.append(u)
                }
            }
        }
        return out + "\""
    }
}
