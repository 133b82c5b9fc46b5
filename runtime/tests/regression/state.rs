// Regression tests of the state area (spliced into tests/regression.rs's `regression` module).
