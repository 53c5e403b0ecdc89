/// libFuzzer's own entry, for an executable that has a `main` already.
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<CInt>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt
) -> CInt

/// Runs libFuzzer with this process's arguments over `callback`.
///
/// SwiftPM links a testable executable with `main` aliased to
/// `<module>_main`, so libFuzzer's own `main` is never pulled in; each
/// harness defines that symbol and lands here. (Built without
/// testability, libFuzzer's `main` would find `LLVMFuzzerTestOneInput`.)
public func runFuzzer(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?,
                      _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt {
    var count = argc
    var vector = argv
    return LLVMFuzzerRunDriver(&count, &vector, callback)
}
