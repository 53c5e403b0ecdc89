import BlksnapEngine

/// The caller's memory as the dispatcher sees it over CUSE: exactly the
/// regions the kernel fetched, writable exactly where output iovecs were
/// declared, plus at most one array reached directly because it is too
/// large for one CUSE transfer. Anything else reads as a failed copy, so
/// the dispatcher answers the module's errno for it.
struct FetchedMemory: CallerMemory {
    /// An array outside the retry protocol, read and written through the
    /// caller's address space.
    struct Direct {
        let region: CallerRegion
        let writable: Bool
        let access: any CallerAccess
    }

    let fetched: [(region: CallerRegion, bytes: [UInt8])]
    let outputs: [CallerRegion]
    let direct: Direct?

    init(fetched: [(region: CallerRegion, bytes: [UInt8])] = [], outputs: [CallerRegion] = [], direct: Direct? = nil) {
        self.fetched = fetched
        self.outputs = outputs
        self.direct = direct
    }

    func read(at address: UInt64, count: Int) -> [UInt8]? {
        let wanted = CallerRegion(address: address, count: count)
        for (region, bytes) in fetched where region.contains(wanted) {
            let start = Int(address - region.address)
            return Array(bytes[start..<(start + count)])
        }
        if let direct, direct.region.contains(wanted) { return direct.access.read(wanted) }
        return nil
    }

    func canWrite(at address: UInt64, count: Int) -> Bool {
        let wanted = CallerRegion(address: address, count: count)
        if outputs.contains(where: { $0.contains(wanted) }) { return true }
        if let direct, direct.writable { return direct.region.contains(wanted) }
        return false
    }

    /// What the caller held in a fetched region before the call.
    func original(_ region: CallerRegion) -> [UInt8]? {
        read(at: region.address, count: region.count)
    }
}
