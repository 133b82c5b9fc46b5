// Regression tests of the stream area (spliced into tests/regression.rs's `regression` module).
