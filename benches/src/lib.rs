//! Shared helpers for the Kiln benchmarks.
