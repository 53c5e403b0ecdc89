// swift-tools-version:6.0
import PackageDescription

// Modules depend one way: ABI -> control protocol -> engine -> device makers
// and protocols -> executables (README, Architecture); tools/check-imports
// keeps every import declared here.
let package = Package(
    name: "blksnap-swift",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "BlksnapEngine", targets: ["BlksnapEngine"]),
        // For the fuzz harnesses (fuzz/Package.swift), a package of their own,
        // with the tests' seeded generator.
        .library(name: "BlksnapParsers", targets: ["CBlksnapABI", "BlksnapABI", "BlksnapCUSE", "BlksnapNBD", "BlksnapControlServer", "BlksnapTestSupport"]),
        .executable(name: "blksnapd", targets: ["blksnapd"]),
        .executable(name: "blksnapctl", targets: ["blksnapctl"]),
        .executable(name: "blksnap-backup", targets: ["blksnap-backup"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    ],
    targets: [
        // The single copy of <blksnap/blk_snap.h> lives in include/ at the top;
        // this target reaches it through a symlink so C tools and Swift share it.
        .target(name: "CBlksnapABI"),
        .target(name: "CBlksnapLinux"),
        .target(name: "CBlksnapBackup"),
        .systemLibrary(name: "CFuse3", pkgConfig: "fuse3", providers: [.apt(["libfuse3-dev"])]),
        .systemLibrary(name: "CLibnbd", pkgConfig: "libnbd", providers: [.apt(["libnbd-dev"])]),
        .target(
            name: "BlksnapABI",
            dependencies: [
                "CBlksnapABI",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        // The control socket's vocabulary, shared by blksnapd and its clients
        // (blksnapctl links this, not the engine): frames, requests and
        // replies, the status picture, socket and address helpers.
        .target(
            name: "BlksnapControlProtocol",
            dependencies: [
                "BlksnapABI",
                "CBlksnapABI",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .target(
            name: "BlksnapEngine",
            dependencies: [
                "BlksnapABI",
                "BlksnapControlProtocol",
                "CBlksnapABI",
                "CBlksnapLinux",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        // What blksnapd writes itself on a FUSE or CUSE connection that a
        // blksnapd before it set up (INIT, FUSE_NOTIFY_RESEND).
        .target(name: "BlksnapFuseTakeOver"),
        // Frontends: each a way into the engine, holding no blksnap logic.
        .target(name: "BlksnapCUSE", dependencies: ["BlksnapEngine", "BlksnapFuseTakeOver", "CBlksnapABI", "CFuse3"]),
        .target(
            name: "BlksnapLibnbd",
            dependencies: ["BlksnapEngine", "CLibnbd", .product(name: "SystemPackage", package: "swift-system")]
        ),
        .target(
            name: "BlksnapDevices",
            dependencies: [
                "BlksnapABI", "BlksnapControlProtocol", "BlksnapEngine", "CBlksnapABI", "CBlksnapLinux",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .target(
            name: "BlksnapFUSE",
            dependencies: [
                "BlksnapABI", "BlksnapEngine", "BlksnapDevices", "BlksnapFuseTakeOver", "CFuse3", "CBlksnapLinux",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .target(
            name: "BlksnapControlServer",
            dependencies: [
                "BlksnapABI", "BlksnapControlProtocol", "BlksnapEngine", "CBlksnapABI", "CBlksnapLinux",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .target(
            name: "BlksnapNBD",
            dependencies: [
                "BlksnapEngine",
                "BlksnapABI",
                "BlksnapControlProtocol",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        // Device makers beside BlksnapFUSE: kernel NBD devices, served by
        // this process's NBD server over socketpairs.
        .target(
            name: "BlksnapKernelNBD",
            dependencies: [
                "BlksnapABI", "BlksnapDevices", "BlksnapEngine", "BlksnapNBD", "CBlksnapLinux",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        // What an operator's service needs: readiness for systemd, metrics.
        .target(
            name: "BlksnapService",
            dependencies: [
                "BlksnapControlProtocol",
                "BlksnapEngine",
                "CBlksnapLinux",
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .executableTarget(
            name: "blksnapd",
            dependencies: [
                "BlksnapABI",
                "BlksnapControlProtocol",
                "BlksnapEngine",
                "BlksnapCUSE",
                "BlksnapDevices",
                "BlksnapFUSE",
                "BlksnapKernelNBD",
                "BlksnapLibnbd",
                "BlksnapNBD",
                "BlksnapService",
                "BlksnapControlServer",
                "CBlksnapABI",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "blksnapctl",
            dependencies: [
                "BlksnapABI",
                "BlksnapControlProtocol",
                "CBlksnapABI",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // A client of the v1 interface only (never the engine): the same
        // program runs against blksnapd and against the kernel module.
        .target(
            name: "BlksnapBackup",
            dependencies: [
                "BlksnapABI",
                "CBlksnapABI",
                "CBlksnapBackup",
                "CLibnbd",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .executableTarget(
            name: "blksnap-backup",
            dependencies: [
                "BlksnapABI",
                "BlksnapBackup",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .executableTarget(
            name: "blksnap-nbd-serve",
            dependencies: [
                "BlksnapControlProtocol",
                "BlksnapNBD",
                "BlksnapEngine",
                "BlksnapABI",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "blksnap-bench-engine",
            dependencies: ["BlksnapABI", "BlksnapEngine", "BlksnapTestSupport", .product(name: "Logging", package: "swift-log")],
            path: "Sources/BenchEngine",
            // A straight-line script: top-level globals without actor ceremony.
            swiftSettings: [.swiftLanguageMode(.v5)]
        ),
        // Test support, never linked into blksnapd: a disk in memory, disks that
        // fail on purpose, the seeded generator.
        .target(
            name: "BlksnapTestSupport",
            dependencies: ["BlksnapABI", "BlksnapEngine", .product(name: "SystemPackage", package: "swift-system")]
        ),
        .testTarget(name: "BlksnapABITests", dependencies: ["BlksnapABI", "CBlksnapABI"]),
        .testTarget(name: "BlksnapControlProtocolTests", dependencies: ["BlksnapControlProtocol", "BlksnapABI", "CBlksnapABI"]),
        .testTarget(
            name: "BlksnapEngineTests",
            dependencies: [
                "BlksnapEngine", "BlksnapABI", "BlksnapTestSupport", "CBlksnapABI",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .testTarget(
            name: "BlksnapCUSETests",
            dependencies: [
                "BlksnapCUSE", "BlksnapEngine", "BlksnapABI", "BlksnapTestSupport", "CBlksnapABI",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "BlksnapDevicesTests",
            dependencies: [
                "BlksnapDevices", "BlksnapControlProtocol", "BlksnapEngine", "BlksnapABI", "CBlksnapABI",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(name: "BlksnapBackupTests", dependencies: ["BlksnapBackup"]),
        .testTarget(name: "BlksnapFUSETests", dependencies: ["BlksnapFUSE", "BlksnapEngine", "CBlksnapLinux", .product(name: "Logging", package: "swift-log")]),
        .testTarget(
            name: "BlksnapNBDTests",
            dependencies: [
                "BlksnapNBD", "BlksnapControlProtocol", "BlksnapEngine", "BlksnapABI", "BlksnapTestSupport",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .testTarget(
            name: "BlksnapKernelNBDTests",
            dependencies: [
                "BlksnapKernelNBD", "BlksnapNBD", "BlksnapDevices", "BlksnapEngine", "BlksnapABI",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .testTarget(
            name: "BlksnapServiceTests",
            dependencies: [
                "BlksnapService", "BlksnapControlProtocol", "BlksnapEngine", "BlksnapABI", "BlksnapTestSupport",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "BlksnapControlServerTests",
            dependencies: [
                "BlksnapControlServer", "BlksnapEngine", "BlksnapABI", "CBlksnapABI", "BlksnapTestSupport",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
    ]
)
