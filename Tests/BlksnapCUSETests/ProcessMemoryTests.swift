import Glibc
import Testing
@testable import BlksnapCUSE

// The real CallerAccess, on this very process: process_vm_readv/writev on
// one's own pid needs no privilege.

private let page = Int(sysconf(Int32(_SC_PAGESIZE)))
private let me = ProcessMemory(pid: getpid())

private func map(pages: Int, protection: Int32 = PROT_READ | PROT_WRITE) -> UnsafeMutableRawPointer {
    let p = mmap(nil, pages * page, protection, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
    precondition(p != MAP_FAILED)
    return p
}

private func region(_ p: UnsafeMutableRawPointer, _ count: Int, offset: Int = 0) -> CallerRegion {
    CallerRegion(address: UInt64(UInt(bitPattern: p)) + UInt64(offset), count: count)
}

@Test func readsAndWritesOwnMemory() {
    let p = map(pages: 1)
    defer { munmap(p, page) }
    p.storeBytes(of: 0x1122_3344_5566_7788 as UInt64, as: UInt64.self)
    #expect(me.canRead(region(p, 8)))
    #expect(me.canWrite(region(p, 8)))
    #expect(me.read(region(p, 8)) == [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11])
    #expect(me.write([1, 2, 3], at: region(p, 3).address))
    #expect(p.load(as: UInt8.self) == 1 && p.load(fromByteOffset: 2, as: UInt8.self) == 3)
}

@Test func unmappedMemoryCannotBeReadOrWritten() {
    let p = map(pages: 1)
    munmap(p, page)
    #expect(!me.canRead(region(p, 8)))
    #expect(!me.canWrite(region(p, 8)))
    #expect(me.read(region(p, 8)) == nil)
    #expect(!me.write([1], at: region(p, 1).address))
}

@Test func aRegionRunningIntoAnUnmappedPageCannotBeRead() {
    let p = map(pages: 3)
    defer { munmap(p, 3 * page) }
    munmap(p + 2 * page, page)
    #expect(me.canRead(region(p, 2 * page)))
    #expect(!me.canRead(region(p, 2 * page + 1)))
    #expect(!me.canRead(region(p, page + 16, offset: page + page / 2)))
}

@Test func readOnlyMemoryCanBeReadButNotWritten() {
    let p = map(pages: 2)
    defer { munmap(p, 2 * page) }
    mprotect(p + page, page, PROT_READ)
    #expect(me.canRead(region(p, 2 * page)))
    #expect(me.canWrite(region(p, page)))
    #expect(!me.canWrite(region(p, 2 * page)))
    #expect(!me.canWrite(region(p, 8, offset: page)))
}

@Test func aWrappingRegionIsRefused() {
    #expect(!me.canRead(CallerRegion(address: UInt64.max - 3, count: 8)))
    #expect(me.read(CallerRegion(address: UInt64.max - 3, count: 8)) == nil)
}

@Test func aCallerOutOfSightCannotBeToldSoChecksPass() {
    let nobody = ProcessMemory(pid: 0)
    #expect(nobody.canRead(CallerRegion(address: 0x1000, count: 8)))
    #expect(nobody.canWrite(CallerRegion(address: 0x1000, count: 8)))
    #expect(nobody.read(CallerRegion(address: 0x1000, count: 8)) == nil)
}
