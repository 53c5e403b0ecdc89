import BlksnapABI
import BlksnapEngine
import FoundationEssentials
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// The devices a data plane has made, kept in a file of the state
/// directory (devices.json) so that a blksnapd started after one that was
/// killed can find them: routed devices to serve again, images to undo
/// (their snapshots died with the engine's memory).
///
/// The file is rewritten whole on every change (write, fsync, rename), so
/// a kill at any moment leaves either the old list or the new one.
public struct SavedDevices: Codable, Equatable, Sendable {
    public struct Device: Codable, Equatable, Sendable {
        /// The maker's kind ("kernel NBD", "FUSE+loop"): a blksnapd making
        /// another kind leaves the device alone.
        public var kind: String
        public var name: String
        public var node: String
        public var major: UInt32
        public var minor: UInt32
        public var index: Int
        /// What the device serves, as the kernel knows it (nbd's backend
        /// identifier): a device showing another one is not ours.
        public var backend: String
        /// Routed devices: the backing as attach was given it, and its size
        /// then (a backing that changed size is not reconnected).
        public var backing: String?
        public var sizeBytes: UInt64?
        /// Images: the nodes made for them (/dev/blksnap-imageN, /dev/block link).
        public var nodes: [String]?
        /// A dm device live-routed through this one.
        public var live: Live?
        /// Routed devices: the name given with attach --name (its stable link).
        public var declaredName: String?
        /// Kernel NBD: the device's connections where more than one (a list
        /// written before there could be more has none: one).
        public var connections: Int?

        public init(kind: String, made: MadeDevice, backend: String, backing: String? = nil,
                    sizeBytes: UInt64? = nil, nodes: [String]? = nil) {
            (self.kind, self.name, self.node, self.index, self.backend) = (kind, made.name, made.node, made.index, backend)
            (self.major, self.minor) = (made.devId.major, made.devId.minor)
            (self.backing, self.sizeBytes, self.nodes) = (backing, sizeBytes, nodes)
            connections = made.connections == 1 ? nil : made.connections
        }

        /// `connections` is as the file says: the maker checks it.
        public var made: MadeDevice {
            MadeDevice(name: name, node: node, devId: DevId(major: major, minor: minor), index: index,
                       connections: connections ?? 1)
        }
    }

    /// A device-mapper device whose table was swapped to map onto a routed
    /// device: the engine routes it under its own number, and its own
    /// table is kept in a file beside the list, for detach and for a hand
    /// that must put it back without blksnapd.
    public struct Live: Codable, Equatable, Sendable {
        public var name: String
        public var major: UInt32
        public var minor: UInt32
        /// The file holding the device's own table (dmsetup's format).
        public var tableFile: String

        public init(name: String, devId: DevId, tableFile: String) {
            (self.name, self.major, self.minor, self.tableFile) = (name, devId.major, devId.minor, tableFile)
        }

        public var devId: DevId { DevId(major: major, minor: minor) }

        /// The dmsetup line that puts the device's own table back.
        public var restoreHint: String {
            "to put it back by hand: dmsetup suspend \(name) && dmsetup load \(name) \(tableFile) && dmsetup resume \(name)"
        }
    }

    public var routed: [Device] = []
    public var images: [Device] = []

    public init(routed: [Device] = [], images: [Device] = []) {
        (self.routed, self.images) = (routed, images)
    }

    public var isEmpty: Bool { routed.isEmpty && images.isEmpty }

    /// The list at `path`; empty when there is none. A file that cannot be
    /// read as a list is an error: devices may be waiting in it.
    public static func load(from path: String) throws(BlksnapError) -> SavedDevices {
        let bytes: [UInt8]
        do {
            bytes = try readFile(path)
        } catch where error.errno == .noSuchFileOrDirectory {
            return SavedDevices()
        }
        let list: SavedDevices
        do {
            list = try JSONDecoder().decode(SavedDevices.self, from: Data(bytes))
        } catch {
            throw BlksnapError(.invalidArgument, "\(path) is not a device list (\(error)); move it away to start afresh")
        }
        // The makers hand a device's number to the kernel as a u32; a
        // number the kernel could never have given is a damaged list, not
        // a device to find.
        for device in list.routed + list.images where !(0...Int(UInt32.max)).contains(device.index) {
            throw BlksnapError(.invalidArgument,
                               "\(path): \(device.node) has device number \(device.index), which no device can have; move the list away to start afresh")
        }
        return list
    }

    /// Replaces the list at `path`; an empty list removes the file.
    public func store(to path: String) throws(BlksnapError) {
        if isEmpty {
            guard unlink(path) == 0 || errno == ENOENT else { throw BlksnapError(Errno(rawValue: errno), "cannot remove \(path)") }
            return
        }
        let bytes: [UInt8]
        do {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
            bytes = Array(try encoder.encode(self))
        } catch {
            throw BlksnapError(.invalidArgument, "cannot encode the device list: \(error)")
        }
        let temporary = path + ".new"
        do {
            let fd = try FileDescriptor.open(temporary, .writeOnly, options: [.create, .truncate, .closeOnExec],
                                             permissions: [.ownerReadWrite])
            try fd.closeAfter {
                _ = try fd.writeAll(bytes)
                fsync(fd.rawValue)
            }
        } catch {
            throw BlksnapError(error as? Errno ?? .ioError, "cannot write \(temporary)")
        }
        guard rename(temporary, path) == 0 else { throw BlksnapError(Errno(rawValue: errno), "cannot replace \(path)") }
    }
}
