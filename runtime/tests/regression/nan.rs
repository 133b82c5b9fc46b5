// Regression tests of the nan area (spliced into tests/regression.rs's `regression` module).
