import BlksnapABI
import BlksnapEngine
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// The routed devices an operator declares, so that blksnapd routes them at
/// every start before it reports ready: every `*.conf` file of the
/// configuration directory (/etc/blksnap), read in name order. One device
/// per line:
///
///     # NAME   BACKING                         [size=BYTES] [live]
///     vm1      /var/lib/disks/vm1.img          size=10G
///     data     /dev/sdb
///     remote   nbd+unix:///disk?socket=/run/qsd.sock
///     lv       /dev/vg0/data                   live
///
/// NAME (letters, digits, `.`, `_`, `-`; at most 64) becomes the stable link
/// /dev/disk/by-blksnap/NAME. BACKING is an absolute path (a file or a
/// block device) or an NBD URI, without spaces. `size=` (bytes, or with K,
/// M, G, T) is the size the backing must have: one that changed size is not
/// routed. `live` routes a device-mapper device in place, mounted or not
/// (`blksnapctl attach --live`): BACKING is its path. `#` starts a comment
/// line. `blksnapctl attach --name NAME --persist` appends to devices.conf; `blksnapctl detach --forget` removes
/// the line again, wherever it is.
///
/// A file that breaks these rules is refused whole, with its name and line,
/// and blksnapd does not start: it never guesses what an operator meant.
public struct DeclaredDevices: Equatable, Sendable {
    public struct Device: Equatable, Sendable {
        public var name: String
        public var backing: String
        public var sizeBytes: UInt64?
        /// A device-mapper device routed in place (attach --live).
        public var live: Bool
        /// Where it is declared, for messages.
        public var file: String
        public var line: Int

        public init(name: String, backing: String, sizeBytes: UInt64? = nil, live: Bool = false, file: String = "", line: Int = 0) {
            (self.name, self.backing, self.sizeBytes, self.live, self.file, self.line) = (name, backing, sizeBytes, live, file, line)
        }
    }

    public var devices: [Device]

    /// The file `blksnapctl attach --persist` writes.
    public static let fileName = "devices.conf"

    public init(devices: [Device] = []) { self.devices = devices }

    public static func isValidName(_ name: String) -> Bool {
        guard (1...64).contains(name.utf8.count), name != ".", name != ".." else { return false }
        return name.utf8.allSatisfy { b in
            (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || b == 0x2E || b == 0x5F || b == 0x2D
        }
    }

    static func isURI(_ text: String) -> Bool {
        ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://", "nbd+vsock://"].contains(where: text.hasPrefix)
    }

    /// Every declaration in `directory`; none when it does not exist.
    public static func load(directory: String) throws(BlksnapError) -> DeclaredDevices {
        var all = DeclaredDevices()
        for file in try configFiles(directory) {
            for d in try parse(try readConfig(file), file: file) {
                if let other = all.devices.first(where: { $0.name == d.name }) {
                    throw BlksnapError(.invalidArgument, "\(file):\(d.line): the name \(d.name) is declared already at \(other.file):\(other.line)")
                }
                all.devices.append(d)
            }
        }
        return all
    }

    /// A configuration file, refused past 1 MiB rather than read in part.
    static func readConfig(_ file: String) throws(BlksnapError) -> String {
        let bytes = try DurableFile.read(file, atMost: (1 << 20) + 1)
        guard bytes.count <= 1 << 20 else { throw BlksnapError(.fileTooLarge, "\(file) is larger than 1 MiB; it is not a declaration file") }
        return String(decoding: bytes, as: UTF8.self)
    }

    static func configFiles(_ directory: String) throws(BlksnapError) -> [String] {
        let names: [String]
        do {
            names = try directoryEntries(directory)
        } catch where error.errno == .noSuchFileOrDirectory {
            return []
        } catch {
            throw BlksnapError(error.errno, "cannot read the configuration directory \(directory)")
        }
        return names.filter { $0.hasSuffix(".conf") && !$0.hasPrefix(".") }.sorted().map { directory + "/" + $0 }
    }

    /// The declarations of one file; the first broken line is an error
    /// naming `file` and the line.
    public static func parse(_ text: String, file: String) throws(BlksnapError) -> [Device] {
        var out: [Device] = []
        for (i, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = i + 1
            func bad(_ why: String) -> BlksnapError { BlksnapError(.invalidArgument, "\(file):\(line): \(why)") }
            let fields = raw.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\r" }).map(String.init)
            guard let first = fields.first, !first.hasPrefix("#") else { continue }
            guard fields.count >= 2 else { throw bad("expected NAME BACKING [size=BYTES] [live], found only \(first)") }
            guard isValidName(first) else {
                throw bad("\(first) is not a device name (letters, digits, '.', '_', '-'; at most 64)")
            }
            let backing = fields[1]
            guard backing.hasPrefix("/") || isURI(backing) else {
                throw bad("\(backing) is neither an absolute path nor an NBD URI")
            }
            var size: UInt64?
            var live = false
            for option in fields.dropFirst(2) {
                if option == "live", !live {
                    guard backing.hasPrefix("/") else { throw bad("live routes a device-mapper device: give its path, not \(backing)") }
                    live = true
                    continue
                }
                guard option.hasPrefix("size="), size == nil else {
                    throw bad("unknown or repeated option \(option) (only size=BYTES and live)")
                }
                guard let bytes = parseSize(String(option.dropFirst(5))) else { throw bad("\(option) is not a size (bytes, or with K, M, G, T)") }
                size = bytes
            }
            if let other = out.first(where: { $0.name == first }) {
                throw bad("the name \(first) is declared already at line \(other.line)")
            }
            out.append(Device(name: first, backing: backing, sizeBytes: size, live: live, file: file, line: line))
        }
        return out
    }

    /// 1048576, 512M, 10G: powers of 1024, as blksnapctl's --size.
    public static func parseSize(_ text: String) -> UInt64? { ByteCount(text)?.bytes }

    /// Appends a declaration to `directory`/devices.conf (made if missing),
    /// refused when the name is declared anywhere already.
    public static func declare(_ device: Device, in directory: String) throws(BlksnapError) {
        guard isValidName(device.name) else { throw BlksnapError(.invalidArgument, "\(device.name) is not a device name") }
        guard !device.backing.contains(where: { $0 == " " || $0 == "\t" || $0 == "\n" }) else {
            throw BlksnapError(.invalidArgument, "\(device.backing) has white space, which a declaration cannot hold")
        }
        let existing = try load(directory: directory)
        if let other = existing.devices.first(where: { $0.name == device.name }) {
            throw BlksnapError(.fileExists, "\(device.name) is declared already at \(other.file):\(other.line)")
        }
        mkdir(directory, 0o755)
        let path = directory + "/" + fileName
        var text = (try? readConfig(path)) ?? ""
        if text.isEmpty { text = "# blksnap-swift declared devices: NAME BACKING [size=BYTES] [live]; see blksnapd --help\n" }
        if !text.hasSuffix("\n") { text += "\n" }
        text += "\(device.name) \(device.backing)" + (device.sizeBytes.map { " size=\($0)" } ?? "") + (device.live ? " live" : "") + "\n"
        try DurableFile.replace(path, with: Array(text.utf8), mode: 0o644)
    }

    /// Removes the declaration of `name` from whichever file holds it;
    /// false when none does.
    @discardableResult
    public static func forget(_ name: String, in directory: String) throws(BlksnapError) -> Bool {
        for file in try configFiles(directory) {
            let text = try readConfig(file)
            let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
            let kept = lines.filter { line in
                line.split(whereSeparator: { $0 == " " || $0 == "\t" }).first.map(String.init) != name
            }
            guard kept.count != lines.count else { continue }
            try DurableFile.replace(file, with: Array(kept.joined(separator: "\n").utf8), mode: 0o644)
            return true
        }
        return false
    }
}
