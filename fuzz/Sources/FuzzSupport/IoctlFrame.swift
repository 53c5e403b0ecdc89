import BlksnapABI
import CBlksnapABI

/// One IOCTL request in the control socket's frame format
/// (`blksnap_control.h`): header, then regions of the caller's memory.
/// The dispatcher and CUSE harnesses read their calls in this format too, so
/// the frames recorded from the preload shim seed all three.
public struct IoctlFrame {
    public struct Region {
        public var address: UInt64
        public var flow: UInt32
        public var length: Int
        public var bytes: [UInt8]   // empty unless flow has IN

        public var carries: Bool { flow & BLKSNAP_ABI_IN.rawValue != 0 }
        public var takesBack: Bool { flow & BLKSNAP_ABI_OUT.rawValue != 0 }

        /// Memory cannot wrap the address space, so neither can a region.
        public func contains(_ address: UInt64, _ count: Int) -> Bool {
            !self.address.addingReportingOverflow(UInt64(length)).overflow && address >= self.address && address - self.address <= UInt64(length)
                && UInt64(count) <= UInt64(length) - (address - self.address)
        }
    }

    public static let headerSize = 32
    public static let regionHeaderSize = 16
    /// Regions longer than this are cut: a harness input is small anyway,
    /// and the socket harness checks the real limits.
    public static let maxRegionLength = 64 << 10

    public var magic: UInt32
    public var type: UInt32
    public var command: UInt32
    public var argument: UInt64
    /// The header's reserved word: the harnesses take it as how memory
    /// outside the regions behaves (see `FuzzMemory.Policy`).
    public var reserved: UInt32
    public var regions: [Region]

    /// Reads one frame leniently (magic and type are not checked, at most
    /// 8 regions, bytes the input lacks read as zero); nil when not even a
    /// header is left.
    public static func read(_ input: inout FuzzInput) -> IoctlFrame? {
        guard input.remaining >= headerSize else { return nil }
        let magic = input.u32(), type = input.u32(), command = input.u32(), count = input.u32()
        let argument = input.u64()
        _ = input.u32()
        let reserved = input.u32()
        var regions: [Region] = []
        for _ in 0..<min(count, 8) {
            let address = input.u64()
            let length = min(Int(input.u32()), maxRegionLength)
            let flow = input.u32()
            var bytes: [UInt8] = []
            if flow & BLKSNAP_ABI_IN.rawValue != 0 {
                bytes = input.take(length)
                bytes += [UInt8](repeating: 0, count: length - bytes.count)
            }
            regions.append(Region(address: address, flow: flow, length: length, bytes: bytes))
        }
        return IoctlFrame(magic: magic, type: type, command: command, argument: argument,
                          reserved: reserved, regions: regions)
    }

    /// The bytes of this frame as the shim sends it.
    public var encoded: [UInt8] {
        var out: [UInt8] = []
        func le<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { out += $0 } }
        le(magic); le(type); le(command); le(UInt32(regions.count)); le(argument); le(UInt32(0)); le(reserved)
        for r in regions {
            le(r.address); le(UInt32(r.length)); le(r.flow)
            if r.carries { out += r.bytes }
        }
        return out
    }

    /// Takes the harm out of two commands that are right to do what they
    /// do, but not in a fuzzer: WAIT_EVENT sleeps for the caller's timeout
    /// (made 0 here), and SETLOG creates the file the caller names (made
    /// NULL here: logging off; the dispatcher harness reads paths itself).
    public mutating func defuse() {
        guard let command = IoctlCommand(number: command) else { return }
        switch command {
        case .snapshotWaitEvent:
            patch(at: 16, size: Int(command.layout.arg_size), with: [0, 0, 0, 0])
        case .setlog:
            let layout = command.layout
            patch(at: Int(layout.ptr_offset), size: Int(layout.arg_size), with: [UInt8](repeating: 0, count: 8))
        default:
            break
        }
    }

    /// Overwrites the struct's bytes at `offset` in every region that
    /// holds the whole struct, whichever of them the server reads it from.
    private mutating func patch(at offset: Int, size: Int, with bytes: [UInt8]) {
        for i in regions.indices where regions[i].carries && regions[i].contains(argument, size) {
            let start = Int(argument - regions[i].address) + offset
            regions[i].bytes.replaceSubrange(start..<(start + bytes.count), with: bytes)
        }
    }
}
