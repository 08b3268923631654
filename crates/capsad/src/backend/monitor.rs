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
use capsa::{Capsa, ExecChild, Sandbox, SandboxRecord, Sandboxes, Snapshots};

use super::pools::{Attached, PoolConfig, Pools, LABEL_POOL, LABEL_POOL_STATE};
use super::{Backend, ConsolePaths};
use crate::api::{
    AcquireRequest, CreatePoolRequest, CreateSandboxRequest, PoolInfo, SandboxInfo, SandboxState,
    SnapshotInfo,
};
use crate::error::{ApiError, ApiResult};

/// Sandboxes under monitors, found by name in a state root.
pub struct MonitorBackend {
    reg: Sandboxes,
    attached: Attached,
    /// One lock per name, held while that name is being attached.
    attaching: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pools: Pools,
}

fn snapshot_info(e: capsa::SnapshotEntry) -> SnapshotInfo {
    SnapshotInfo {
        name: e.name,
        created_at: e.created_at,
        size_bytes: e.size_bytes,
        cpus: e.spec.as_ref().map(|s| s.cpus),
        memory_mib: e.spec.as_ref().map(|s| s.memory_mib),
        source: e.source,
        capsa_version: e.capsa_version,
        problem: e.problem,
    }
}

fn info_of(r: SandboxRecord) -> SandboxInfo {
    let pool = Sandboxes::label(&r, LABEL_POOL).map(str::to_string);
    let pool_state = Sandboxes::label(&r, LABEL_POOL_STATE).map(str::to_string);
    SandboxInfo {
        pool,
        pool_state,
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
    /// The backend over the state root `root`, with named snapshots in
    /// `snapshots` (default: the library's [`Snapshots::default_root`]).
    /// At most `max_pool_members` ready members across all pools.
    pub fn new(root: PathBuf, snapshots: Option<PathBuf>, max_pool_members: usize) -> Self {
        let reg = Sandboxes::new(Some(root));
        let attached: Attached = Arc::new(tokio::sync::Mutex::new(HashMap::new()));
        let pools = Pools::new(
            reg.clone(),
            Snapshots::new(snapshots),
            attached.clone(),
            1,
            max_pool_members,
        );
        Self {
            reg,
            attached,
            attaching: Default::default(),
            pools,
        }
    }

    /// Starts the pools: those saved by an earlier daemon (`pools.json`),
    /// then `flags` (which replace saved ones of the same name); ready
    /// members left by an earlier daemon are adopted, those of pools that are
    /// gone are removed. Must run inside the runtime.
    fn start_pools_now(&self, flags: Vec<PoolConfig>) -> Result<(), String> {
        for f in &flags {
            self.pools.validate(f).map_err(|e| {
                format!(
                    "--pool {}: {}{}",
                    f.name,
                    e.detail.message,
                    e.detail
                        .fix
                        .map(|f| format!("; fix: {f}"))
                        .unwrap_or_default()
                )
            })?;
        }
        let mut saved = self.pools.saved();
        saved.retain(|s| !flags.iter().any(|f| f.name == s.name));
        for cfg in saved {
            let name = cfg.name.clone();
            if let Err(e) = self.pools.create(cfg, false) {
                tracing::warn!(pool = %name, "not restarting a saved pool: {e}");
            }
        }
        for cfg in flags {
            self.pools.create(cfg, false).map_err(|e| e.to_string())?;
        }
        self.pools.clean_orphans();
        Ok(())
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
        if let Some(sb) = self.cached(name, &rec).await {
            return Ok(sb);
        }
        // Attaching waits for the agent (up to 30 s for a stuck guest): only
        // this name's callers wait on it, never the map other sandboxes use.
        // Concurrent first execs of one name still attach once.
        let slot = {
            let mut m = self.attaching.lock().await;
            m.entry(name.to_string()).or_default().clone()
        };
        let _one = slot.lock().await;
        if let Some(sb) = self.cached(name, &rec).await {
            return Ok(sb);
        }
        let sb =
            Arc::new(self.reg.open(name).await.map_err(|e| {
                ApiError::from_capsa(&format!("attaching to sandbox {name:?}"), &e)
            })?);
        self.attached
            .lock()
            .await
            .insert(name.to_string(), sb.clone());
        Ok(sb)
    }

    /// The cached attachment of `name`, if the same monitor still owns it
    /// (a restart by someone else changes the pid).
    async fn cached(&self, name: &str, rec: &SandboxRecord) -> Option<Arc<Sandbox>> {
        let sb = self.attached.lock().await.get(name).cloned()?;
        let same = sb.record().ok().map(|r| r.monitor_pid) == Some(rec.monitor_pid);
        same.then_some(sb)
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
        self.attaching.lock().await.remove(name);
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
        if let Some(snap) = &req.from_snapshot {
            let path = self
                .pools
                .snapshots()
                .get(snap)
                .map_err(|e| ApiError::from_capsa(&format!("snapshot {snap:?}"), &e))?
                .path()
                .to_path_buf();
            let mut b = Capsa::restore(path).name(name);
            for (k, v) in &req.env {
                b = b.env(k, v);
            }
            if let Some(w) = &req.workdir {
                b = b.workdir(w);
            }
            let sb = self.reg.create_restored(b).await.map_err(|e| {
                ApiError::from_capsa(&format!("restoring sandbox {name:?} from {snap:?}"), &e)
            })?;
            // A snapshot holds no shares: they are hot-plugged into the restored VM.
            for s in req.shares_spec() {
                if let Err(e) = sb.share_add(s).await {
                    let _ = self.reg.remove(name, true).await;
                    return Err(ApiError::from_capsa(
                        &format!("sharing a directory with sandbox {name:?}"),
                        &e,
                    ));
                }
            }
            self.attached
                .lock()
                .await
                .insert(name.to_string(), Arc::new(sb));
            return self.get(name).await;
        }
        let b = req.builder(name);
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
        // The monitor alone: a stuck agent must not delay a stop.
        let r = self.reg.stop(name, capsa::DEFAULT_STOP_TIMEOUT).await;
        self.forget(name).await;
        r.map_err(|e| ApiError::from_capsa(&format!("stopping sandbox {name:?}"), &e))?;
        self.get(name).await
    }

    async fn kill(&self, name: &str) -> ApiResult<SandboxInfo> {
        if !self.record(name)?.is_live() {
            return self.get(name).await;
        }
        let r = self.reg.kill(name).await;
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
                Err(ApiError::from_spawn(&e))
            }
        }
    }

    async fn files(&self, name: &str) -> ApiResult<capsa::copy::AgentFs> {
        Ok(self.running(name).await?.files())
    }

    fn start_pools(&self, flags: Vec<PoolConfig>) -> Result<(), String> {
        self.start_pools_now(flags)
    }

    async fn share_add(
        &self,
        name: &str,
        share: capsa::ShareSpec,
    ) -> ApiResult<Vec<capsa::ShareSpec>> {
        let sb = self.running(name).await?;
        sb.share_add(share)
            .await
            .map_err(|e| ApiError::from_capsa(&format!("sharing a directory with {name:?}"), &e))?;
        sb.shares()
            .await
            .map_err(|e| ApiError::from_capsa(&format!("listing the shares of {name:?}"), &e))
    }

    async fn share_remove(&self, name: &str, guest: &str) -> ApiResult<()> {
        let sb = self.running(name).await?;
        sb.share_remove(guest)
            .await
            .map(|_| ())
            .map_err(|e| ApiError::from_capsa(&format!("detaching {guest} from {name:?}"), &e))
    }

    async fn shares(&self, name: &str) -> ApiResult<Vec<capsa::ShareSpec>> {
        let sb = self.running(name).await?;
        sb.shares()
            .await
            .map_err(|e| ApiError::from_capsa(&format!("listing the shares of {name:?}"), &e))
    }

    async fn snapshot_create(&self, name: &str, snapshot: &str) -> ApiResult<SnapshotInfo> {
        let sb = self.running(name).await?;
        let e = self
            .pools
            .snapshots()
            .create(snapshot, &sb)
            .await
            .map_err(|e| ApiError::from_capsa(&format!("snapshotting {name:?}"), &e))?;
        Ok(snapshot_info(e))
    }

    async fn snapshot_list(&self) -> ApiResult<Vec<SnapshotInfo>> {
        let l = self
            .pools
            .snapshots()
            .list()
            .map_err(|e| ApiError::from_capsa("listing snapshots", &e))?;
        Ok(l.into_iter().map(snapshot_info).collect())
    }

    async fn snapshot_remove(&self, snapshot: &str) -> ApiResult<()> {
        if let Some(p) = self.pools.uses_snapshot(snapshot) {
            return Err(ApiError::conflict(format!(
                "pool {p:?} restores its members from snapshot {snapshot:?}"
            ))
            .fix(format!("DELETE /v1/pools/{p} first")));
        }
        self.pools
            .snapshots()
            .remove(snapshot)
            .map_err(|e| ApiError::from_capsa(&format!("removing snapshot {snapshot:?}"), &e))
    }

    async fn pool_create(&self, req: &CreatePoolRequest) -> ApiResult<PoolInfo> {
        self.pools.create(PoolConfig::from(req), true)
    }

    async fn pool_list(&self) -> ApiResult<Vec<PoolInfo>> {
        Ok(self.pools.list())
    }

    async fn pool_get(&self, name: &str) -> ApiResult<PoolInfo> {
        self.pools.get(name)
    }

    async fn pool_remove(&self, name: &str) -> ApiResult<()> {
        self.pools.remove(name).await
    }

    async fn pool_acquire(&self, pool: &str, req: &AcquireRequest) -> ApiResult<SandboxInfo> {
        let name = self.pools.acquire(pool, req.name.as_deref()).await?;
        self.get(&name).await
    }

    async fn console(&self, name: &str) -> ApiResult<ConsolePaths> {
        let rec = self.record(name)?;
        Ok(ConsolePaths {
            log: rec.dir.join(capsa_vmm::state::files::CONSOLE_LOG),
            socket: rec.dir.join(capsa_vmm::state::files::CONSOLE_SOCK),
        })
    }
}
