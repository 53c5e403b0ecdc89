import CBlksnapABI

/// One command's caller memory as the shared table describes it (the C
/// `blksnap_abi_command` row), for one call: where its struct lies and,
/// once the struct is known, where its array lies. The real data flow is
/// the table's, never the direction bits of the request number.
struct CommandLayout {
    let number: UInt32
    let argument: UInt64
    private let row: blksnap_abi_command

    /// The row for an exact request number; nil means ENOTTY.
    init?(number: UInt32, argument: UInt64) {
        guard let row = blksnap_abi_find(UInt(number)) else { return nil }
        self.number = number
        self.argument = argument
        self.row = row.pointee
    }

    /// The struct at the ioctl argument.
    var argumentRegion: CallerRegion { CallerRegion(address: argument, count: Int(row.arg_size)) }
    var argumentIsOutput: Bool { row.arg_flow & BLKSNAP_ABI_OUT.rawValue != 0 }
    var arrayIsOutput: Bool { row.ptr_flow & BLKSNAP_ABI_OUT.rawValue != 0 }

    /// The array that the struct's pointer field designates: nil when the
    /// command has none, the pointer is NULL, or it holds no bytes. Its
    /// count may be absurd; callers weigh it before touching it.
    func array(in argumentBytes: [UInt8]) -> CallerRegion? {
        guard row.ptr_offset >= 0, argumentBytes.count >= Int(row.arg_size) else { return nil }
        let pointer = Self.little(argumentBytes, at: Int(row.ptr_offset), width: 8)
        let count = Self.little(argumentBytes, at: Int(row.count_offset), width: 4)
        let bytes = count * UInt64(row.elem_size)
        guard pointer != 0, bytes > 0 else { return nil }
        return CallerRegion(address: pointer, count: Int(bytes))
    }

    private static func little(_ bytes: [UInt8], at offset: Int, width: Int) -> UInt64 {
        (0..<width).reduce(0) { $0 | UInt64(bytes[offset + $1]) << (8 * UInt64($1)) }
    }
}
