// Regression tests of the loader area (spliced into tests/regression.rs's `regression` module).
