import BlksnapEngine

/// The data of the final reply: the kernel copies it over the output
/// iovecs in order, as far as it goes. So each declared region carries the
/// caller's own bytes wherever the dispatcher wrote nothing (every output
/// region was fetched as input too), and the data stops after the last
/// byte written, leaving the rest of the caller's buffers untouched.
struct OutputLayout {
    let regions: [CallerRegion]

    func data(writes: [CallerWrite], originals memory: FetchedMemory) -> [UInt8] {
        var data: [UInt8] = []
        var laid: [(region: CallerRegion, base: Int)] = []
        // A region whose bytes were never fetched cannot be sent back
        // unchanged, so the data ends before it.
        for region in regions {
            guard let original = memory.original(region) else { break }
            laid.append((region, data.count))
            data += original
        }
        var end = 0
        for write in writes {
            let span = CallerRegion(address: write.address, count: write.bytes.count)
            for (region, base) in laid {
                guard let (here, there) = region.overlap(span) else { continue }
                data.replaceSubrange((base + here.lowerBound)..<(base + here.upperBound), with: write.bytes[there])
                end = max(end, base + here.upperBound)
            }
        }
        return Array(data.prefix(end))
    }
}
