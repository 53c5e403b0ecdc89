import BlksnapDevices
import BlksnapEngine
import FoundationEssentials
import Testing

/// Numbers that reach attach from the control socket.
@Suite struct AttachTests {
    /// `blksnapctl attach FILE --size 18446744073709551615` once trapped in
    /// the off_t conversion and took every routed device down with blksnapd.
    @Test(arguments: [UInt64.max, UInt64(Int64.max) + 1])
    func aSizeNoFileCanHaveIsERANGE(size: UInt64) throws {
        let scratch = Scratch()
        let (dataPlane, engine) = plane(FakeMaker(), scratch)
        try dataPlane.start(engine: engine)
        let backing = scratch.file("big.img", size: 0)
        #expect {
            try dataPlane.attach(backing: backing, size: size)
        } throws: { ($0 as? BlksnapError)?.errno == .outOfRange }
        #expect(engine.routedDevices.isEmpty)
        #expect(try FileManager.default.attributesOfItem(atPath: backing)[.size] as? Int == 0)
    }
}
