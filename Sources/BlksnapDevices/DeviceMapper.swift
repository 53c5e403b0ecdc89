import BlksnapABI
import BlksnapEngine
#if canImport(Glibc)
import Glibc
#endif

/// A device-mapper device as dmsetup shows it: what live routing reads and
/// rewrites. dmsetup (Debian's dmsetup, beside lvm2) does the talking to
/// the kernel; its table text is what we keep, so an operator can put a
/// table back with dmsetup alone.
public enum DeviceMapper {
    /// One line of a table: `start length type args...`, in sectors.
    public struct Target: Equatable, Sendable {
        public var start: UInt64
        public var length: UInt64
        public var type: String
        public var arguments: String

        public var line: String { "\(start) \(length) \(type) \(arguments)" }
    }

    /// The targets live routing copies: each maps sectors straight onto
    /// other devices, so a second device with the same table reaches the
    /// same data. Others (snapshot, thin, raid, crypt, cache...) keep state
    /// or a private key that a copy would split or not have.
    public static let supportedTargets: Set<String> = ["linear", "striped"]

    /// Parses `dmsetup table` output; nil for text that is not a table.
    public static func parse(table text: String) -> [Target]? {
        var targets: [Target] = []
        var next: UInt64 = 0
        for line in text.split(separator: "\n") where !line.allSatisfy({ $0 == " " }) {
            let fields = line.split(separator: " ", maxSplits: 3, omittingEmptySubsequences: true)
            guard fields.count >= 3, let start = UInt64(fields[0]), let length = UInt64(fields[1]),
                  start == next, length > 0 else { return nil }
            let (end, overflow) = start.addingReportingOverflow(length)
            guard !overflow else { return nil }
            next = end
            targets.append(Target(start: start, length: length, type: String(fields[2]),
                                  arguments: fields.count > 3 ? String(fields[3]) : ""))
        }
        return targets.isEmpty ? nil : targets
    }

    /// Sectors a table maps.
    public static func sectors(_ table: [Target]) -> UInt64 { table.last.map { $0.start + $0.length } ?? 0 }

    /// The dm name of a device number, or nil when it is no dm device.
    public static func name(of devId: DevId) -> String? {
        readAttribute("/sys/dev/block/\(devId)/dm/name").flatMap { $0.isEmpty ? nil : $0 }
    }

    /// Runs `dmsetup ARGS`; its output, or an error that carries what it said.
    @discardableResult
    public static func dmsetup(_ arguments: [String]) throws(BlksnapError) -> String {
        let (status, output) = runCommand(["dmsetup"] + arguments)
        guard status == 0 else {
            let said = output.split(separator: "\n").last.map(String.init) ?? "exit \(status)"
            throw BlksnapError(status == 127 ? .noSuchFileOrDirectory : .ioError,
                               "dmsetup \(arguments.joined(separator: " ")) failed: \(said)")
        }
        return output
    }

    public static func table(_ name: String) throws(BlksnapError) -> [Target] {
        let text = try dmsetup(["table", name])
        guard let table = parse(table: text) else {
            throw BlksnapError(.invalidArgument, "cannot read the table of \(name): \(text)")
        }
        return table
    }

    /// Swaps a live device's table for the one in a file: suspend, load,
    /// resume. Suspend drains the I/O in flight on the old table and holds
    /// new I/O until resume, which is all the swap needs; freezing the
    /// filesystem too (lockfs) would only lengthen the pause by flushing
    /// its dirty pages first. On a failed load the device resumes on the
    /// table it had.
    public static func swapTable(of name: String, toTableIn file: String) throws(BlksnapError) {
        try dmsetup(["suspend", "--nolockfs", name])
        do throws(BlksnapError) {
            try dmsetup(["load", name, file])
        } catch {
            _ = try? dmsetup(["resume", name])
            throw error
        }
        try dmsetup(["resume", name])
    }
}
