// swift-tools-version: 6.1
import PackageDescription

let package = Package(
  name: "uffd-broker",
  platforms: [.macOS(.v15)],
  products: [
    .library(name: "Userfaultfd", targets: ["Userfaultfd"]),
    .library(name: "BrokerProtocol", targets: ["BrokerProtocol"]),
  ],
  dependencies: [
    .package(url: "https://github.com/apple/swift-system", from: "1.4.0"),
  ],
  targets: [
    // C shims: the only code that calls variadic syscalls, ioctls and CMSG macros.
    .target(name: "CUserfaultfd"),
    // The seed's UserfaultFD in Swift, with ordered dispatch and redelivery.
    .target(name: "Userfaultfd", dependencies: ["CUserfaultfd", .product(name: "SystemPackage", package: "swift-system")]),
    // libprotobuf-c (Debian libprotobuf-c-dev) and the code protoc-c generates from proto/.
    .systemLibrary(name: "CProtobufC", providers: [.apt(["libprotobuf-c-dev"])]),
    .target(name: "CBrokerWire", dependencies: ["CProtobufC"]),
    // Typed messages, framing and fd passing on SOCK_SEQPACKET.
    .target(name: "BrokerProtocol", dependencies: ["CBrokerWire", "CUserfaultfd", "Userfaultfd", .product(name: "SystemPackage", package: "swift-system")]),
    .executableTarget(name: "lazy-fill", dependencies: ["Userfaultfd"], path: "Examples/lazy-fill"),
    .testTarget(name: "UserfaultfdTests", dependencies: ["Userfaultfd"]),
  ],
  swiftLanguageModes: [.v6]
)
