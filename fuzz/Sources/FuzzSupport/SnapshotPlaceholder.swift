import BlksnapABI

/// Snapshot ids are random, so neither a recorded trace nor the fuzzer can
/// name a snapshot by its id. An id field holding "SNAPSHOT" in its first
/// eight bytes stands for the snapshot created (in this input) as number
/// `byte 15` modulo how many were made; the recorder writes ids so.
public enum SnapshotPlaceholder {
    static let tag = Array("SNAPSHOT".utf8)

    /// The commands whose struct starts with a snapshot id.
    static let commands: Set<UInt32> = [
        IoctlCommand.snapshotDestroy, .snapshotAppendStorage, .snapshotTake, .snapshotCollectImages,
        .snapshotWaitEvent,
    ].reduce(into: []) { $0.insert($1.number) }

    /// `bytes`, read at the struct of `command`, with a placeholder id
    /// replaced by the snapshot it stands for.
    public static func resolve(_ bytes: [UInt8], command: UInt32, created: [UUID16]) -> [UInt8] {
        guard commands.contains(command), bytes.count >= 16, !created.isEmpty,
              Array(bytes[0..<8]) == tag else { return bytes }
        var out = bytes
        out.replaceSubrange(0..<16, with: created[Int(bytes[15]) % created.count].array)
        return out
    }
}
