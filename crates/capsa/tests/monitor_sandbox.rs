//! The `sandbox.rs` suite again, with every VM run by a `capsa-vmm` monitor.
//! (Build the monitor first: `cargo build -p capsa-vmm`, or run
//! `cargo nextest run -p capsa -p capsa-vmm`.)

/// Read by `common::strategy`.
const FORCE_MONITOR: bool = true;

#[path = "sandbox.rs"]
mod suite;
