import FoundationEssentials

/// What one backup in a repository holds, written last and atomically: a
/// backup directory without its manifest is a failed or unfinished one, and
/// nothing lists it as good.
public struct Manifest: Codable, Equatable, Sendable {
    public static let formatVersion = 1

    public enum Kind: String, Codable, Sendable { case full, incremental }

    /// One device of the backup and its qcow2 file.
    public struct Device: Codable, Equatable, Sendable {
        /// The device as the operator named it (`--device`), which is how
        /// later backups and restores find it.
        public var name: String
        /// The file in the backup's directory.
        public var file: String
        /// The device's major:minor at the backup.
        public var devId: String
        public var sizeBytes: UInt64
        /// The CBT of the device at this backup's TAKE: its generation id,
        /// the snap number of the TAKE, and the tracking block size.
        public var generationId: String
        public var snapNumber: UInt8
        public var blockSize: UInt32
        /// Bytes this backup wrote into its file (the changed blocks, or for
        /// a full backup every non-zero block).
        public var bytesCopied: UInt64
        /// Bytes the CBT map marked changed (incremental) or the whole device.
        public var bytesScanned: UInt64
        /// sha256 of the qcow2 file as it was closed: verify reads every
        /// file of a chain back against these.
        public var sha256: String

        public init(name: String, file: String, devId: String, sizeBytes: UInt64, generationId: String,
                    snapNumber: UInt8, blockSize: UInt32, bytesCopied: UInt64, bytesScanned: UInt64, sha256: String) {
            self.name = name
            self.file = file
            self.devId = devId
            self.sizeBytes = sizeBytes
            self.generationId = generationId
            self.snapNumber = snapNumber
            self.blockSize = blockSize
            self.bytesCopied = bytesCopied
            self.bytesScanned = bytesScanned
            self.sha256 = sha256
        }
    }

    public var format: Int
    public var number: Int
    public var kind: Kind
    /// The backup whose files back this one's (incremental only).
    public var parent: Int?
    /// Seconds since the epoch at TAKE, and the same as text.
    public var takenAt: Int64
    public var takenAtText: String
    public var seconds: Double
    public var snapshotId: String
    /// Why an incremental was asked for but a full was made, if it was.
    public var fallbackReason: String?
    /// Backups that prune merged into this one.
    public var merged: [Int]
    public var devices: [Device]

    public init(number: Int, kind: Kind, parent: Int?, takenAt: Int64, seconds: Double, snapshotId: String,
                fallbackReason: String?, devices: [Device]) {
        self.format = Manifest.formatVersion
        self.number = number
        self.kind = kind
        self.parent = parent
        self.takenAt = takenAt
        self.takenAtText = Manifest.utcText(takenAt)
        self.seconds = seconds
        self.snapshotId = snapshotId
        self.fallbackReason = fallbackReason
        self.merged = []
        self.devices = devices
    }

    public func device(named name: String) -> Device? {
        devices.first { $0.name == name } ?? devices.first { $0.name.split(separator: "/").last.map(String.init) == name }
    }

    public var bytesCopied: UInt64 { devices.reduce(0) { $0 + $1.bytesCopied } }

    public func encoded() throws -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        return Array(try encoder.encode(self)) + [10]
    }

    public static func decode(_ bytes: [UInt8]) throws -> Manifest {
        let m = try JSONDecoder().decode(Manifest.self, from: Data(bytes))
        guard m.format == formatVersion else {
            throw BackupError(.invalidArgument, "manifest format \(m.format) is not \(formatVersion)")
        }
        guard m.number > 0, m.parent.map({ $0 > 0 && $0 < m.number }) ?? true,
              (m.kind == .full) == (m.parent == nil), !m.devices.isEmpty else {
            throw BackupError(.invalidArgument, "manifest of backup \(m.number) is inconsistent")
        }
        for d in m.devices where d.file.contains("/") || d.file.hasPrefix(".") {
            throw BackupError(.invalidArgument, "manifest of backup \(m.number) names a file outside its directory: \(d.file)")
        }
        return m
    }

    /// `2026-12-01T15:04:05Z`.
    public static func utcText(_ seconds: Int64) -> String {
        let days = seconds >= 0 ? seconds / 86400 : (seconds - 86399) / 86400
        let rest = seconds - days * 86400
        // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
        let z = days + 719468
        let era = (z >= 0 ? z : z - 146096) / 146097
        let doe = z - era * 146097
        let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let d = doy - (153 * mp + 2) / 5 + 1
        let m = mp < 10 ? mp + 3 : mp - 9
        let y = yoe + era * 400 + (m <= 2 ? 1 : 0)
        func two(_ v: Int64) -> String { v < 10 ? "0\(v)" : "\(v)" }
        return "\(y)-\(two(m))-\(two(d))T\(two(rest / 3600)):\(two(rest / 60 % 60)):\(two(rest % 60))Z"
    }
}
