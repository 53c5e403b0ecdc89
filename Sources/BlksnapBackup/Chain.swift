/// The decisions about backup chains, kept free of I/O so they can be
/// tested alone: which backups a restore reads, whether the next backup
/// can be incremental, and what prune does.
public enum Chain {
    /// The backups whose files make up backup `number`, full base first.
    public static func resolve(_ backups: [Manifest], number: Int) throws(BackupError) -> [Manifest] {
        let byNumber = Dictionary(backups.map { ($0.number, $0) }, uniquingKeysWith: { a, _ in a })
        guard var current = byNumber[number] else {
            throw BackupError(.noSuchFileOrDirectory, "no good backup \(number) in the repository")
        }
        var chain = [current]
        while let parent = current.parent {
            guard let p = byNumber[parent] else {
                throw BackupError(.noSuchFileOrDirectory, "backup \(current.number) needs backup \(parent), which is missing")
            }
            current = p
            chain.append(p)
        }
        return chain.reversed()
    }

    /// One device as it is at the new backup's TAKE.
    public struct DeviceState: Equatable, Sendable {
        public var name: String
        public var sizeBytes: UInt64
        public var generationId: String
        public init(name: String, sizeBytes: UInt64, generationId: String) {
            (self.name, self.sizeBytes, self.generationId) = (name, sizeBytes, generationId)
        }
    }

    public enum Decision: Equatable, Sendable {
        /// Copy the changed blocks since the parent's snap number, per device.
        case incremental(parent: Int, since: [String: UInt8])
        /// Copy everything; `reason` says why an incremental was not possible
        /// (nil when a full was asked for or there is nothing to build on).
        case full(reason: String?)
    }

    /// Whether the devices can be backed up incrementally on top of
    /// `previous` (the repository's latest good backup).
    public static func decide(previous: Manifest?, devices: [DeviceState], wantIncremental: Bool) -> Decision {
        guard wantIncremental else { return .full(reason: nil) }
        guard let previous else { return .full(reason: "the repository has no backup to build on") }
        var since: [String: UInt8] = [:]
        for d in devices {
            guard let old = previous.devices.first(where: { $0.name == d.name }) else {
                return .full(reason: "\(d.name) is not in backup \(previous.number)")
            }
            // A resize also draws a new generation; the size is the clearer reason.
            guard old.sizeBytes == d.sizeBytes else {
                return .full(reason: "\(d.name) changed size (\(old.sizeBytes) to \(d.sizeBytes) bytes)")
            }
            guard old.generationId == d.generationId else {
                return .full(reason: "\(d.name) has a new CBT generation (\(d.generationId), backup \(previous.number) has \(old.generationId)): change tracking restarted")
            }
            since[d.name] = old.snapNumber
        }
        if previous.devices.count != devices.count {
            return .full(reason: "backup \(previous.number) has other devices (\(previous.devices.map(\.name).joined(separator: ", ")))")
        }
        return .incremental(parent: previous.number, since: since)
    }

    /// One step of prune, oldest first.
    public enum PruneStep: Equatable, Sendable {
        /// Delete a backup nothing remaining depends on.
        case drop(Int)
        /// Merge backup `from` into its child `into` (qemu-img commit of the
        /// child into the parent's file, which then becomes the child's),
        /// so `into` becomes a full backup holding the same contents.
        case merge(from: Int, into: Int)
    }

    /// Keeps the newest `keep` backups, each still restorable: an oldest
    /// backup with a remaining child is merged into it, otherwise dropped.
    public static func prunePlan(_ backups: [Manifest], keep: Int) -> [PruneStep] {
        let sorted = backups.sorted { $0.number < $1.number }
        guard keep >= 1, sorted.count > keep else { return [] }
        let removed = sorted.prefix(sorted.count - keep)
        let kept = Set(sorted.suffix(keep).map(\.number))
        var steps: [PruneStep] = []
        for b in removed {
            if let child = sorted.first(where: { $0.parent == b.number && (kept.contains($0.number) || removed.contains($0)) }) {
                steps.append(.merge(from: b.number, into: child.number))
            } else {
                steps.append(.drop(b.number))
            }
        }
        return steps
    }
}
