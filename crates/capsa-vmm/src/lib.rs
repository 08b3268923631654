//! capsa-vmm: the per-VM monitor process and its clients.
//!
//! One `capsa-vmm` process owns one VM (today a QEMU child) for the VM's whole
//! life. The process that asked for the VM (the library, the daemon) talks to
//! it over tarpc on the monitor's stdin/stdout; anyone else reattaches through
//! `monitor.sock` in the sandbox's state directory. Because the VM lives in its
//! own process, it can outlive its creator (keep-alive sandboxes), a crash of a
//! library user cannot leave a QEMU half-owned, and a sandbox is found again by
//! name through the on-disk [`state`] layout.
//!
//! - [`service`]: the RPC interface ([`service::Monitor`]) and its wire format.
//! - [`server`]: the monitor process itself (`capsa-vmm serve`).
//! - [`client`]: [`client::spawn`] / [`client::connect`] and [`client::MonitorHandle`],
//!   which implements [`capsa_core::VmInstance`].
//! - [`state`]: the state root, sandbox records, names, liveness.
#![deny(missing_docs)]

pub mod client;
mod error;
pub mod server;
pub mod service;
pub mod state;

pub use client::{
    connect, find_monitor_binary, respawn, spawn, spawn_restored, MonitorHandle, SpawnOptions,
};
pub use error::{Result, VmmError};
pub use service::{MonitorInfo, RpcError};
pub use state::{
    validate_name, RestoreRequest, SandboxRecord, SandboxState, StateError, StateRoot,
};
