//! The `shares.rs` suite again, with every VM run by a `capsa-vmm` monitor:
//! virtiofsd then belongs to the monitor, and attach/detach cross its RPC.
//! (Build the monitor first: `cargo build -p capsa-vmm`.)

/// Read by `common::strategy`.
const FORCE_MONITOR: bool = true;

#[path = "shares.rs"]
mod suite;
