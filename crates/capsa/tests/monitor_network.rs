//! The `network.rs` suite again, with every VM run by a `capsa-vmm` monitor:
//! the stack lives in the monitor, policy and log go over its RPC.
//! (Build the monitor first: `cargo build -p capsa-vmm`.)

/// Read by `common::strategy`.
const FORCE_MONITOR: bool = true;

#[path = "network.rs"]
mod suite;
