//! A backend that keeps every sandbox's VM inside the daemon process.
//!
//! Used where the per-VM monitor is not available: sandboxes die with the
//! daemon, so a restart loses them. [`super::monitor`] is the real thing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use capsa::{ExecChild, Sandbox};
use tokio::sync::Mutex;

use super::{Backend, ConsolePaths};
use crate::api::{CreateSandboxRequest, SandboxInfo, SandboxState};
use crate::error::{ApiError, ApiResult};

struct Entry {
    req: CreateSandboxRequest,
    created_at: u64,
    state: SandboxState,
    sandbox: Option<Arc<Sandbox>>,
    exit: Option<serde_json::Value>,
}

impl Entry {
    fn info(&self, name: &str) -> SandboxInfo {
        SandboxInfo {
            name: name.to_string(),
            state: self.state,
            dir: None,
            monitor_pid: None,
            vmm_pid: self.sandbox.as_ref().and_then(|s| s.vm().pid()),
            created_at: Some(self.created_at),
            spec: self
                .sandbox
                .as_ref()
                .and_then(|s| serde_json::to_value(s.vm().spec()).ok()),
            exit: self.exit.clone(),
            pool: None,
            pool_state: None,
        }
    }
}

/// Sandboxes as in-process VMs (lost when the daemon exits).
#[derive(Default)]
pub struct InProcessBackend {
    entries: Mutex<BTreeMap<String, Entry>>,
}

impl InProcessBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    async fn boot(&self, name: &str, req: &CreateSandboxRequest) -> ApiResult<Arc<Sandbox>> {
        let b = req.builder(name);
        b.build()
            .await
            .map(Arc::new)
            .map_err(|e| ApiError::from_capsa(&format!("booting sandbox {name:?}"), &e))
    }

    async fn running(&self, name: &str) -> ApiResult<Arc<Sandbox>> {
        let entries = self.entries.lock().await;
        let e = entries
            .get(name)
            .ok_or_else(|| ApiError::no_sandbox(name))?;
        e.sandbox.clone().ok_or_else(|| {
            ApiError::conflict(format!("sandbox {name:?} is {:?}, not running", e.state))
                .fix(format!("start it with POST /v1/sandboxes/{name}/start"))
        })
    }

    async fn set(&self, name: &str, f: impl FnOnce(&mut Entry)) -> ApiResult<SandboxInfo> {
        let mut entries = self.entries.lock().await;
        let e = entries
            .get_mut(name)
            .ok_or_else(|| ApiError::no_sandbox(name))?;
        f(e);
        Ok(e.info(name))
    }

    async fn halt(&self, name: &str, kill: bool) -> ApiResult<SandboxInfo> {
        let sb = {
            let mut entries = self.entries.lock().await;
            let e = entries
                .get_mut(name)
                .ok_or_else(|| ApiError::no_sandbox(name))?;
            match e.sandbox.take() {
                Some(s) => s,
                None => return Ok(e.info(name)),
            }
        };
        let r = if kill {
            sb.kill().await
        } else {
            sb.stop().await
        };
        let exit = match r {
            Ok(reason) => serde_json::to_value(reason).ok(),
            Err(e) => {
                tracing::warn!(sandbox = name, "stopping: {e}");
                None
            }
        };
        self.set(name, |e| {
            e.state = SandboxState::Stopped;
            e.exit = exit;
        })
        .await
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[async_trait]
impl Backend for InProcessBackend {
    fn kind(&self) -> &'static str {
        "in-process"
    }

    async fn list(&self) -> ApiResult<Vec<SandboxInfo>> {
        let entries = self.entries.lock().await;
        Ok(entries.iter().map(|(n, e)| e.info(n)).collect())
    }

    async fn get(&self, name: &str) -> ApiResult<SandboxInfo> {
        let entries = self.entries.lock().await;
        entries
            .get(name)
            .map(|e| e.info(name))
            .ok_or_else(|| ApiError::no_sandbox(name))
    }

    async fn create(&self, name: &str, req: &CreateSandboxRequest) -> ApiResult<SandboxInfo> {
        if req.from_snapshot.is_some() {
            return Err(
                ApiError::unavailable("from_snapshot needs the monitor backend")
                    .fix("run capsad with --backend monitor (the default)"),
            );
        }
        {
            let mut entries = self.entries.lock().await;
            if entries.contains_key(name) {
                return Err(ApiError::conflict(format!("sandbox {name:?} exists"))
                    .fix("pick another name, or DELETE the existing sandbox first"));
            }
            entries.insert(
                name.to_string(),
                Entry {
                    req: req.clone(),
                    created_at: now(),
                    state: if req.start {
                        SandboxState::Starting
                    } else {
                        SandboxState::Stopped
                    },
                    sandbox: None,
                    exit: None,
                },
            );
        }
        if !req.start {
            return self.get(name).await;
        }
        match self.boot(name, req).await {
            Ok(sb) => {
                self.set(name, |e| {
                    e.state = SandboxState::Running;
                    e.sandbox = Some(sb);
                })
                .await
            }
            Err(err) => {
                self.entries.lock().await.remove(name);
                Err(err)
            }
        }
    }

    async fn start(&self, name: &str) -> ApiResult<SandboxInfo> {
        let req = {
            let mut entries = self.entries.lock().await;
            let e = entries
                .get_mut(name)
                .ok_or_else(|| ApiError::no_sandbox(name))?;
            if e.sandbox.is_some() {
                return Err(ApiError::conflict(format!("sandbox {name:?} is running")));
            }
            e.state = SandboxState::Starting;
            e.req.clone()
        };
        match self.boot(name, &req).await {
            Ok(sb) => {
                self.set(name, |e| {
                    e.state = SandboxState::Running;
                    e.sandbox = Some(sb);
                    e.exit = None;
                })
                .await
            }
            Err(err) => {
                let _ = self.set(name, |e| e.state = SandboxState::Stopped).await;
                Err(err)
            }
        }
    }

    async fn stop(&self, name: &str) -> ApiResult<SandboxInfo> {
        self.halt(name, false).await
    }

    async fn kill(&self, name: &str) -> ApiResult<SandboxInfo> {
        self.halt(name, true).await
    }

    async fn remove(&self, name: &str, force: bool) -> ApiResult<()> {
        let running = self.get(name).await?.state == SandboxState::Running;
        if running && !force {
            return Err(ApiError::conflict(format!("sandbox {name:?} is running"))
                .fix("stop it first, or DELETE with ?force=true to kill it"));
        }
        if running {
            self.halt(name, true).await?;
        }
        self.entries.lock().await.remove(name);
        Ok(())
    }

    async fn spawn(&self, name: &str, cmd: &capsa::Command) -> ApiResult<ExecChild> {
        let sb = self.running(name).await?;
        sb.spawn(cmd).await.map_err(|e| ApiError::from_spawn(&e))
    }

    async fn files(&self, name: &str) -> ApiResult<capsa::copy::AgentFs> {
        Ok(self.running(name).await?.files())
    }

    async fn console(&self, name: &str) -> ApiResult<ConsolePaths> {
        self.get(name).await?;
        Err(
            ApiError::unavailable("the in-process backend keeps no console log or console socket")
                .fix("run capsad with the monitor backend (capsa-vmm) for console access"),
        )
    }
}
