// Regression tests of the guard area (spliced into tests/regression.rs's `regression` module).
