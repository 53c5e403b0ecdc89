import BlksnapEngine
import CBlksnapABI

/// The caller's memory as the preload shim shipped it: the regions it
/// could read (with their bytes) and those it can take back (OUT). Nothing
/// else of the caller exists for the dispatcher, so an address the shim
/// could not read fails the way a failed copy_from_user does.
struct ShippedMemory: CallerMemory {
    struct Region {
        let address: UInt64
        let flow: UInt32
        let length: Int
        let bytes: [UInt8]   // empty unless flow has IN

        func contains(_ address: UInt64, _ count: Int) -> Bool {
            address >= self.address && address - self.address <= UInt64(length)
                && UInt64(count) <= UInt64(length) - (address - self.address)
        }
    }

    var regions: [Region]

    func read(at address: UInt64, count: Int) -> [UInt8]? {
        for r in regions where r.flow & BLKSNAP_ABI_IN.rawValue != 0 && r.contains(address, count) {
            let start = Int(address - r.address)
            return Array(r.bytes[start..<(start + count)])
        }
        return nil
    }

    func canWrite(at address: UInt64, count: Int) -> Bool {
        regions.contains { $0.flow & BLKSNAP_ABI_OUT.rawValue != 0 && $0.contains(address, count) }
    }
}
