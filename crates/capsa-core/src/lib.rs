//! capsa-core: the vocabulary every capsa crate shares.
//!
//! This crate holds *plain* data (what a VM should be: [`VmSpec`]) apart from
//! the code that makes a VM from it (the backends), in the way Firecracker
//! keeps `vmm_config` apart from its builder. It also defines the backend trait
//! ([`Hypervisor`] / [`VmInstance`]) so that the library, the per-VM monitor and
//! the daemon can all depend on the trait without depending on each other.
#![deny(missing_docs)]

mod backend;
mod cmdline;
mod confine;
mod disk;
mod display;
mod error;
mod hostpath;
mod names;
mod network;
mod rootfs;
mod share;
mod snapshot;
mod spec;

pub use backend::{
    no_network, Capabilities, ConsoleStreams, ExitReason, Hypervisor, RestoredVm, StartOptions,
    VmInstance, VmStatus,
};
pub use cmdline::{CmdlineError, KernelCmdline};
pub use confine::{
    Confinement, CONFINE_ENV, DEFAULT_JAIL_DIR, DEFAULT_UID_BASE, DEFAULT_UID_COUNT, JAIL_DIR_ENV,
    JAIL_UIDS_ENV,
};
pub use disk::{probe_disk_format, DiskProbeError};
pub use display::{
    check_input, no_display, DisplaySpec, InputEvent, MouseButton, ABS_MAX, MAX_DISPLAY,
    MAX_INPUT_EVENTS, MIN_DISPLAY,
};
pub use error::{Error, Result};
pub use hostpath::{check_private_dir, HostPathPolicy, PathRefusal};
pub use names::{check_name, MAX_NAME_LEN, NAME_RULE};
pub use network::{
    mask, valid_domain, Action, NetDecision, NetRule, NetworkMode, NetworkPolicy, NetworkSpec,
    PortForward, PortRange, Proto, Target, GUEST_ADDR, GUEST_DNS, GUEST_GATEWAY, GUEST_PREFIX,
    MAX_FORWARDS, MAX_RULES,
};
pub use rootfs::{
    ImageRunConfig, RootfsFormat, RootfsSpec, UpperSpec, MAX_CONFIG_BYTES, MAX_CONFIG_ITEMS,
    MAX_CONFIG_ITEM_BYTES, MAX_DISK_UPPER_MIB, MAX_USER_BYTES, ROOTFS_SERIAL, UPPER_SERIAL,
};
pub use share::{
    check_distinct as check_distinct_shares, check_guest_path, ShareMode, ShareSpec, MAX_SHARES,
    MAX_SHARE_GUEST_PATH, MAX_SHARE_TAG,
};
pub use snapshot::{
    FileIdentity, SnapshotDisk, SnapshotMeta, CAPSA_VERSION, SNAPSHOT_FORMAT, SNAPSHOT_META_FILE,
};
pub use spec::{
    check_cpus, check_memory_mib, Accel, BootSource, ConsoleSpec, DiskFormat, DiskSpec, HostLimits,
    VmSpec, VsockSpec, MAX_CPUS, MAX_DISK_SERIAL, MAX_MEMORY_MIB, MIN_MEMORY_MIB,
};

/// The line capsa's guest init prints on the console once the guest is set up.
///
/// The host waits for it to know a boot succeeded; benchmarks measure time to it.
pub const GUEST_READY_MARKER: &str = "capsa-init: ready";
