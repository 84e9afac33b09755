// swift-tools-version:6.2
import PackageDescription

let package = Package(
    name: "armoryd",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "ArmoryTrack", targets: ["ArmoryTrack"]),
        .library(name: "ArmoryProtocol", targets: ["ArmoryProtocol"]),
        .executable(name: "armoryd", targets: ["armoryd"]),
        .executable(name: "armoryctl", targets: ["armoryctl"]),
        .executable(name: "armory-example", targets: ["armory-example"]),
        .executable(name: "armory-bench", targets: ["armory-bench"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-collections.git", from: "1.6.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/async-http-client.git", from: "1.37.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-configuration.git", from: "1.4.0", traits: [.defaults, "YAML"]),
        .package(url: "https://github.com/jpsim/Yams.git", from: "6.0.0"),
        .package(url: "https://github.com/apple/swift-system.git", from: "1.5.0"),
    ],
    targets: [
        // Frames, messages, limits, key validation: no networking.
        .target(
            name: "ArmoryProtocol",
            dependencies: [.product(name: "OrderedCollections", package: "swift-collections")]
        ),
        // MLflow: the local file-store writer and the REST client (auth, TLS, typed errors).
        .target(
            name: "MLflow",
            dependencies: [
                "ArmoryProtocol",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ]
        ),
        // libsystemd (sd-daemon, sd-journal), for the Systemd module only.
        .systemLibrary(
            name: "CSystemd",
            pkgConfig: "libsystemd",
            providers: [.apt(["libsystemd-dev"])]
        ),
        // systemd integration: notify protocol, socket activation, journald logging.
        .target(
            name: "Systemd",
            dependencies: ["CSystemd", .product(name: "Logging", package: "swift-log")]
        ),
        // Sessions, tracking contexts, runs, uploader, socket server.
        .target(
            name: "ArmoryDaemon",
            dependencies: [
                "ArmoryProtocol",
                "MLflow",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "HeapModule", package: "swift-collections"),
                .product(name: "OrderedCollections", package: "swift-collections"),
            ]
        ),
        // The Swift client library.
        .target(
            name: "ArmoryTrack",
            dependencies: ["ArmoryProtocol"]
        ),
        // What the Swift test targets share: a session harness (the state machine without a
        // socket), a real daemon in the test process, and a raw socket client.
        .target(
            name: "ArmoryDaemonTesting",
            dependencies: [
                "ArmoryDaemon", "ArmoryProtocol", .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .executableTarget(
            name: "armoryd",
            dependencies: [
                "ArmoryDaemon",
                "MLflow",
                "Systemd",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Configuration", package: "swift-configuration"),
                .product(name: "Yams", package: "Yams"),
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .executableTarget(
            name: "armoryctl",
            dependencies: [
                "ArmoryTrack",
                "MLflow",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .executableTarget(
            name: "armory-example",
            dependencies: ["ArmoryTrack"]
        ),
        .executableTarget(
            name: "armory-bench",
            dependencies: [
                "ArmoryTrack",
                "MLflow",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "Benchmarks/armory-bench"
        ),
        .testTarget(
            name: "SystemdTests",
            dependencies: ["Systemd", .product(name: "Logging", package: "swift-log")]
        ),
        .testTarget(name: "ArmoryProtocolTests", dependencies: ["ArmoryProtocol"]),
        .testTarget(name: "MLflowTests", dependencies: ["MLflow", "ArmoryProtocol"]),
        .testTarget(
            name: "ArmoryDaemonTests",
            dependencies: [
                "ArmoryDaemon", "ArmoryDaemonTesting", .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOEmbedded", package: "swift-nio"),
            ],
            exclude: ["Fixtures"]
        ),
        .testTarget(
            name: "IntegrationTests",
            dependencies: ["ArmoryTrack", "ArmoryDaemon", "ArmoryDaemonTesting", "ArmoryProtocol"]
        ),
    ],
    swiftLanguageModes: [.v6]
)

// libFuzzer targets, built only for `make fuzz` (ARMORY_FUZZ=1 swift build --sanitize=fuzzer):
// they have no `main` of their own, libFuzzer provides it.
if Context.environment["ARMORY_FUZZ"] == "1" {
    let fuzzFlags: [SwiftSetting] = [.unsafeFlags(["-parse-as-library"])]
    package.targets += [
        .executableTarget(
            name: "fuzz-frames",
            dependencies: ["ArmoryDaemon", "ArmoryProtocol", .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOEmbedded", package: "swift-nio")],
            path: "Fuzz/fuzz-frames", swiftSettings: fuzzFlags),
        .executableTarget(name: "fuzz-messages", dependencies: ["ArmoryProtocol"], path: "Fuzz/fuzz-messages", swiftSettings: fuzzFlags),
        .executableTarget(name: "fuzz-journal", dependencies: ["ArmoryDaemon"], path: "Fuzz/fuzz-journal", swiftSettings: fuzzFlags),
    ]
}

// The project's own targets build without warnings: any warning fails the build.
for target in package.targets where target.type != .system {
    target.swiftSettings = (target.swiftSettings ?? []) + [.treatAllWarnings(as: .error)]
}
