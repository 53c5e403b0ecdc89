import BlksnapABI
import BlksnapEngine
import CBlksnapLinux
import Logging
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// What TAKE does before it switches, as the module does with freeze_bdev:
/// freeze every filesystem mounted on the snapshot's devices (so it writes
/// out what it holds and stops writing), then flush each device so every
/// write the kernel has acknowledged has reached the engine.
public enum Quiesce {
    /// Mount points whose device is `devId`, from /proc/self/mountinfo.
    public static func mountpoints(of devId: DevId) -> [String] {
        guard let fp = fopen("/proc/self/mountinfo", "r") else { return [] }
        defer { fclose(fp) }
        var found: [String] = []
        var line: UnsafeMutablePointer<CChar>?
        var capacity = 0
        while getline(&line, &capacity, fp) > 0 {
            let fields = String(cString: line!).split(separator: " ")
            guard fields.count > 4, fields[2] == "\(devId.major):\(devId.minor)" else { continue }
            found.append(unescape(String(fields[4])))
        }
        free(line)
        return found
    }

    /// mountinfo writes space, tab, newline and backslash as octal escapes.
    static func unescape(_ s: String) -> String {
        var out: [UInt8] = []
        let bytes = Array(s.utf8)
        var i = 0
        while i < bytes.count {
            if bytes[i] == UInt8(ascii: "\\"), i + 3 < bytes.count,
               let v = UInt8(String(decoding: bytes[(i + 1)...(i + 3)], as: UTF8.self), radix: 8) {
                out.append(v)
                i += 4
            } else {
                out.append(bytes[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// Freezes and flushes; returns what thaws. A filesystem that cannot be
    /// frozen (not mounted any more, or no freeze support) is flushed only.
    public static func freeze(devices: [(devId: DevId, node: String)], logger: Logger) -> @Sendable () -> Void {
        var frozen: [(Int32, String)] = []
        for device in devices {
            for mountpoint in mountpoints(of: device.devId) {
                let fd = open(mountpoint, O_RDONLY | O_CLOEXEC | O_DIRECTORY)
                guard fd >= 0 else { continue }
                if ioctl(fd, blksnap_ioctl_fifreeze, CInt(0)) == 0 {
                    frozen.append((fd, mountpoint))
                    logger.debug("blksnap-snapshot: froze \(mountpoint)")
                } else {
                    logger.warning("blksnap-snapshot: cannot freeze \(mountpoint) (\(Errno(rawValue: errno))); syncing it instead")
                    blksnap_syncfs(fd)
                    close(fd)
                }
            }
            let fd = open(device.node, O_RDONLY | O_CLOEXEC)
            if fd >= 0 {
                fsync(fd)
                close(fd)
            }
        }
        let toThaw = frozen
        return {
            for (fd, _) in toThaw {
                _ = ioctl(fd, blksnap_ioctl_fithaw, CInt(0))
                close(fd)
            }
        }
    }
}
