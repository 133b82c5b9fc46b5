//! Named regression tests: one per bug found, each failing on the code before its fix.
//!
//! Every test lives in `regression::<name>` (`cargo test --test regression fifo_external_data`).
//! The files under `regression/` are spliced into this one module by area; they carry no
//! top-level `use` items (imports go inside each test), so the areas cannot collide.

mod common;

mod regression {
    #[allow(unused_imports)]
    use super::common;
    #[allow(unused_imports)]
    use acclimate_test_macros::gpu_test;

    include!("regression/loader.rs");
    include!("regression/nan.rs");
    include!("regression/guard.rs");
    include!("regression/state.rs");
    include!("regression/stream.rs");
    include!("regression/pipeline_cache.rs");
}
