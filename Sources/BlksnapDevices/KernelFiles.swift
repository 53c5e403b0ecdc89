import BlksnapEngine
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

// Small files the device makers and the data plane read: sysfs attributes,
// /sys/block, and the saved device list.

/// The whole of a small file.
public func readFile(_ path: String) throws(BlksnapError) -> [UInt8] {
    do {
        let fd = try FileDescriptor.open(path, .readOnly, options: [.closeOnExec])
        return try fd.closeAfter {
            var bytes: [UInt8] = []
            var buffer = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = try buffer.withUnsafeMutableBytes { try fd.read(into: $0) }
                if n == 0 { return bytes }
                bytes += buffer[..<n]
            }
        }
    } catch {
        throw BlksnapError(error as? Errno ?? .ioError, "cannot read \(path)")
    }
}

/// The first line of a kernel attribute file (sysfs), or nil.
public func readAttribute(_ path: String) -> String? {
    guard let bytes = try? readFile(path) else { return nil }
    return String(decoding: bytes.prefix { $0 != 0x0a }, as: UTF8.self)
}

/// The names in a directory, "." and ".." left out, in no order.
func directoryEntries(_ path: String) throws(BlksnapError) -> [String] {
    guard let dir = opendir(path) else { throw BlksnapError(Errno(rawValue: errno), "cannot read \(path)") }
    defer { closedir(dir) }
    var names: [String] = []
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        if name != "." && name != ".." { names.append(name) }
    }
    return names
}

/// The indices N of the kernel's block devices named `prefix`N (loop,
/// nbd), from /sys/block, in order.
public func blockDeviceIndices(named prefix: String) -> [Int] {
    let names = (try? directoryEntries("/sys/block")) ?? []
    return names.compactMap { $0.hasPrefix(prefix) ? Int($0.dropFirst(prefix.count)) : nil }.sorted()
}
