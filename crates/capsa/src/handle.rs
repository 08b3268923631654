//! A running VM.

use std::path::{Path, PathBuf};
use std::time::Duration;

use capsa_core::{ExitReason, VmInstance, VmSpec, VmStatus};

use crate::{Error, Result, VmConsole};

/// How long [`VmHandle::stop`] lets the guest shut down before killing it.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a VM's sockets and logs live, by strategy.
#[derive(Debug)]
pub(crate) enum RunDir {
    /// In-process: a private temporary directory, removed with the handle.
    Temp(tempfile::TempDir),
    /// Monitor: the sandbox's state directory (the monitor and the registry own it).
    State(PathBuf),
}

/// The VM behind a handle.
pub(crate) enum Instance {
    /// A backend instance in this process (QEMU is our child).
    InProcess(Box<dyn VmInstance>),
    /// A `capsa-vmm` monitor, spawned by us or attached to.
    Monitor(capsa_vmm::MonitorHandle),
}

impl Instance {
    fn get(&self) -> &dyn VmInstance {
        match self {
            Instance::InProcess(i) => i.as_ref(),
            Instance::Monitor(m) => m,
        }
    }
}

/// A running VM.
///
/// In-process and spawned-monitor VMs end when their handle drops: no VMM
/// process outlives its handle unless asked to (keep-running sandboxes,
/// [`VmHandle::detach`]). A handle attached to an existing sandbox never ends it.
pub struct VmHandle {
    name: String,
    spec: VmSpec,
    instance: Instance,
    console: Option<VmConsole>,
    // Dropped after `instance` (field order), so sockets outlive the VMM.
    run_dir: RunDir,
}

impl std::fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHandle")
            .field("name", &self.name)
            .field("pid", &self.instance.get().pid())
            .finish()
    }
}

impl VmHandle {
    pub(crate) fn new(
        name: String,
        spec: VmSpec,
        instance: Instance,
        console: Option<VmConsole>,
        run_dir: RunDir,
    ) -> Self {
        Self {
            name,
            spec,
            instance,
            console,
            run_dir,
        }
    }

    /// The directory holding the VM's sockets and logs (a private temporary
    /// directory in-process; the sandbox state directory under a monitor).
    pub fn run_dir(&self) -> &Path {
        match &self.run_dir {
            RunDir::Temp(t) => t.path(),
            RunDir::State(d) => d,
        }
    }

    /// The sandbox state directory, for a VM run by a monitor process.
    pub fn state_dir(&self) -> Option<&Path> {
        match &self.run_dir {
            RunDir::State(d) => Some(d),
            RunDir::Temp(_) => None,
        }
    }

    /// The monitor process's pid, for a VM run by a monitor.
    pub fn monitor_pid(&self) -> Option<u32> {
        match &self.instance {
            Instance::Monitor(m) => Some(m.monitor_pid()),
            Instance::InProcess(_) => None,
        }
    }

    /// Lets a monitor-run VM outlive this handle (and this process); it is
    /// found again with [`crate::Sandboxes`]. In-process VMs cannot be detached.
    pub async fn detach(self) -> Result<()> {
        let VmHandle { instance, .. } = self;
        match instance {
            Instance::Monitor(m) => Ok(m.detach().await?),
            Instance::InProcess(_) => Err(Error::NeedsMonitor {
                what: "detaching a VM",
            }),
        }
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The validated spec the VM runs.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// The VMM's process id.
    pub fn pid(&self) -> Option<u32> {
        self.instance.get().pid()
    }

    /// The serial console (a shared handle; clone freely).
    pub fn console(&self) -> Result<VmConsole> {
        self.console.clone().ok_or(Error::NoConsole)
    }

    /// The host Unix socket of the VM's vsock device (hybrid-vsock convention).
    pub fn vsock_socket(&self) -> Result<std::path::PathBuf> {
        self.instance.get().vsock_socket().ok_or(Error::NoVsock)
    }

    /// Opens a stream to a service listening on guest vsock port `port`.
    pub async fn vsock_connect(
        &self,
        port: u32,
        deadline: Duration,
    ) -> Result<tokio::net::UnixStream> {
        crate::vsock::connect(&self.vsock_socket()?, port, deadline).await
    }

    /// Accepts guest connections to host vsock port `port` (guest: connect to CID 2, `port`).
    pub fn vsock_listen(&self, port: u32) -> Result<tokio::net::UnixListener> {
        crate::vsock::listen(&self.vsock_socket()?, port)
    }

    /// The current status.
    pub async fn status(&self) -> Result<VmStatus> {
        Ok(self.instance.get().status().await?)
    }

    /// Pauses the vCPUs.
    pub async fn pause(&self) -> Result<()> {
        Ok(self.instance.get().pause().await?)
    }

    /// Resumes paused vCPUs.
    pub async fn resume(&self) -> Result<()> {
        Ok(self.instance.get().resume().await?)
    }

    /// Waits until the VM ends by itself.
    pub async fn wait(&self) -> Result<ExitReason> {
        Ok(self.instance.get().wait().await?)
    }

    /// Asks the guest to shut down, then kills it if it has not ended within
    /// [`DEFAULT_STOP_TIMEOUT`].
    pub async fn stop(&self) -> Result<ExitReason> {
        self.stop_timeout(DEFAULT_STOP_TIMEOUT).await
    }

    /// Like [`VmHandle::stop`] with an explicit grace period.
    pub async fn stop_timeout(&self, grace: Duration) -> Result<ExitReason> {
        if let VmStatus::Stopped { reason } = self.instance.get().status().await? {
            return Ok(reason);
        }
        if let Err(e) = self.instance.get().request_shutdown().await {
            tracing::debug!(vm = %self.name, "graceful stop request failed ({e}); killing");
            return self.kill().await;
        }
        match tokio::time::timeout(grace, self.instance.get().wait()).await {
            Ok(r) => Ok(r?),
            Err(_) => {
                tracing::warn!(vm = %self.name, ?grace, "guest did not shut down in time; killing");
                self.kill().await
            }
        }
    }

    /// Ends the VM at once.
    pub async fn kill(&self) -> Result<ExitReason> {
        self.instance.get().kill().await?;
        Ok(self.instance.get().wait().await?)
    }
}
