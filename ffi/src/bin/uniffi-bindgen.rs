//! UniFFI's generator, built from the same uniffi version as the library so the generated Kotlin
//! and Swift match its scaffolding (checksums and contract version):
//! `cargo run -p acclimate-ffi --features bindgen --bin uniffi-bindgen -- generate --library …`.

fn main() {
    uniffi::uniffi_bindgen_main()
}
