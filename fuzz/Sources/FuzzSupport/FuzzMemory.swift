import BlksnapABI
import BlksnapEngine
import BlksnapTestSupport

/// A caller's memory for the dispatcher: the regions of a frame, and
/// everywhere else what the policy says, faults or bytes from a seeded
/// generator. It remembers which writes it allowed, so a harness can check
/// that every byte the dispatcher hands back lands where it may.
public final class FuzzMemory: CallerMemory {
    public enum Policy: UInt32 {
        case fault = 0, random = 1, zeros = 2
    }

    /// Reads outside the regions larger than this fault: the harness must
    /// not itself allocate what the dispatcher asked for without limit.
    public static let unmappedReadLimit = 1 << 20

    let frame: IoctlFrame
    let policy: Policy
    let unmappedWritable: Bool
    private var generator: SplitMix64
    private var reads = 0
    public private(set) var allowedWrites: [(address: UInt64, count: Int)] = []

    let created: [UUID16]

    /// `created`: the snapshots made so far in this input, which
    /// placeholder ids stand for (`SnapshotPlaceholder`).
    public init(_ frame: IoctlFrame, created: [UUID16] = []) {
        self.frame = frame
        self.created = created
        policy = Policy(rawValue: frame.reserved & 3) ?? .fault
        unmappedWritable = frame.reserved & 4 != 0
        generator = SplitMix64(seed: frame.argument ^ UInt64(frame.command) << 32 ^ UInt64(frame.reserved))
    }

    public func read(at address: UInt64, count: Int) -> [UInt8]? {
        precondition(count >= 0, "the dispatcher asked for \(count) bytes")
        for r in frame.regions where r.carries && r.contains(address, count) {
            let start = Int(address - r.address)
            return defused(address, Array(r.bytes[start..<(start + count)]))
        }
        guard count <= Self.unmappedReadLimit, !address.addingReportingOverflow(UInt64(count)).overflow else { return nil }
        switch policy {
        case .fault: return nil
        case .zeros: return [UInt8](repeating: 0, count: count)
        case .random: return defused(address, generator.bytes(count))
        }
    }

    public func canWrite(at address: UInt64, count: Int) -> Bool {
        let mapped = frame.regions.contains { $0.takesBack && $0.contains(address, count) }
        let allowed = mapped || (unmappedWritable && policy != .fault
                                 && !address.addingReportingOverflow(UInt64(count)).overflow)
        if allowed { allowedWrites.append((address, count)) }
        return allowed
    }

    /// The same defusing as `IoctlFrame.defuse`, for bytes that come from
    /// the policy: a WAIT_EVENT never sleeps, a SETLOG path is /dev/null.
    private func defused(_ address: UInt64, _ bytes: [UInt8]) -> [UInt8] {
        guard let command = IoctlCommand(number: frame.command) else { return bytes }
        reads += 1
        var bytes = address == frame.argument
            ? SnapshotPlaceholder.resolve(bytes, command: frame.command, created: created) : bytes
        switch command {
        case .snapshotWaitEvent where address == frame.argument && bytes.count >= 20:
            bytes.replaceSubrange(16..<20, with: [0, 0, 0, 0])
        case .setlog where reads > 1:   // the first read is the struct, any other the path
            let path = Array("/dev/null".utf8) + [0]
            bytes = bytes.count >= path.count ? path + [UInt8](repeating: 0, count: bytes.count - path.count)
                                              : [UInt8](repeating: 0, count: bytes.count)
        default:
            break
        }
        return bytes
    }

    /// Whether every write lies within a span `canWrite` allowed.
    public func allows(_ write: CallerWrite) -> Bool {
        allowedWrites.contains { span in
            write.address >= span.address && write.address - span.address <= UInt64(span.count)
                && UInt64(write.bytes.count) <= UInt64(span.count) - (write.address - span.address)
        }
    }
}
