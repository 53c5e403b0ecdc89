/// A broken promise of the protocol under test: libFuzzer sees the trap as
/// a crash and saves the input, like any other crash.
public func promise(_ condition: @autoclosure () -> Bool, _ message: @autoclosure () -> String,
                    file: StaticString = #fileID, line: UInt = #line) {
    if !condition() { fatalError("broken promise: \(message())", file: file, line: line) }
}
