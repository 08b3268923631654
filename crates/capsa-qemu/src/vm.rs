//! [`VmInstance`] for a running QEMU: the backend-neutral face of
//! [`QemuInstance`]. It lives apart from `instance` so that `instance` (the
//! process and its QMP) and `snapshot` (which drives an instance) do not
//! import each other: both are used from here.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use capsa_core::{ConsoleStreams, ExitReason, Result, SnapshotMeta, VmInstance, VmStatus};
use qapi::qmp;

use crate::instance::QemuInstance;
use crate::QemuError;

#[async_trait::async_trait]
impl VmInstance for QemuInstance {
    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    fn take_console(&mut self) -> Option<ConsoleStreams> {
        self.console.take()
    }

    fn vsock_socket(&self) -> Option<PathBuf> {
        self.vsock.as_ref().map(|d| d.config().uds_path.clone())
    }

    async fn status(&self) -> Result<VmStatus> {
        if let Some(reason) = self.exit.borrow().clone() {
            return Ok(VmStatus::Stopped { reason });
        }
        let info = match self.exec("query-status", qmp::query_status {}).await {
            Ok(i) => i,
            Err(_) if self.exit.borrow().is_some() => {
                let reason = self.exit.borrow().clone().unwrap_or(ExitReason::PoweredOff);
                return Ok(VmStatus::Stopped { reason });
            }
            Err(e) => return Err(e),
        };
        use qmp::RunState as R;
        Ok(match info.status {
            R::running if self.shutting_down.load(Ordering::Relaxed) => VmStatus::ShuttingDown,
            R::running => VmStatus::Running,
            R::paused | R::suspended => VmStatus::Paused,
            R::prelaunch | R::inmigrate | R::restore_vm => VmStatus::Starting,
            R::shutdown => VmStatus::ShuttingDown,
            _ => VmStatus::Running,
        })
    }

    async fn pause(&self) -> Result<()> {
        self.exec("stop", qmp::stop {}).await.map(|_| ())
    }

    async fn resume(&self) -> Result<()> {
        self.exec("cont", qmp::cont {}).await.map(|_| ())
    }

    async fn request_shutdown(&self) -> Result<()> {
        self.shutting_down.store(true, Ordering::Relaxed);
        // capsa's init disables the kernel's Ctrl-Alt-Del reboot, so the kernel
        // turns this key chord into SIGINT for PID 1: a clean, guest-side shutdown
        // that needs no ACPI daemon in the guest.
        let key = |code: qmp::QKeyCode| qmp::KeyValue::qcode(qmp::QKeyCodeWrapper { data: code });
        let keys = vec![
            key(qmp::QKeyCode::ctrl),
            key(qmp::QKeyCode::alt),
            key(qmp::QKeyCode::delete),
        ];
        self.exec(
            "send-key",
            qmp::send_key {
                keys,
                hold_time: None,
            },
        )
        .await
        .map(|_| ())?;
        // Also press the ACPI power button, for guests whose init listens for it.
        let _ = self
            .exec("system_powerdown", qmp::system_powerdown {})
            .await;
        Ok(())
    }

    async fn kill(&self) -> Result<()> {
        let _ = self.kill_tx.send(()).await;
        self.wait().await.map(|_| ())
    }

    async fn snapshot(&self, dir: &Path) -> Result<SnapshotMeta> {
        crate::snapshot::take(self, dir).await
    }

    async fn wait(&self) -> Result<ExitReason> {
        let mut exit = self.exit.clone();
        let r = exit
            .wait_for(|r| r.is_some())
            .await
            .map_err(|_| QemuError::Exited)?
            .clone();
        Ok(r.unwrap_or(ExitReason::PoweredOff))
    }
}
