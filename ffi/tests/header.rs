//! `include/acclimate.h` is what cbindgen generates from `src/lib.rs` now: a change to the ABI
//! without the header (or a hand edit of the header) fails here.

use std::path::PathBuf;

#[test]
fn checked_in_header_matches_cbindgen() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("ffi/cbindgen.toml parses");
    let bindings = cbindgen::Builder::new()
        .with_crate(&dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header from src/lib.rs");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).expect("the header is UTF-8");
    let path = dir.join("include/acclimate.h");
    if std::env::var("ACCLIMATE_BLESS_HEADER").as_deref() == Ok("1") {
        std::fs::write(&path, &generated).expect("include/acclimate.h is writable");
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    if checked_in != generated {
        let line = checked_in.lines().zip(generated.lines()).position(|(a, b)| a != b);
        let line = line.unwrap_or_else(|| checked_in.lines().count().min(generated.lines().count()));
        let fresh = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("acclimate.h");
        let _ = std::fs::write(&fresh, &generated);
        panic!(
            "ffi/include/acclimate.h is stale: it differs from what cbindgen generates from ffi/src/lib.rs, first at \
             line {} (checked in: {:?}, generated: {:?}). The generated header is at {}. Regenerate with\n  \
             ACCLIMATE_BLESS_HEADER=1 cargo test -p acclimate-ffi --test header\nand commit it.",
            line + 1,
            checked_in.lines().nth(line).unwrap_or("(end of file)"),
            generated.lines().nth(line).unwrap_or("(end of file)"),
            fresh.display()
        );
    }
}
