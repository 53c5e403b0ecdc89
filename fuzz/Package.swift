// swift-tools-version:6.0
import PackageDescription

// The fuzz harnesses, one executable per parser of untrusted input, kept out
// of the main package so its build and `swift test` never see libFuzzer.
// tools/fuzz builds this with -sanitize=fuzzer,address into .build-fuzz.
let package = Package(
    name: "blksnap-fuzz",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(path: "blksnap-swift"),  // a symlink to ..: the name is the identity
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
    ],
    targets: [
        .target(
            name: "FuzzSupport",
            dependencies: [
                .product(name: "BlksnapEngine", package: "blksnap-swift"),
                .product(name: "BlksnapParsers", package: "blksnap-swift"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(name: "fuzz-dispatch", dependencies: harness),
        .executableTarget(name: "fuzz-cuse", dependencies: harness),
        .executableTarget(name: "fuzz-control-socket", dependencies: harness),
        .executableTarget(name: "fuzz-nbd-handshake", dependencies: harness),
        .executableTarget(name: "fuzz-nbd-transmission", dependencies: harness),
    ]
)

var harness: [Target.Dependency] {
    [
        "FuzzSupport",
        .product(name: "BlksnapEngine", package: "blksnap-swift"),
        .product(name: "BlksnapParsers", package: "blksnap-swift"),
        .product(name: "Logging", package: "swift-log"),
    ]
}
