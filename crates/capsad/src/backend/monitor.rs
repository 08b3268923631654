//! The real backend: sandboxes run by per-VM `capsa-vmm` monitors under the
//! state root, through the library's [`capsa::Sandboxes`] registry.
//!
//! The daemon keeps no state of its own: every answer comes from the state
//! root, so a daemon restart (even `kill -9`) loses nothing. It caches one
//! attached [`Sandbox`] per running name only to avoid re-attaching (monitor
//! connect + agent handshake) on every exec.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use capsa::{Capsa, DiskSpec, ExecChild, FileMeta, Sandbox, SandboxRecord, Sandboxes};
use tokio::sync::Mutex;

use super::{Backend, BoxReader, BoxWriter, ConsolePaths};
use crate::api::{CreateSandboxRequest, SandboxInfo, SandboxState};
use crate::error::{ApiError, ApiResult};

/// Sandboxes under monitors, found by name in a state root.
pub struct MonitorBackend {
    reg: Sandboxes,
    attached: Mutex<HashMap<String, Arc<Sandbox>>>,
}

fn info_of(r: SandboxRecord) -> SandboxInfo {
    SandboxInfo {
        state: match r.state {
            capsa::SandboxState::Starting => SandboxState::Starting,
            capsa::SandboxState::Running => SandboxState::Running,
            capsa::SandboxState::Paused => SandboxState::Paused,
            capsa::SandboxState::Stopped => SandboxState::Stopped,
            capsa::SandboxState::Dead => SandboxState::Dead,
        },
        dir: Some(r.dir.display().to_string()),
        monitor_pid: r.monitor_pid,
        vmm_pid: r.vmm_pid,
        created_at: Some(r.created_at),
        spec: r.spec.and_then(|s| serde_json::to_value(s).ok()),
        exit: r.exit.and_then(|e| serde_json::to_value(e).ok()),
        name: r.name,
    }
}

impl MonitorBackend {
    /// The backend over the state root `root`.
    pub fn new(root: PathBuf) -> Self {
        Self {
            reg: Sandboxes::new(Some(root)),
            attached: Mutex::new(HashMap::new()),
        }
    }

    fn record(&self, name: &str) -> ApiResult<SandboxRecord> {
        self.reg
            .get(name)
            .map_err(|e| ApiError::from_capsa(&format!("sandbox {name:?}"), &e))
    }

    /// The attached sandbox, if it is running (attaching when not cached).
    async fn running(&self, name: &str) -> ApiResult<Arc<Sandbox>> {
        let rec = self.record(name)?;
        if !rec.is_live() {
            self.attached.lock().await.remove(name);
            return Err(
                ApiError::conflict(format!("sandbox {name:?} is {}", rec.state)).fix(
                    match rec.state {
                        capsa::SandboxState::Dead => {
                            format!("DELETE /v1/sandboxes/{name} cleans it up")
                        }
                        _ => format!("start it with POST /v1/sandboxes/{name}/start"),
                    },
                ),
            );
        }
        // Hold the map lock while attaching so concurrent first execs attach once.
        let mut map = self.attached.lock().await;
        if let Some(sb) = map.get(name) {
            // The same monitor still owns it? (a restart by someone else changes the pid)
            let same = sb.record().ok().map(|r| r.monitor_pid) == Some(rec.monitor_pid);
            if same {
                return Ok(sb.clone());
            }
        }
        let sb =
            Arc::new(self.reg.open(name).await.map_err(|e| {
                ApiError::from_capsa(&format!("attaching to sandbox {name:?}"), &e)
            })?);
        map.insert(name.to_string(), sb.clone());
        Ok(sb)
    }

    /// Logs dead sandboxes found at start-up (they stay listed as dead until DELETE).
    pub fn report_dead(&self) {
        if let Ok(list) = self.reg.list() {
            for r in list.iter().filter(|r| r.state == capsa::SandboxState::Dead) {
                tracing::warn!(sandbox = %r.name, dir = %r.dir.display(), "sandbox is dead (its monitor is gone); DELETE it to clean up");
            }
        }
    }

    async fn forget(&self, name: &str) -> Option<Arc<Sandbox>> {
        self.attached.lock().await.remove(name)
    }
}

#[async_trait]
impl Backend for MonitorBackend {
    fn kind(&self) -> &'static str {
        "monitor"
    }

    async fn list(&self) -> ApiResult<Vec<SandboxInfo>> {
        let l = self
            .reg
            .list()
            .map_err(|e| ApiError::from_capsa("listing sandboxes", &e))?;
        Ok(l.into_iter().map(info_of).collect())
    }

    async fn get(&self, name: &str) -> ApiResult<SandboxInfo> {
        Ok(info_of(self.record(name)?))
    }

    async fn create(&self, name: &str, req: &CreateSandboxRequest) -> ApiResult<SandboxInfo> {
        if self.reg.get(name).is_ok() {
            return Err(ApiError::conflict(format!("sandbox {name:?} exists"))
                .fix("pick another name, or DELETE the existing sandbox first"));
        }
        let mut b = Capsa::sandbox().name(name);
        if let Some(c) = req.cpus {
            b = b.cpus(c);
        }
        if let Some(m) = req.memory_mib {
            b = b.memory_mb(m);
        }
        for (k, v) in &req.env {
            b = b.env(k, v);
        }
        if let Some(w) = &req.workdir {
            b = b.workdir(w);
        }
        if let Some(a) = req.accel {
            b = b.accel(a.into());
        }
        for d in &req.disks {
            let mut spec = DiskSpec::new(&d.path);
            spec.read_only = d.read_only;
            b = b.disk(spec);
        }
        let sb = self
            .reg
            .create(b)
            .await
            .map_err(|e| ApiError::from_capsa(&format!("creating sandbox {name:?}"), &e))?;
        if !req.start {
            // The monitor records the stop only once its sockets are released,
            // so a `start` right after this answer works.
            if let Err(e) = sb.stop().await {
                tracing::warn!(sandbox = name, "stopping after create: {e}");
            }
        } else {
            self.attached
                .lock()
                .await
                .insert(name.to_string(), Arc::new(sb));
        }
        self.get(name).await
    }

    async fn start(&self, name: &str) -> ApiResult<SandboxInfo> {
        let rec = self.record(name)?;
        if rec.is_live() {
            return Err(ApiError::conflict(format!(
                "sandbox {name:?} is already {}",
                rec.state
            )));
        }
        self.forget(name).await;
        let sb = self
            .reg
            .start(name)
            .await
            .map_err(|e| ApiError::from_capsa(&format!("starting sandbox {name:?}"), &e))?;
        self.attached
            .lock()
            .await
            .insert(name.to_string(), Arc::new(sb));
        self.get(name).await
    }

    async fn stop(&self, name: &str) -> ApiResult<SandboxInfo> {
        if !self.record(name)?.is_live() {
            return self.get(name).await;
        }
        let sb = self.running(name).await?;
        let r = sb.stop().await;
        self.forget(name).await;
        r.map_err(|e| ApiError::from_capsa(&format!("stopping sandbox {name:?}"), &e))?;
        self.get(name).await
    }

    async fn kill(&self, name: &str) -> ApiResult<SandboxInfo> {
        if !self.record(name)?.is_live() {
            return self.get(name).await;
        }
        let sb = self.running(name).await?;
        let r = sb.kill().await;
        self.forget(name).await;
        r.map_err(|e| ApiError::from_capsa(&format!("killing sandbox {name:?}"), &e))?;
        self.get(name).await
    }

    async fn remove(&self, name: &str, force: bool) -> ApiResult<()> {
        let rec = self.record(name)?;
        if rec.is_live() && !force {
            return Err(
                ApiError::conflict(format!("sandbox {name:?} is {}", rec.state))
                    .fix("stop it first, or DELETE with ?force=true to kill it"),
            );
        }
        self.forget(name).await;
        self.reg
            .remove(name, force)
            .await
            .map_err(|e| ApiError::from_capsa(&format!("removing sandbox {name:?}"), &e))
    }

    async fn spawn(&self, name: &str, cmd: &capsa::Command) -> ApiResult<ExecChild> {
        let sb = self.running(name).await?;
        match sb.spawn(cmd).await {
            Ok(c) => Ok(c),
            Err(e) => {
                // A stale attachment (the VM was restarted elsewhere): drop it.
                if matches!(e, capsa::Error::Agent(capsa::AgentClientError::Connect(_))) {
                    self.forget(name).await;
                }
                Err(ApiError::from_capsa("starting the command", &e))
            }
        }
    }

    async fn write_file(
        &self,
        name: &str,
        path: &str,
        mode: u32,
        reader: BoxReader,
    ) -> ApiResult<FileMeta> {
        let sb = self.running(name).await?;
        sb.write_file_from(path, reader, mode, None)
            .await
            .map_err(|e| ApiError::from_capsa(&format!("writing {path}"), &e))
    }

    async fn read_file(&self, name: &str, path: &str, writer: BoxWriter) -> ApiResult<FileMeta> {
        let sb = self.running(name).await?;
        sb.read_file_to(path, writer)
            .await
            .map_err(|e| ApiError::from_capsa(&format!("reading {path}"), &e))
    }

    async fn console(&self, name: &str) -> ApiResult<ConsolePaths> {
        let rec = self.record(name)?;
        Ok(ConsolePaths {
            log: rec.dir.join(capsa_vmm::state::files::CONSOLE_LOG),
            socket: rec.dir.join(capsa_vmm::state::files::CONSOLE_SOCK),
        })
    }
}
