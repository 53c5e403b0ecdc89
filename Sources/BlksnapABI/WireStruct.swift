import CBlksnapABI

/// A Swift value for one C struct of `<blksnap/blk_snap.h>`.
///
/// The C type is the single source of its layout: values are read and
/// written through it, never through offsets typed twice.
public protocol WireStruct: Sendable {
    associatedtype CType
    init(c: CType)
    var c: CType { get }
}

extension WireStruct {
    /// `sizeof` the C struct: how many caller bytes the command moves.
    public static var size: Int { MemoryLayout<CType>.size }

    /// Reads the value from exactly `size` bytes of caller memory.
    public init(wire bytes: [UInt8]) {
        precondition(bytes.count == Self.size, "wire struct of the wrong size")
        // Through aligned scratch memory: caller bytes have no alignment.
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: Self.size, alignment: MemoryLayout<CType>.alignment)
        defer { scratch.deallocate() }
        bytes.withUnsafeBytes { scratch.copyMemory(from: $0.baseAddress!, byteCount: Self.size) }
        self.init(c: scratch.load(as: CType.self))
    }

    /// The caller bytes of the value.
    public var wire: [UInt8] {
        withUnsafeBytes(of: c) { Array($0) }
    }
}

@inline(__always) func address<T>(_ p: UnsafeMutablePointer<T>?) -> UInt64 {
    UInt64(UInt(bitPattern: p))
}

@inline(__always) func pointer<T>(_ a: UInt64) -> UnsafeMutablePointer<T>? {
    UnsafeMutablePointer(bitPattern: UInt(a))
}
