//! The local implementation of [`Service`]: sandboxes run by per-VM
//! `capsa-vmm` monitors under a state root, through the library's
//! [`capsa::Sandboxes`] registry, the snapshot store, and (in a daemon) warm
//! pools.
//!
//! It keeps no state a restart would lose: every answer comes from the state
//! root. It caches one attached [`Sandbox`] per running name only to avoid
//! re-attaching (monitor connect + agent handshake) on every exec, and holds
//! one lock per name so two lifecycle calls on a name never interleave.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use capsa::{Capsa, Sandbox, SandboxRecord, Sandboxes, Snapshots};

use crate::error::{core_err, ApiError, ApiResult, ErrorCode, StatusCode};
use crate::service::{ConsoleSession, ExecChunk, ExecControl, ExecSession, Files, Service};
use crate::types::*;

pub(crate) mod images;
pub mod locks;
pub mod pools;

use locks::NameLocks;
use pools::{Attached, PoolConfig, Pools, LABEL_POOL, LABEL_POOL_STATE};

/// Size of each streamed chunk (exec output, console).
const CHUNK: usize = 64 * 1024;
/// Longest exec timeout accepted (a week): bounds the arithmetic downstream.
pub const MAX_EXEC_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;
/// Longest stop grace accepted (an hour).
pub const MAX_STOP_GRACE: Duration = Duration::from_secs(3600);

/// Whose host paths a create may attach.
#[derive(Debug, Clone)]
pub enum HostPaths {
    /// The caller is the host's own user (the library, the CLI without a
    /// daemon): any path it can open, devices when it asks for them.
    Caller,
    /// An API client of a daemon: only what the policy allows, never devices.
    Policy(capsa_core::HostPathPolicy),
}

/// Sandboxes under monitors, found by name in a state root.
pub struct LocalService {
    reg: Sandboxes,
    attached: Attached,
    /// One lock per name, held while that name is being attached.
    attaching: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    locks: Arc<NameLocks>,
    pools: Pools,
    /// Whether this process lives long enough to keep pools filled.
    pools_enabled: bool,
    host_paths: HostPaths,
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

/// The wire view of a sandbox record.
pub fn info_of(r: SandboxRecord) -> SandboxInfo {
    let pool = Sandboxes::label(&r, LABEL_POOL).map(str::to_string);
    let pool_state = Sandboxes::label(&r, LABEL_POOL_STATE).map(str::to_string);
    SandboxInfo {
        pool,
        pool_state,
        owner: Sandboxes::label(&r, capsa::LABEL_OWNER).map(str::to_string),
        state: match r.state {
            capsa::SandboxState::Starting => SandboxState::Starting,
            capsa::SandboxState::Running => SandboxState::Running,
            capsa::SandboxState::Paused => SandboxState::Paused,
            capsa::SandboxState::Stopped => SandboxState::Stopped,
            capsa::SandboxState::Dead => SandboxState::Dead,
        },
        dir: Some(r.dir.display().to_string()),
        // A pid of a process that has ended means nothing (it may be reused).
        monitor_pid: r.monitor_pid.filter(|_| r.is_live()),
        vmm_pid: r.vmm_pid.filter(|_| r.is_live()),
        created_at: Some(r.created_at),
        spec: r.spec.and_then(|s| serde_json::to_value(s).ok()),
        exit: r.exit.and_then(|e| serde_json::to_value(e).ok()),
        name: r.name,
    }
}

/// A random `sb-<8 hex>` name for a create without one.
fn generated_name() -> String {
    format!("sb-{}", pools::random_hex())
}

fn validate_snapshot_name(name: &str) -> ApiResult<()> {
    validate_name(name).map_err(|mut e| {
        e.detail.message = e.detail.message.replace("sandbox name", "snapshot name");
        e
    })
}

fn validate_pool_name(name: &str) -> ApiResult<()> {
    validate_name(name).map_err(|mut e| {
        e.detail.message = e.detail.message.replace("sandbox name", "pool name");
        e
    })
}

/// Checks a create request's fields (the spec's own limits are checked again
/// by the library's builder).
fn validate_create(req: &CreateSandboxRequest) -> ApiResult<()> {
    if let Some(s) = &req.from_snapshot {
        validate_snapshot_name(s)?;
        if req.cpus.is_some()
            || req.memory_mib.is_some()
            || !req.disks.is_empty()
            || req.accel.is_some()
            || req.network.is_some()
            || req.display.is_some()
        {
            return Err(ApiError::bad_request(
                "from_snapshot conflicts with cpus, memory_mib, disks, accel, network and display: the snapshot fixes them",
            )
            .fix("drop cpus/memory_mib/disks/accel/network/display, or drop from_snapshot to boot a new spec"));
        }
        if !req.start {
            return Err(ApiError::bad_request("from_snapshot with start: false")
                .fix("a restored sandbox is running from the start: drop `start: false`"));
        }
    }
    if let Some(c) = req.cpus {
        capsa_core::check_cpus(c).map_err(core_err)?;
    }
    if let Some(d) = req.display_spec() {
        d.validate().map_err(core_err)?;
    }
    if let Some(m) = req.memory_mib {
        capsa_core::check_memory_mib(m).map_err(core_err)?;
    }
    validate_env(&req.env)?;
    if let Some(w) = &req.workdir {
        validate_guest_path("workdir", w)?;
    }
    if let Some(n) = &req.network {
        n.validate().map_err(core_err)?;
    }
    if req.disks.len() > MAX_DISKS {
        return Err(ApiError::bad_request(format!(
            "{} disks; at most {MAX_DISKS} are accepted",
            req.disks.len()
        )));
    }
    if req.shares.len() > capsa_core::MAX_SHARES {
        return Err(ApiError::bad_request(format!(
            "{} shares; at most {} are accepted",
            req.shares.len(),
            capsa_core::MAX_SHARES
        ))
        .fix("share a common parent directory instead"));
    }
    for s in &req.shares {
        check_share_guest(&s.guest)?;
    }
    if let Some(i) = &req.image {
        validate_image_ref(i)?;
        if req.from_snapshot.is_some() {
            return Err(ApiError::bad_request(
                "image conflicts with from_snapshot: the snapshot fixes the root filesystem",
            )
            .fix("drop image, or drop from_snapshot"));
        }
    } else if req.tmpfs_upper_mib.is_some() || req.disk_upper.is_some() {
        return Err(ApiError::bad_request("an upper layer without image")
            .fix("add image, or drop tmpfs_upper_mib/disk_upper"));
    }
    Ok(())
}

fn check_share_guest(guest: &str) -> ApiResult<()> {
    capsa_core::check_guest_path(guest).map_err(|e| {
        ApiError::bad_request(format!("share guest path: {e}"))
            .fix("give an absolute, normalized guest path such as /work")
    })
}

/// Resolves a share's host directory through the host-path rules: for an
/// API client, only directories below the allowed directories, symlinks
/// resolved (and the resolved path used from here on).
fn resolve_share(s: &mut ShareRequest, host_paths: &HostPaths) -> ApiResult<()> {
    match host_paths {
        HostPaths::Caller => {
            let abs = std::path::absolute(&s.host).map_err(|e| {
                ApiError::bad_request(format!("share {}: {e}", s.host))
                    .fix("give an existing host directory")
            })?;
            s.host = abs.display().to_string();
        }
        HostPaths::Policy(policy) => {
            let real = policy.check_dir(&s.host).map_err(|e| {
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    ErrorCode::PathNotAllowed,
                    format!("share {e}"),
                )
                .fix(format!(
                    "share an existing directory below one of the directories capsad allows ({}); \
                     the daemon's operator can add one with --allow-disk-dir DIR",
                    policy.describe()
                ))
            })?;
            s.host = real.display().to_string();
        }
    }
    Ok(())
}

/// Resolves every disk path through the host-path rules: for an API client,
/// only regular files below the allowed directories, symlinks resolved (and
/// the resolved path used from here on).
fn resolve_disks(req: &mut CreateSandboxRequest, host_paths: &HostPaths) -> ApiResult<()> {
    for d in &mut req.disks {
        match host_paths {
            HostPaths::Caller => {
                let abs = std::path::absolute(&d.path).map_err(|e| {
                    ApiError::bad_request(format!("disk {}: {e}", d.path))
                        .fix("give an existing image file's path")
                })?;
                d.path = abs.display().to_string();
            }
            HostPaths::Policy(policy) => {
                if d.allow_device {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        ErrorCode::PathNotAllowed,
                        format!("disk {}: capsad never attaches host block devices", d.path),
                    )
                    .fix(
                        "pass an image file below one of the daemon's --allow-disk-dir directories",
                    ));
                }
                let real = policy.check_file(&d.path).map_err(|e| {
                    ApiError::new(
                        StatusCode::FORBIDDEN,
                        ErrorCode::PathNotAllowed,
                        format!("disk {e}"),
                    )
                    .fix(format!(
                        "attach a regular image file below one of the directories capsad allows ({}); \
                         the daemon's operator can add one with --allow-disk-dir DIR",
                        policy.describe()
                    ))
                })?;
                d.path = real.display().to_string();
            }
        }
    }
    Ok(())
}

/// Checks an exec request and turns it into a library command (+ stdin bytes).
pub fn command_of(req: &ExecRequest) -> ApiResult<(capsa::Command, Option<Vec<u8>>)> {
    use base64::Engine as _;
    let Some(program) = req.argv.first() else {
        return Err(ApiError::bad_request("argv is empty")
            .fix("give the program and its arguments, e.g. [\"ls\", \"-l\"]"));
    };
    if program.is_empty() {
        return Err(ApiError::bad_request("argv[0] is empty").fix("name a program"));
    }
    if req.argv.len() > MAX_ARGV || req.argv.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::bad_request(format!(
            "argv has more than {MAX_ARGV} entries or a NUL byte"
        )));
    }
    validate_env(&req.env)?;
    if let Some(c) = &req.cwd {
        validate_guest_path("cwd", c)?;
    }
    let mut cmd = capsa::Command::new(program).args(req.argv[1..].iter().cloned());
    for (k, v) in &req.env {
        cmd = cmd.env(k, v);
    }
    if let Some(c) = &req.cwd {
        cmd = cmd.current_dir(c);
    }
    if let Some(t) = req.timeout_ms {
        if t == 0 || t > MAX_EXEC_TIMEOUT_MS {
            return Err(
                ApiError::bad_request(format!("timeout_ms {t} is out of range")).fix(format!(
                    "give 1 to {MAX_EXEC_TIMEOUT_MS} ms, or leave it out"
                )),
            );
        }
        cmd = cmd.timeout(Duration::from_millis(t));
    }
    if req.tty {
        let rows = req.rows.unwrap_or(24).max(1);
        let cols = req.cols.unwrap_or(80).max(1);
        cmd = cmd.pty(rows, cols);
    }
    let stdin = match &req.stdin {
        Some(s) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| {
                    ApiError::bad_request(format!("stdin is not valid base64: {e}"))
                        .fix("encode stdin with standard base64 (with padding)")
                })?,
        ),
        None => None,
    };
    if stdin.is_some() || req.interactive {
        cmd = cmd.stdin_piped();
    }
    Ok((cmd, stdin))
}

impl LocalService {
    /// The service over the state root `root` (default: the library's),
    /// with named snapshots in `snapshots` (default: the library's store).
    /// Pools are off until [`LocalService::with_pools`]; host paths are the
    /// caller's own until [`LocalService::with_host_paths`].
    pub fn new(root: Option<PathBuf>, snapshots: Option<PathBuf>) -> Self {
        let reg = Sandboxes::new(root);
        let attached: Attached = Arc::new(tokio::sync::Mutex::new(HashMap::new()));
        let pools = Pools::new(
            reg.clone(),
            Snapshots::new(snapshots),
            attached.clone(),
            1,
            pools::DEFAULT_MAX_POOL_MEMBERS,
        );
        Self {
            reg,
            attached,
            attaching: Default::default(),
            locks: Arc::new(NameLocks::default()),
            pools,
            pools_enabled: false,
            host_paths: HostPaths::Caller,
        }
    }

    /// Keeps warm pools (a long-lived process: the daemon), with at most
    /// `max_members` ready members across all pools.
    pub fn with_pools(mut self, max_members: usize) -> Self {
        self.pools.set_max_members(max_members);
        self.pools_enabled = true;
        self
    }

    /// Lets callers attach only the host files `policy` allows (an API's clients).
    pub fn with_host_paths(mut self, policy: capsa_core::HostPathPolicy) -> Self {
        self.host_paths = HostPaths::Policy(policy);
        self
    }

    /// The registry this service acts on.
    pub fn registry(&self) -> &Sandboxes {
        &self.reg
    }

    /// Starts the pools: those saved by an earlier daemon (`pools.json`),
    /// then `flags` (which replace saved ones of the same name); ready
    /// members left by an earlier daemon are adopted, those of pools that are
    /// gone are removed. Must run inside the runtime.
    pub fn start_pools(&self, flags: Vec<PoolConfig>) -> Result<(), String> {
        if !self.pools_enabled {
            return if flags.is_empty() {
                Ok(())
            } else {
                Err("pools need a long-lived service (LocalService::with_pools)".into())
            };
        }
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

    /// Logs dead sandboxes found at start-up (they stay listed as dead until removed).
    pub fn report_dead(&self) {
        if let Ok(list) = self.reg.list() {
            for r in list.iter().filter(|r| r.state == capsa::SandboxState::Dead) {
                tracing::warn!(sandbox = %r.name, dir = %r.dir.display(), "sandbox is dead (its monitor is gone); remove it to clean up");
            }
        }
    }

    fn record(&self, name: &str) -> ApiResult<SandboxRecord> {
        validate_name(name)?;
        self.reg
            .get(name)
            .map_err(|e| ApiError::from_capsa(&format!("sandbox {name:?}"), &e))
    }

    fn pools_on(&self) -> ApiResult<()> {
        if self.pools_enabled {
            Ok(())
        } else {
            Err(
                ApiError::unavailable("warm pools live in capsad, which keeps them filled")
                    .fix("run capsad and talk to it (capsa --host unix:///path/to/capsad.sock)"),
            )
        }
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
                            format!("remove it (`capsa rm {name}`, DELETE /v1/sandboxes/{name})")
                        }
                        _ => format!(
                            "start it (`capsa start {name}`, POST /v1/sandboxes/{name}/start)"
                        ),
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

    /// Refuses the network verbs on a sandbox made without a NIC (a NIC
    /// cannot be added to a running VM).
    fn has_display(&self, name: &str) -> ApiResult<capsa_core::DisplaySpec> {
        let rec = self.record(name)?;
        rec.spec.as_ref().and_then(|s| s.display).ok_or_else(|| {
            ApiError::conflict(format!("sandbox {name:?} has no display")).fix(
                "create the sandbox with a display (--display 1280x800; `display` in the create request)",
            )
        })
    }

    fn has_network(&self, name: &str) -> ApiResult<()> {
        let rec = self.record(name)?;
        if rec.spec.as_ref().is_some_and(|s| s.network.is_none()) {
            return Err(ApiError::conflict(format!("sandbox {name:?} has no network"))
                .fix("create the sandbox with a network (--network public or deny; `network` in the create request)"));
        }
        Ok(())
    }

    async fn forget(&self, name: &str) -> Option<Arc<Sandbox>> {
        self.attaching.lock().await.remove(name);
        self.attached.lock().await.remove(name)
    }

    async fn create_locked(&self, name: &str, req: &CreateSandboxRequest) -> ApiResult<()> {
        if self.reg.get(name).is_ok() {
            return Err(ApiError::conflict(format!("sandbox {name:?} exists"))
                .fix("pick another name, or remove the existing sandbox first"));
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
            return Ok(());
        }
        let sb = self
            .reg
            .create(req.builder(name))
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
        Ok(())
    }
}

#[async_trait]
impl Service for LocalService {
    async fn health(&self) -> ApiResult<Health> {
        Ok(Health {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            backend: "monitor".into(),
            sandboxes: self.list().await?.len(),
        })
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

    async fn create(&self, mut req: CreateSandboxRequest) -> ApiResult<SandboxInfo> {
        let name = req.name.clone().unwrap_or_else(generated_name);
        validate_name(&name)?;
        validate_create(&req)?;
        resolve_disks(&mut req, &self.host_paths)?;
        if let Some(d) = &mut req.disk_upper {
            match &self.host_paths {
                HostPaths::Caller => {
                    d.path = std::path::absolute(&d.path)
                        .map_err(|e| ApiError::bad_request(format!("disk upper {}: {e}", d.path)))?
                        .display()
                        .to_string();
                }
                HostPaths::Policy(_) => {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        ErrorCode::PathNotAllowed,
                        "a disk upper layer names a host file capsad would create; API clients cannot ask for one",
                    )
                    .fix("use the tmpfs upper (tmpfs_upper_mib), or create the sandbox with the CLI on the host (no --host)"));
                }
            }
        }
        for s in &mut req.shares {
            resolve_share(s, &self.host_paths)?;
        }
        let _g = self.locks.try_lock(&name)?;
        self.create_locked(&name, &req).await?;
        self.get(&name).await
    }

    async fn start(&self, name: &str) -> ApiResult<SandboxInfo> {
        let _g = self.locks.try_lock(name)?;
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

    async fn stop(&self, name: &str, grace: Option<Duration>) -> ApiResult<SandboxInfo> {
        let grace = grace.unwrap_or(capsa::DEFAULT_STOP_TIMEOUT);
        if grace > MAX_STOP_GRACE {
            return Err(ApiError::bad_request(format!(
                "a stop grace of {}s is too long",
                grace.as_secs()
            ))
            .fix(format!("give at most {}s", MAX_STOP_GRACE.as_secs())));
        }
        let _g = self.locks.try_lock(name)?;
        if !self.record(name)?.is_live() {
            return self.get(name).await;
        }
        // The monitor alone: a stuck agent must not delay a stop.
        let r = self.reg.stop(name, grace).await;
        self.forget(name).await;
        r.map_err(|e| ApiError::from_capsa(&format!("stopping sandbox {name:?}"), &e))?;
        self.get(name).await
    }

    async fn kill(&self, name: &str) -> ApiResult<SandboxInfo> {
        let _g = self.locks.try_lock(name)?;
        if !self.record(name)?.is_live() {
            return self.get(name).await;
        }
        let r = self.reg.kill(name).await;
        self.forget(name).await;
        r.map_err(|e| ApiError::from_capsa(&format!("killing sandbox {name:?}"), &e))?;
        self.get(name).await
    }

    async fn remove(&self, name: &str, force: bool) -> ApiResult<()> {
        let _g = self.locks.try_lock(name)?;
        let rec = self.record(name)?;
        if rec.is_live() && !force {
            return Err(
                ApiError::conflict(format!("sandbox {name:?} is {}", rec.state)).fix(format!(
                    "stop it first, or force it (`capsa rm -f {name}`, DELETE ...?force=true) to kill it"
                )),
            );
        }
        self.forget(name).await;
        self.reg
            .remove(name, force)
            .await
            .map_err(|e| ApiError::from_capsa(&format!("removing sandbox {name:?}"), &e))
    }

    async fn exec(&self, name: &str, req: ExecRequest) -> ApiResult<ExecSession> {
        let (cmd, stdin) = command_of(&req)?;
        let sb = self.running(name).await?;
        let child = match sb.spawn(&cmd).await {
            Ok(c) => c,
            Err(e) => {
                // A stale attachment (the VM was restarted elsewhere): drop it.
                if matches!(e, capsa::Error::Agent(capsa::AgentClientError::Connect(_))) {
                    self.forget(name).await;
                }
                return Err(ApiError::from_spawn(&e));
            }
        };
        Ok(exec_session(child, stdin, req.interactive, Box::new(sb)))
    }

    async fn files(&self, name: &str) -> ApiResult<Files> {
        Ok(Box::new(self.running(name).await?.files()))
    }

    async fn console_log(
        &self,
        name: &str,
        follow: bool,
    ) -> ApiResult<BoxStream<'static, ApiResult<Bytes>>> {
        let rec = self.record(name)?;
        let log = rec.dir.join(capsa_vmm::state::files::CONSOLE_LOG);
        let file = tokio::fs::File::open(&log).await.map_err(|e| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                format!("console log of {name:?} ({}): {e}", log.display()),
            )
            .fix("the log appears once the sandbox has booted")
        })?;
        let reg = self.reg.clone();
        let name = name.to_string();
        let stream = futures::stream::unfold(Some(file), move |file| {
            let (reg, name, log) = (reg.clone(), name.clone(), log.clone());
            async move {
                let mut file = file?;
                let mut buf = vec![0u8; CHUNK];
                let mut last_look = false;
                loop {
                    match file.read(&mut buf).await {
                        Ok(0) if !follow || last_look => return None,
                        Ok(0) => {
                            let live = reg.get(&name).map(|r| r.is_live()).unwrap_or(false);
                            if !live || tokio::fs::metadata(&log).await.is_err() {
                                // One last read catches what was written before the end.
                                last_look = true;
                                continue;
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Ok(n) => {
                            buf.truncate(n);
                            return Some((Ok(Bytes::from(buf)), Some(file)));
                        }
                        Err(e) => {
                            let e = ApiError::internal(format!("reading the console log: {e}"));
                            return Some((Err(e), None));
                        }
                    }
                }
            }
        });
        Ok(Box::pin(stream))
    }

    async fn console_attach(&self, name: &str) -> ApiResult<ConsoleSession> {
        let rec = self.record(name)?;
        let sock = rec.dir.join(capsa_vmm::state::files::CONSOLE_SOCK);
        let stream = tokio::net::UnixStream::connect(&sock).await.map_err(|e| {
            ApiError::unavailable(format!("the console of {name:?} ({}): {e}", sock.display())).fix(
                format!("is it running? see `capsa ps`; start it with `capsa start {name}`"),
            )
        })?;
        Ok(socket_session(stream))
    }

    async fn snapshot_create(&self, name: &str, snapshot: &str) -> ApiResult<SnapshotInfo> {
        validate_snapshot_name(snapshot)?;
        let _g = self.locks.try_lock(name)?;
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
        validate_snapshot_name(snapshot)?;
        let _g = self.locks.try_lock(&format!("snapshot/{snapshot}"))?;
        if let Some(p) = self.pools.uses_snapshot(snapshot) {
            return Err(ApiError::conflict(format!(
                "pool {p:?} restores its members from snapshot {snapshot:?}"
            ))
            .fix(format!("delete pool {p} first")));
        }
        self.pools
            .snapshots()
            .remove(snapshot)
            .map_err(|e| ApiError::from_capsa(&format!("removing snapshot {snapshot:?}"), &e))
    }

    async fn pool_create(&self, req: CreatePoolRequest) -> ApiResult<PoolInfo> {
        self.pools_on()?;
        self.pools.create(req, true)
    }

    async fn pool_list(&self) -> ApiResult<Vec<PoolInfo>> {
        self.pools_on()?;
        Ok(self.pools.list())
    }

    async fn pool_get(&self, name: &str) -> ApiResult<PoolInfo> {
        self.pools_on()?;
        validate_pool_name(name)?;
        self.pools.get(name)
    }

    async fn pool_remove(&self, name: &str) -> ApiResult<()> {
        self.pools_on()?;
        validate_pool_name(name)?;
        self.pools.remove(name).await
    }

    async fn pool_acquire(&self, pool: &str, req: AcquireRequest) -> ApiResult<SandboxInfo> {
        self.pools_on()?;
        validate_pool_name(pool)?;
        let _g = match &req.name {
            Some(n) => {
                validate_name(n)?;
                Some(self.locks.try_lock(n)?)
            }
            None => None,
        };
        let name = self.pools.acquire(pool, req.name.as_deref()).await?;
        self.get(&name).await
    }

    async fn share_add(&self, name: &str, mut share: ShareRequest) -> ApiResult<Vec<ShareRequest>> {
        check_share_guest(&share.guest)?;
        resolve_share(&mut share, &self.host_paths)?;
        let _g = self.locks.try_lock(name)?;
        let sb = self.running(name).await?;
        sb.share_add(share.spec())
            .await
            .map_err(|e| ApiError::from_capsa(&format!("sharing a directory with {name:?}"), &e))?;
        let l = sb
            .shares()
            .await
            .map_err(|e| ApiError::from_capsa(&format!("listing the shares of {name:?}"), &e))?;
        Ok(l.iter().map(ShareRequest::of).collect())
    }

    async fn share_remove(&self, name: &str, guest: &str) -> ApiResult<()> {
        capsa_core::check_guest_path(guest).map_err(|e| {
            ApiError::bad_request(format!("share guest path: {e}"))
                .fix("name the guest path the share is mounted at, e.g. /work")
        })?;
        let _g = self.locks.try_lock(name)?;
        let sb = self.running(name).await?;
        sb.share_remove(guest)
            .await
            .map(|_| ())
            .map_err(|e| ApiError::from_capsa(&format!("detaching {guest} from {name:?}"), &e))
    }

    async fn share_list(&self, name: &str) -> ApiResult<Vec<ShareRequest>> {
        let sb = self.running(name).await?;
        let l = sb
            .shares()
            .await
            .map_err(|e| ApiError::from_capsa(&format!("listing the shares of {name:?}"), &e))?;
        Ok(l.iter().map(ShareRequest::of).collect())
    }

    async fn network_policy(&self, name: &str) -> ApiResult<NetworkPolicyBody> {
        self.has_network(name)?;
        let sb = self.running(name).await?;
        let policy = sb
            .network_policy()
            .await
            .map_err(|e| ApiError::from_capsa(&format!("the network policy of {name:?}"), &e))?;
        Ok(NetworkPolicyBody { policy })
    }

    async fn set_network_policy(&self, name: &str, body: NetworkPolicyBody) -> ApiResult<()> {
        capsa_core::NetworkSpec {
            policy: body.policy.clone(),
            ..Default::default()
        }
        .validate()
        .map_err(core_err)?;
        self.has_network(name)?;
        let sb = self.running(name).await?;
        sb.set_network_policy(body.policy).await.map_err(|e| {
            ApiError::from_capsa(&format!("setting the network policy of {name:?}"), &e)
        })
    }

    async fn network_log(&self, name: &str) -> ApiResult<NetworkLog> {
        self.has_network(name)?;
        let sb = self.running(name).await?;
        let decisions = sb
            .network_log()
            .await
            .map_err(|e| ApiError::from_capsa(&format!("the network log of {name:?}"), &e))?;
        Ok(NetworkLog { decisions })
    }

    async fn port_add(&self, name: &str, port: PortForwardBody) -> ApiResult<Vec<PortForwardBody>> {
        let f = port.forward()?;
        self.has_network(name)?;
        let _g = self.locks.try_lock(name)?;
        let sb = self.running(name).await?;
        sb.port_add(f).await.map_err(|e| {
            ApiError::from_capsa(
                &format!("forwarding {}:{} into {name:?}", f.host_ip, f.host_port),
                &e,
            )
        })?;
        self.port_list(name).await
    }

    async fn port_remove(&self, name: &str, port: PortQuery) -> ApiResult<()> {
        let f = PortForwardBody {
            host_ip: port.host_ip,
            host_port: port.host_port,
            guest_port: 1,
        }
        .forward()?;
        self.has_network(name)?;
        let _g = self.locks.try_lock(name)?;
        let sb = self.running(name).await?;
        let now = sb
            .ports()
            .await
            .map_err(|e| ApiError::from_capsa(&format!("the forwards of {name:?}"), &e))?;
        if !now
            .iter()
            .any(|g| g.host_ip == f.host_ip && g.host_port == f.host_port)
        {
            return Err(ApiError::not_found(format!(
                "{}:{} is not forwarded into {name:?}",
                f.host_ip, f.host_port
            ))
            .fix("list the forwards with `capsa port ls NAME` (GET /v1/sandboxes/NAME/ports)"));
        }
        sb.port_remove(f.host_ip, f.host_port)
            .await
            .map(|_| ())
            .map_err(|e| ApiError::from_capsa(&format!("removing a forward of {name:?}"), &e))
    }

    async fn port_list(&self, name: &str) -> ApiResult<Vec<PortForwardBody>> {
        self.has_network(name)?;
        let sb = self.running(name).await?;
        let l = sb
            .ports()
            .await
            .map_err(|e| ApiError::from_capsa(&format!("the forwards of {name:?}"), &e))?;
        Ok(l.iter().map(PortForwardBody::of).collect())
    }

    async fn screen_info(&self, name: &str) -> ApiResult<ScreenInfo> {
        let d = self.has_display(name)?;
        Ok(ScreenInfo {
            width: d.width,
            height: d.height,
        })
    }

    async fn screenshot(&self, name: &str, req: ScreenshotRequest) -> ApiResult<ScreenshotBody> {
        self.has_display(name)?;
        let sb = self.running(name).await?;
        let screen = sb.screen().map_err(|e| ApiError::from_capsa(name, &e))?;
        let shot = screen
            .screenshot_with(&req.options())
            .await
            .map_err(|e| ApiError::from_capsa(&format!("a screenshot of {name:?}"), &e))?;
        Ok(ScreenshotBody::of(&shot))
    }

    async fn screen_actions(
        &self,
        name: &str,
        req: ScreenActionsRequest,
    ) -> ApiResult<ScreenActionsResponse> {
        if req
            .screenshot_after_ms
            .is_some_and(|ms| ms > capsa::screen::MAX_WAIT_MS)
        {
            return Err(ApiError::bad_request(format!(
                "screenshot_after_ms {} is too long",
                req.screenshot_after_ms.unwrap_or_default()
            ))
            .fix(format!("settle at most {} ms", capsa::screen::MAX_WAIT_MS)));
        }
        self.has_display(name)?;
        let sb = self.running(name).await?;
        let screen = sb.screen().map_err(|e| ApiError::from_capsa(name, &e))?;
        screen
            .perform(&req.actions)
            .await
            .map_err(|e| ApiError::from_capsa(&format!("screen actions on {name:?}"), &e))?;
        let screenshot = match req.screenshot_after_ms {
            Some(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                let opts = req.screenshot.unwrap_or_default().options();
                let shot = screen
                    .screenshot_with(&opts)
                    .await
                    .map_err(|e| ApiError::from_capsa(&format!("a screenshot of {name:?}"), &e))?;
                Some(ScreenshotBody::of(&shot))
            }
            None => None,
        };
        Ok(ScreenActionsResponse {
            performed: req.actions.len(),
            screenshot,
        })
    }

    async fn screen_vnc(&self, name: &str, input: bool) -> ApiResult<ConsoleSession> {
        self.has_display(name)?;
        let rec = self.record(name)?;
        let sock = rec.dir.join(capsa_vmm::state::files::VNC_SOCK);
        let stream = tokio::net::UnixStream::connect(&sock).await.map_err(|e| {
            ApiError::unavailable(format!("the screen of {name:?} ({}): {e}", sock.display())).fix(
                format!(
                "is it running under a monitor? see `capsa ps`; start it with `capsa start {name}`"
            ),
            )
        })?;
        let session = socket_session(stream);
        Ok(if input {
            session
        } else {
            crate::viewer::view_only(session)
        })
    }

    async fn image_pull(&self, req: PullRequest) -> ApiResult<mpsc::Receiver<PullEvent>> {
        images::pull(req).await
    }

    async fn image_list(&self) -> ApiResult<Vec<ImageInfo>> {
        let store = images::store()?;
        let list = tokio::task::spawn_blocking(move || store.list())
            .await
            .map_err(|e| ApiError::internal(format!("listing images: {e}")))?
            .map_err(|e| images::oci_err("listing images", e))?;
        Ok(list.iter().map(images::info_of).collect())
    }

    async fn image_get(&self, image: &str) -> ApiResult<ImageInfo> {
        validate_image_ref(image)?;
        let store = images::store()?;
        let what = image.to_string();
        let rec = tokio::task::spawn_blocking(move || store.find(&what))
            .await
            .map_err(|e| ApiError::internal(format!("finding {image}: {e}")))?
            .map_err(|e| images::oci_err(&format!("image {image:?}"), e))?;
        Ok(images::info_of(&rec))
    }

    async fn image_remove(&self, image: &str) -> ApiResult<ImageInfo> {
        validate_image_ref(image)?;
        let store = images::store()?;
        let what = image.to_string();
        let rec = tokio::task::spawn_blocking(move || store.remove(&what))
            .await
            .map_err(|e| ApiError::internal(format!("removing {image}: {e}")))?
            .map_err(|e| images::oci_err(&format!("removing image {image:?}"), e))?;
        Ok(images::info_of(&rec))
    }
}

/// Runs a started command as an [`ExecSession`]: output and the exit go out
/// on one channel, stdin (when `interactive`; else `stdin` is written and
/// closed) and controls come in on another. Ends when the command does or the
/// session is dropped (then dropping the child makes the agent kill the
/// process group). `keep` lives as long as the command runs.
pub fn exec_session(
    mut child: capsa::ExecChild,
    stdin: Option<Vec<u8>>,
    interactive: bool,
    keep: Box<dyn Send + Sync>,
) -> ExecSession {
    let (out_tx, out_rx) = mpsc::channel::<ExecChunk>(16);
    let mut stdin_w = child.stdin();
    let preset = if interactive { None } else { stdin_w.take() };
    if let (Some(data), Some(mut s)) = (stdin, preset) {
        tokio::spawn(async move {
            // A process may exit without reading all of stdin; not an error.
            let _ = s.write_all(&data).await;
            let _ = s.shutdown().await;
        });
    }
    // Stdin is written by its own task, so that a command that does not read
    // its input holds up only further input, never output or controls.
    let stdin_tx = stdin_w.map(|mut s| {
        let (tx, mut rx) = mpsc::channel::<Bytes>(4);
        tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                if s.write_all(&b).await.is_err() {
                    return;
                }
            }
            // StdinEof, or the session went away.
            let _ = s.shutdown().await;
        });
        tx
    });
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<ExecControl>(64);
    tokio::spawn(async move {
        let _keep = keep;
        let mut pumps = {
            let (o, e) = (child.stdout(), child.stderr());
            let tx = out_tx.clone();
            tokio::spawn(async move {
                tokio::join!(pump(o, tx.clone(), false), pump(e, tx, true));
            })
        };
        let mut outputs_done = false;
        let mut stdin_tx = stdin_tx;
        let mut controls_open = true;
        let ended = loop {
            tokio::select! {
                // The exit is read only after all output has gone out.
                _ = &mut pumps, if !outputs_done => outputs_done = true,
                st = child.wait(), if outputs_done => break Some(st),
                c = ctl_rx.recv(), if controls_open => match c {
                    Some(ExecControl::Stdin(b)) => {
                        if let Some(tx) = &stdin_tx {
                            // Back-pressure: waits while the command does not read.
                            if tx.send(b).await.is_err() { stdin_tx = None; }
                        }
                    }
                    Some(ExecControl::StdinEof) => stdin_tx = None,
                    // A failed resize or signal is that control's problem,
                    // never the session's.
                    Some(ExecControl::Resize { rows, cols }) => {
                        if let Err(e) = child.resize(rows, cols).await {
                            tracing::debug!("exec resize: {e}");
                        }
                    }
                    Some(ExecControl::Signal(n)) => {
                        if let Err(e) = child.signal(n).await {
                            tracing::debug!("exec signal {n}: {e}");
                        }
                    }
                    None => controls_open = false,
                },
                _ = out_tx.closed() => break None,
            }
        };
        if !outputs_done {
            pumps.abort();
        }
        let Some(st) = ended else { return };
        let ev = match st {
            Ok(s) => ExecChunk::Exit(s),
            Err(e) => ExecChunk::Error(ApiError::from_capsa("exec", &capsa::Error::Agent(e))),
        };
        let _ = out_tx.send(ev).await;
    });
    ExecSession {
        output: out_rx,
        control: Some(ctl_tx),
        _keep: Box::new(()),
    }
}

/// Copies one output stream into the session; returns when it ends or the
/// session is gone.
async fn pump(out: Option<capsa::ExecOutput>, tx: mpsc::Sender<ExecChunk>, stderr: bool) {
    let Some(mut out) = out else { return };
    let mut buf = vec![0u8; CHUNK];
    loop {
        match out.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                let b = Bytes::copy_from_slice(&buf[..n]);
                let ev = if stderr {
                    ExecChunk::Stderr(b)
                } else {
                    ExecChunk::Stdout(b)
                };
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::debug!("exec output: {e}");
                return;
            }
        }
    }
}

/// A byte session over a monitor's Unix socket (console, VNC), as the
/// service's channel pair; it ends when either side does.
fn socket_session(stream: tokio::net::UnixStream) -> ConsoleSession {
    let (mut r, mut w) = stream.into_split();
    let (out_tx, out_rx) = mpsc::channel::<Bytes>(16);
    let (in_tx, mut in_rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            tokio::select! {
                n = r.read(&mut buf) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => if out_tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() { break },
                },
                b = in_rx.recv() => match b {
                    Some(b) => if w.write_all(&b).await.is_err() { break },
                    None => break,
                },
            }
        }
    });
    ConsoleSession {
        output: out_rx,
        input: in_tx,
    }
}
