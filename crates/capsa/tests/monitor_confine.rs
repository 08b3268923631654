//! The `confine.rs` suite again, with every VM run by a `capsa-vmm` monitor
//! (QEMU is its child; the vsock device's threads live in it).
//! (Build the monitor first: `cargo build -p capsa-vmm`.)

/// Read by `common::strategy`.
const FORCE_MONITOR: bool = true;

#[path = "confine.rs"]
mod suite;
