// swift-tools-version:5.9
// The Acclimate Swift package: the generated UniFFI bindings (Sources/Acclimate/acclimate.swift),
// the CVPixelBuffer helpers, and the Rust library as an XCFramework (ios/build-xcframework.sh
// builds AcclimateFFI.xcframework: static libraries for iOS devices, the iOS simulator on Apple
// silicon and macOS on Apple silicon, with the FFI header and module map).
import PackageDescription

let package = Package(
    name: "Acclimate",
    // iOS 15: see README "iOS" (every iPhone from the 6s on; build-xcframework.sh builds the
    // static library for the same deployment target).
    platforms: [.iOS(.v15), .macOS(.v12)],
    products: [
        .library(name: "Acclimate", targets: ["Acclimate"]),
    ],
    targets: [
        .binaryTarget(name: "acclimateFFI", path: "AcclimateFFI.xcframework"),
        .target(
            name: "Acclimate",
            dependencies: ["acclimateFFI"],
            path: "Sources/Acclimate",
            linkerSettings: [
                // wgpu's Metal backend, linked statically into the app.
                .linkedFramework("Metal"),
                .linkedFramework("QuartzCore"),
                .linkedFramework("CoreGraphics"),
                .linkedFramework("IOSurface"),
                .linkedFramework("Foundation"),
            ]
        ),
    ]
)
