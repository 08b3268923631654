//! A running VM.

use std::time::Duration;

use capsa_core::{ExitReason, VmInstance, VmSpec, VmStatus};

use crate::{Error, Result, VmConsole};

/// How long [`VmHandle::stop`] lets the guest shut down before killing it.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running VM. Dropping it kills the VM: no VMM process outlives its handle.
pub struct VmHandle {
    name: String,
    spec: VmSpec,
    instance: Box<dyn VmInstance>,
    console: Option<VmConsole>,
    // Dropped after `instance` (field order), so sockets outlive the VMM.
    _run_dir: tempfile::TempDir,
}

impl std::fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHandle")
            .field("name", &self.name)
            .field("pid", &self.instance.pid())
            .finish()
    }
}

impl VmHandle {
    pub(crate) fn new(
        name: String,
        spec: VmSpec,
        instance: Box<dyn VmInstance>,
        console: Option<VmConsole>,
        run_dir: tempfile::TempDir,
    ) -> Self {
        Self {
            name,
            spec,
            instance,
            console,
            _run_dir: run_dir,
        }
    }

    /// The backend's instance (for snapshots, see `crate::snapshot`).
    pub(crate) fn instance(&self) -> &dyn VmInstance {
        self.instance.as_ref()
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
        self.instance.pid()
    }

    /// The serial console (a shared handle; clone freely).
    pub fn console(&self) -> Result<VmConsole> {
        self.console.clone().ok_or(Error::NoConsole)
    }

    /// The host Unix socket of the VM's vsock device (hybrid-vsock convention).
    pub fn vsock_socket(&self) -> Result<std::path::PathBuf> {
        self.instance.vsock_socket().ok_or(Error::NoVsock)
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
        Ok(self.instance.status().await?)
    }

    /// Pauses the vCPUs.
    pub async fn pause(&self) -> Result<()> {
        Ok(self.instance.pause().await?)
    }

    /// Resumes paused vCPUs.
    pub async fn resume(&self) -> Result<()> {
        Ok(self.instance.resume().await?)
    }

    /// Waits until the VM ends by itself.
    pub async fn wait(&self) -> Result<ExitReason> {
        Ok(self.instance.wait().await?)
    }

    /// Asks the guest to shut down, then kills it if it has not ended within
    /// [`DEFAULT_STOP_TIMEOUT`].
    pub async fn stop(&self) -> Result<ExitReason> {
        self.stop_timeout(DEFAULT_STOP_TIMEOUT).await
    }

    /// Like [`VmHandle::stop`] with an explicit grace period.
    pub async fn stop_timeout(&self, grace: Duration) -> Result<ExitReason> {
        if let VmStatus::Stopped { reason } = self.instance.status().await? {
            return Ok(reason);
        }
        if let Err(e) = self.instance.request_shutdown().await {
            tracing::debug!(vm = %self.name, "graceful stop request failed ({e}); killing");
            return self.kill().await;
        }
        match tokio::time::timeout(grace, self.instance.wait()).await {
            Ok(r) => Ok(r?),
            Err(_) => {
                tracing::warn!(vm = %self.name, ?grace, "guest did not shut down in time; killing");
                self.kill().await
            }
        }
    }

    /// Ends the VM at once.
    pub async fn kill(&self) -> Result<ExitReason> {
        self.instance.kill().await?;
        Ok(self.instance.wait().await?)
    }
}
