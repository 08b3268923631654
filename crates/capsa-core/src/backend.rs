//! The backend trait: one [`Hypervisor`] per strategy (external QEMU today, a
//! native rust-vmm backend later), one [`VmInstance`] per running VM.
//!
//! Modelled on cloud-hypervisor's `hypervisor` crate: callers hold trait
//! objects and never learn which VMM runs underneath. Each backend declares
//! its [`Capabilities`]; [`Capabilities::check`] refuses a spec the backend
//! cannot honour before anything starts, so no option is silently dropped.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    Accel, DiskFormat, Error, InputEvent, NetDecision, NetworkPolicy, Result, ShareSpec,
    SnapshotMeta, VmSpec,
};

/// What a backend can do, as declared by the backend itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Backend name, e.g. `qemu`.
    pub backend: String,
    /// Accelerators it can use on this host (after probing).
    pub accels: Vec<Accel>,
    /// Disk image formats it can attach.
    pub disk_formats: Vec<DiskFormat>,
    /// Whether read-only disks are enforced.
    pub read_only_disks: bool,
    /// Most vCPUs per VM.
    pub max_cpus: u32,
    /// Serial console capture.
    pub console: bool,
    /// Pause and resume.
    pub pause: bool,
    /// Graceful (guest-cooperative) shutdown.
    pub graceful_shutdown: bool,
    /// A virtio-vsock device with a host-side Unix socket.
    pub vsock: bool,
    /// Snapshot a running VM and restore it ([`VmInstance::snapshot`], [`Hypervisor::restore`]).
    #[serde(default)]
    pub snapshot: bool,
    /// Shared host directories over virtio-fs ([`VmInstance::attach_share`]).
    #[serde(default)]
    pub shares: bool,
    /// A virtio-net NIC behind capsa's userspace network stack.
    #[serde(default)]
    pub network: bool,
    /// A framebuffer display driven from the host ([`VmInstance::screendump`],
    /// [`VmInstance::send_input`]).
    #[serde(default)]
    pub display: bool,
}

impl Capabilities {
    /// Refuses `spec` if it needs anything this backend lacks.
    pub fn check(&self, spec: &VmSpec) -> Result<()> {
        let unsupported = |what: String, fix: &str| Error::Unsupported {
            backend: self.backend.clone(),
            what,
            fix: fix.to_string(),
        };
        if spec.accel != Accel::Auto && !self.accels.contains(&spec.accel) {
            return Err(unsupported(
                format!("the {} accelerator on this host", spec.accel),
                "run `capsa doctor` to see why, or use --accel tcg",
            ));
        }
        if spec.cpus > self.max_cpus {
            return Err(unsupported(
                format!("{} vCPUs (at most {})", spec.cpus, self.max_cpus),
                "ask for fewer vCPUs",
            ));
        }
        for d in &spec.disks {
            if let Some(f) = d.format {
                if !self.disk_formats.contains(&f) {
                    return Err(unsupported(
                        format!("{} disks", f.as_str()),
                        "convert the image with `qemu-img convert -O raw`",
                    ));
                }
            }
            if d.read_only && !self.read_only_disks {
                return Err(unsupported(
                    "read-only disks".into(),
                    "attach the disk read-write",
                ));
            }
        }
        if spec.vsock.is_some() && !self.vsock {
            return Err(unsupported("vsock devices".into(), "drop the vsock device"));
        }
        if !spec.shares.is_empty() && !self.shares {
            return Err(unsupported(
                "shared directories".into(),
                "copy the files in and out with `capsa cp` instead",
            ));
        }
        if spec.network.is_some() && !self.network {
            return Err(unsupported(
                "networking".into(),
                "use the qemu backend, or --network none",
            ));
        }
        if spec.display.is_some() && !self.display {
            return Err(unsupported(
                "displays".into(),
                "use the qemu backend, or drop --display",
            ));
        }
        if spec.console.enabled && !self.console {
            return Err(unsupported("console capture".into(), "disable the console"));
        }
        Ok(())
    }
}

/// Where a VM is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum VmStatus {
    /// The VMM process is up but the guest is not yet running.
    Starting,
    /// The guest is running.
    Running,
    /// vCPUs are stopped; memory is kept.
    Paused,
    /// A graceful stop was requested and the guest is shutting down.
    ShuttingDown,
    /// The VM has ended.
    Stopped {
        /// How it ended.
        reason: ExitReason,
    },
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ExitReason {
    /// The guest powered off (or rebooted, which capsa treats as an exit).
    PoweredOff,
    /// The VMM was killed by a signal (e.g. after `kill()`).
    Killed {
        /// The signal number.
        signal: i32,
    },
    /// The VMM exited on its own with an error.
    Failed {
        /// Exit code of the VMM process.
        code: i32,
        /// The last lines the VMM printed on stderr.
        message: String,
    },
}

/// The two byte streams of a guest serial console.
pub struct ConsoleStreams {
    /// Bytes typed into the guest.
    pub input: Box<dyn AsyncWrite + Send + Sync + Unpin>,
    /// Bytes the guest prints.
    pub output: Box<dyn AsyncRead + Send + Sync + Unpin>,
}

impl std::fmt::Debug for ConsoleStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConsoleStreams")
    }
}

/// Per-start settings that are not part of the VM's description.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// A private directory the backend may put sockets and logs in; it must exist.
    pub run_dir: PathBuf,
    /// A name for logs and process titles.
    pub name: String,
}

/// One VM strategy (external VMM, native, ...).
#[async_trait::async_trait]
pub trait Hypervisor: Send + Sync {
    /// Short name, e.g. `qemu`.
    fn name(&self) -> &'static str;
    /// What this backend can do on this host.
    fn capabilities(&self) -> Capabilities;
    /// Validates `spec` against the capabilities and starts the VM.
    async fn start(&self, spec: VmSpec, opts: StartOptions) -> Result<Box<dyn VmInstance>>;
    /// Starts a VM from the snapshot in `dir`, described by `meta` (read and
    /// checked against this host by the caller, see [`SnapshotMeta::check_host`]).
    ///
    /// The restored VM is running and writes to its disks go to fresh
    /// overlays in `opts.run_dir`, never to the snapshot's files, so any number
    /// of VMs may be restored from one snapshot at once.
    async fn restore(
        &self,
        dir: &Path,
        meta: &SnapshotMeta,
        opts: StartOptions,
    ) -> Result<RestoredVm> {
        let _ = (dir, meta, opts);
        Err(Error::Unsupported {
            backend: self.name().into(),
            what: "snapshot restore".into(),
            fix: "boot the VM instead".into(),
        })
    }
}

/// A VM started from a snapshot.
pub struct RestoredVm {
    /// The running VM.
    pub instance: Box<dyn VmInstance>,
    /// Its spec: the snapshot's, with each writable disk's path replaced by
    /// the VM's own overlay.
    pub spec: VmSpec,
}

impl std::fmt::Debug for RestoredVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoredVm")
            .field("pid", &self.instance.pid())
            .field("spec", &self.spec)
            .finish()
    }
}

/// A VM started by a [`Hypervisor`].
///
/// Dropping it must end the VM: backends may not leak processes.
#[async_trait::async_trait]
pub trait VmInstance: Send + Sync {
    /// The OS process id of the VMM, when it is a separate process.
    fn pid(&self) -> Option<u32>;
    /// Takes the console streams; `None` after the first call or without a console.
    fn take_console(&mut self) -> Option<ConsoleStreams>;
    /// The host Unix socket of the VM's vsock device (hybrid-vsock convention), if it has one.
    fn vsock_socket(&self) -> Option<PathBuf>;
    /// The current status.
    async fn status(&self) -> Result<VmStatus>;
    /// Stops the vCPUs.
    async fn pause(&self) -> Result<()>;
    /// Restarts paused vCPUs.
    async fn resume(&self) -> Result<()>;
    /// Asks the guest to shut down; returns once asked, not once done.
    async fn request_shutdown(&self) -> Result<()>;
    /// Ends the VM at once.
    async fn kill(&self) -> Result<()>;
    /// Waits for the VM to end. Several callers may wait at once.
    async fn wait(&self) -> Result<ExitReason>;
    /// Saves the VM into the empty directory `dir` (memory, device state, and
    /// a frozen copy of each writable disk, all from the same instant), writes
    /// its [`SnapshotMeta`], and lets the VM go on as it was (running or paused).
    ///
    /// Open vsock streams are reset: the device is detached around the save.
    async fn snapshot(&self, dir: &Path) -> Result<SnapshotMeta> {
        let _ = dir;
        Err(Error::Unsupported {
            backend: "this".into(),
            what: "snapshots".into(),
            fix: "use the qemu backend".into(),
        })
    }

    /// Attaches a host directory to the running VM (virtio-fs, hot-plugged);
    /// the guest mounts it by its tag. The caller has validated `share`.
    async fn attach_share(&self, share: &ShareSpec) -> Result<()> {
        let _ = share;
        Err(Error::Unsupported {
            backend: "this".into(),
            what: "shared directories".into(),
            fix: "use the qemu backend, or copy files with `capsa cp`".into(),
        })
    }

    /// Detaches the share mounted at guest path `guest` (the guest should
    /// have unmounted it) and returns it.
    async fn detach_share(&self, guest: &str) -> Result<ShareSpec> {
        Err(Error::invalid(
            "share",
            format!("no share is attached at {guest}"),
            "list the attached shares with `capsa inspect`",
        ))
    }

    /// The shares attached now (at start and since).
    async fn shares(&self) -> Result<Vec<ShareSpec>> {
        Ok(Vec::new())
    }
    /// Replaces the VM's network policy; new flows follow it at once.
    async fn set_network_policy(&self, policy: NetworkPolicy) -> Result<()> {
        let _ = policy;
        Err(no_network())
    }
    /// The network policy in force.
    async fn network_policy(&self) -> Result<NetworkPolicy> {
        Err(no_network())
    }
    /// The latest network decisions (bounded), oldest first.
    async fn network_log(&self) -> Result<Vec<NetDecision>> {
        Err(no_network())
    }
    /// Forwards a host port into the running VM (e.g. on a pooled sandbox,
    /// whose snapshot can hold no listening host socket).
    async fn add_port_forward(&self, forward: crate::PortForward) -> Result<()> {
        let _ = forward;
        Err(no_network())
    }
    /// Stops forwarding `host_ip:host_port`; returns the forward removed.
    async fn remove_port_forward(
        &self,
        host_ip: std::net::Ipv4Addr,
        host_port: u16,
    ) -> Result<crate::PortForward> {
        let _ = (host_ip, host_port);
        Err(no_network())
    }
    /// The host ports forwarded now (at start and since).
    async fn port_forwards(&self) -> Result<Vec<crate::PortForward>> {
        Err(no_network())
    }

    /// Writes the screen as it is now into `out` as a binary PPM (P6), a
    /// file path in a directory private to the caller. The file is untrusted
    /// input to its reader (the guest chose the pixels and the mode).
    async fn screendump(&self, out: &Path) -> Result<()> {
        let _ = out;
        Err(crate::no_display())
    }

    /// Hands a connected stream socket to the VM's VNC server as a new viewer
    /// (the display has no listening socket of its own).
    async fn vnc_add_client(&self, client: std::os::fd::OwnedFd, view_only: bool) -> Result<()> {
        let _ = (client, view_only);
        Err(Error::Unsupported {
            backend: "this".into(),
            what: "VNC viewers through this handle".into(),
            fix: "connect to the sandbox's vnc.sock (monitor sandboxes) instead".into(),
        })
    }

    /// Sends input events to the VM's tablet and keyboard, in order, as one
    /// batch (the guest sees them together).
    async fn send_input(&self, events: Vec<InputEvent>) -> Result<()> {
        let _ = events;
        Err(crate::no_display())
    }
}

/// The error of a network call on a VM without a network.
pub fn no_network() -> Error {
    Error::invalid(
        "network",
        "this VM has no network",
        "create the sandbox with --network public or --network deny",
    )
}
