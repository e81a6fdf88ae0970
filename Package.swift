// swift-tools-version: 6.1
import PackageDescription

/// The broker's fault path in release builds: no dynamic exclusivity checks
/// (single-threaded by design; debug builds, the tests and the simulation keep
/// them). `uffd-bench` measured the checks at a third of the broker's
/// user-space time per fault (see README, Benchmark).
let hotPath: [SwiftSetting] = [.unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release))]

let package = Package(
  name: "uffd-broker",
  platforms: [.macOS(.v15)],
  products: [
    .library(name: "Userfaultfd", targets: ["Userfaultfd"]),
    .library(name: "BrokerProtocol", targets: ["BrokerProtocol"]),
    .library(name: "ClientSDK", targets: ["ClientSDK"]),
    .library(name: "PluginSDK", targets: ["PluginSDK"]),
    .executable(name: "uffd-broker", targets: ["uffd-broker"]),
  ],
  dependencies: [
    .package(url: "https://github.com/apple/swift-system", from: "1.4.0"),
    .package(url: "https://github.com/apple/swift-log", from: "1.16.0"),
    .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
    // `swift package generate-documentation` (scripts/check-docs.sh); a plugin only, linked into nothing.
    .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"),
    .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
    .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    // The /metrics endpoint's server; its default traits (swift-configuration, full Foundation) are not needed.
    .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1", traits: []),
    .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.0.0"),
  ],
  targets: [
    // The userfaultfd C that Swift cannot reach: creation, the UFFDIO ioctls, uffd_msg flattened.
    .target(name: "CUserfaultfd"),
    // The rest of the Linux C that Swift cannot reach: SCM_RIGHTS, SO_PEERCRED, pidfd, memfd, spawn, epoll, signalfd.
    .target(name: "CLinux"),
    // Helpers every module shares (errno results, close, clock, page size, threads): `package`, so no product exports them.
    .target(name: "LinuxSupport", dependencies: [.product(name: "SystemPackage", package: "swift-system")]),
    // The seed's UserfaultFD in Swift, with ordered dispatch and redelivery.
    .target(name: "Userfaultfd", dependencies: ["CUserfaultfd", "CLinux", "LinuxSupport", .product(name: "SystemPackage", package: "swift-system")]),
    // libprotobuf-c (Debian libprotobuf-c-dev) and the code protoc-c generates from proto/.
    .systemLibrary(name: "CProtobufC", providers: [.apt(["libprotobuf-c-dev"])]),
    .target(name: "CBrokerWire", dependencies: ["CProtobufC"]),
    // Typed messages, framing and fd passing on SOCK_SEQPACKET.
    .target(name: "BrokerProtocol", dependencies: ["CBrokerWire", "CLinux", "LinuxSupport", "Userfaultfd", .product(name: "SystemPackage", package: "swift-system")]),
    // Spawning and explicit teardown of child processes (supervisor, demo, benchmark, tests).
    .target(name: "ChildProcess", dependencies: ["CLinux", "LinuxSupport"]),
    // The broker's logic without I/O: a state machine from inputs to actions (sans-I/O).
    .target(name: "BrokerCore", dependencies: ["BrokerProtocol", "Userfaultfd", .product(name: "Logging", package: "swift-log"), .product(name: "SystemPackage", package: "swift-system"),
                                               .product(name: "Histogram", package: "hdrhistogram-swift")],
            swiftSettings: hotPath),
    // libsystemd (Debian libsystemd-dev): readiness, status and watchdog notifications to the service manager.
    .systemLibrary(name: "CSystemd", pkgConfig: "libsystemd", providers: [.apt(["libsystemd-dev"])]),
    // The broker's I/O: the epoll loop, sockets, uffd reads and ioctls, supervision; it performs the core's actions.
    .target(name: "BrokerRuntime", dependencies: ["BrokerCore", "BrokerProtocol", "ChildProcess", "CUserfaultfd", "CLinux", "CSystemd", "LinuxSupport", "Userfaultfd", .product(name: "Logging", package: "swift-log"), .product(name: "SystemPackage", package: "swift-system")],
            swiftSettings: hotPath),
    // Live metrics: the loop's status snapshots as swift-metrics counters and gauges in a Prometheus
    // registry, served on /metrics (Hummingbird, on threads of its own) and written as a node_exporter textfile.
    .target(name: "BrokerMetrics", dependencies: ["BrokerCore", "BrokerRuntime", "BrokerProtocol", .product(name: "Logging", package: "swift-log"),
                                                  .product(name: "CoreMetrics", package: "swift-metrics"), .product(name: "Prometheus", package: "swift-prometheus"),
                                                  .product(name: "Hummingbird", package: "hummingbird"), .product(name: "ServiceLifecycle", package: "swift-service-lifecycle")]),
    // The engine driven by a seeded schedule against models of the kernel, clients and plugins.
    .target(name: "BrokerSimulator", dependencies: ["BrokerCore", "BrokerProtocol", "Userfaultfd"]),
    .executableTarget(name: "uffd-sim", dependencies: ["BrokerSimulator"]),
    // For processes whose memory is brokered.
    .target(name: "ClientSDK", dependencies: ["BrokerProtocol", "CLinux", "CUserfaultfd", "LinuxSupport", "Userfaultfd", .product(name: "SystemPackage", package: "swift-system")]),
    // For plugins: a handler protocol and the run loop around it.
    .target(name: "PluginSDK", dependencies: ["BrokerProtocol", "CLinux", "LinuxSupport", "Userfaultfd"]),
    .executableTarget(name: "uffd-broker", dependencies: ["BrokerCore", "BrokerRuntime", "BrokerMetrics", .product(name: "ArgumentParser", package: "swift-argument-parser"), .product(name: "Logging", package: "swift-log")]),
    // Counts malloc calls (linked into the benchmark only) to prove the fault path allocates nothing.
    .target(name: "CMallocCounter"),
    .executableTarget(name: "uffd-bench", dependencies: ["BrokerCore", "BrokerRuntime", "ChildProcess", "BrokerProtocol", "ClientSDK", "PluginSDK", "Userfaultfd", "CLinux", "LinuxSupport", "CMallocCounter", .product(name: "Logging", package: "swift-log"),
                                                .product(name: "ArgumentParser", package: "swift-argument-parser")]),
    // Sample plugins.
    .executableTarget(name: "zero-fill-plugin", dependencies: ["PluginSDK", "BrokerProtocol", .product(name: "ArgumentParser", package: "swift-argument-parser")], path: "Examples/zero-fill-plugin"),
    .executableTarget(name: "snapshot-plugin", dependencies: ["PluginSDK", "BrokerProtocol", .product(name: "ArgumentParser", package: "swift-argument-parser")], path: "Examples/snapshot-plugin"),
    .systemLibrary(name: "CZlib", providers: [.apt(["zlib1g-dev"])]),
    .executableTarget(name: "swap-plugin", dependencies: ["PluginSDK", "BrokerProtocol", "CLinux", "CZlib", .product(name: "ArgumentParser", package: "swift-argument-parser")], path: "Examples/swap-plugin"),
    // The demo: the README's first command.
    .executableTarget(name: "uffd-demo", dependencies: ["ClientSDK", "BrokerProtocol", "ChildProcess", "CLinux", "LinuxSupport", .product(name: "ArgumentParser", package: "swift-argument-parser")], path: "Examples/uffd-demo"),
    .executableTarget(name: "lazy-fill", dependencies: ["Userfaultfd", "LinuxSupport"], path: "Examples/lazy-fill"),
    .testTarget(name: "UserfaultfdTests", dependencies: ["Userfaultfd", "CUserfaultfd", "CLinux", "LinuxSupport"]),
    .testTarget(name: "BrokerProtocolTests", dependencies: ["BrokerProtocol", "CBrokerWire", "Userfaultfd"]),
    .testTarget(name: "BrokerCoreTests", dependencies: ["BrokerCore", "BrokerProtocol"]),
    .testTarget(name: "BrokerRuntimeTests", dependencies: ["BrokerRuntime"]),
    .testTarget(name: "BrokerSimulationTests", dependencies: ["BrokerSimulator"], exclude: ["regressions.txt"]),
    // Real broker, plugin and client processes against real userfaultfds.
    .testTarget(name: "BrokerIntegrationTests", dependencies: ["BrokerProtocol", "BrokerCore", "ChildProcess", "ClientSDK", "Userfaultfd", "CUserfaultfd", "CLinux", "broker-fixture", "conformance-plugin", "uffd-broker", "snapshot-plugin", "swap-plugin", "zero-fill-plugin"]),
    // libFuzzer target over the protocol decoders (built by scripts/fuzz.sh with -sanitize=fuzzer).
    .executableTarget(name: "uffd-fuzz", dependencies: ["BrokerProtocol"], path: "Tests/Fuzz/uffd-fuzz", swiftSettings: [.unsafeFlags(["-parse-as-library"])]),
    // The plugin and client processes of the integration tests.
    .executableTarget(name: "broker-fixture", dependencies: ["ClientSDK", "PluginSDK", "BrokerProtocol", "Userfaultfd", "CLinux", "LinuxSupport", "CKVM"], path: "Tests/Fixtures/broker-fixture"),
    // The conformance suite's plugin on the Swift SDK (its C and Python twins sit beside it).
    .executableTarget(name: "conformance-plugin", dependencies: ["PluginSDK", "BrokerProtocol"], path: "Tests/Fixtures/conformance-plugins/swift"),
    // The KVM ioctls of the fixture's VMM (a real guest restored through the broker).
    .target(name: "CKVM", path: "Tests/Fixtures/CKVM"),
  ],
  swiftLanguageModes: [.v6]
)
