//! capsa: run Linux VMs (and, on top of them, sandboxes) from Rust.
//!
//! ```no_run
//! # async fn demo() -> capsa::Result<()> {
//! use capsa::{Capsa, LinuxDirectBoot};
//! use std::time::Duration;
//! let vm = Capsa::vm(LinuxDirectBoot::default_guest().await?)
//!     .cpus(2)
//!     .memory_mb(512)
//!     .console()
//!     .build()
//!     .await?;
//! let console = vm.console()?;
//! console.wait_for(capsa::GUEST_READY_MARKER, Duration::from_secs(60)).await?;
//! console.write_line("uname -r").await?;
//! vm.stop().await?;
//! # Ok(()) }
//! ```
//!
//! The builder only produces a plain [`capsa_core::VmSpec`]; the backend (QEMU
//! today) turns it into a running VM. Every other front end (CLI, monitor,
//! daemon) goes through the same spec.
#![deny(missing_docs)]

pub mod base_snapshot;
mod builder;
mod console;
pub mod copy;
mod error;
mod guest;
mod handle;
mod pool;
mod registry;
pub mod rootfs;
mod sandbox;
pub mod screen;
mod share;
mod snapshot;
mod snapshot_store;
mod vsock;

pub use builder::{Capsa, LinuxDirectBoot, Strategy, VmBuilder};
pub use capsa_agent_client::{AgentClientError, ExecChild, ExecOutput, ExecStdin, Output};
pub use capsa_core::DisplaySpec;
pub use capsa_core::{
    Accel, DiskFormat, DiskSpec, ExitReason, KernelCmdline, ShareMode, ShareSpec, VmSpec, VmStatus,
    GUEST_READY_MARKER,
};
pub use capsa_core::{
    Action, NetDecision, NetRule, NetworkMode, NetworkPolicy, NetworkSpec, PortForward,
};
pub use capsa_core::{SnapshotMeta, CAPSA_VERSION};
pub use capsa_proto::{
    valid_hostname, AgentInfo, DirEntry, ErrorKind, ExecRequest, ExitStatus, FileKind, FileMeta,
};
pub use capsa_vmm::{SandboxRecord, SandboxState, StateRoot};
pub use console::{ConsoleReader, ConsoleWriter, VmConsole, CONSOLE_BUFFER_LIMIT};
pub use copy::CopyOutOptions;
pub use error::{Error, Result};
pub use guest::{bundle, default_bundle};
pub use handle::{VmHandle, DEFAULT_STOP_TIMEOUT};
pub use pool::{Pool, PoolBuilder, PoolStats, DEFAULT_POOL_SIZE};
pub use registry::{Sandboxes, LABEL_OWNER};
pub use sandbox::{Command, Sandbox, SandboxBuilder, DEFAULT_OP_TIMEOUT, DEFAULT_READY_TIMEOUT};
pub use screen::{ImageFormat, Screen, ScreenAction, ScreenError, Screenshot, ShotOptions};
pub use snapshot::{RestoreBuilder, Snapshot};
pub use snapshot_store::{SnapshotEntry, Snapshots, SpecSummary};

/// Re-export of the image crate, for bundle options.
pub use capsa_image as image;
