//! Warm pools in the daemon: each pool keeps `size` sandboxes restored,
//! running and idle, so an acquire is a handover (a label flip and a state
//! read), not a boot.
//!
//! Members are ordinary monitor-backed, keep-running sandboxes in the state
//! root, named `<pool>-<8 hex>` from birth (their directories hold their
//! sockets, so they are never renamed), labelled in their `sandbox.json` with
//! `pool=<pool>` and `pool_state=ready|acquired`. That label is the only
//! record of membership: `capsa ps` shows it, and a restarted daemon re-adopts
//! the ready members of the pools it is configured with and removes the ready
//! members of pools it no longer has. Handed-out members belong to their
//! user: released with the normal `DELETE /v1/sandboxes/{name}` (destroyed,
//! never reused), untouched by pool deletion.
//!
//! Members restore from the pool's base snapshot: a named snapshot from the
//! store, or the library's per-spec base snapshot (`capsa::base_snapshot`,
//! made once by booting one sandbox of the pool's spec). Restores of all
//! pools share one semaphore (default one at a time: they compete for the
//! same cores as the members' guests).
//!
//! Pool configurations made through the API are saved in
//! `<state root>/pools.json`, so they survive a daemon restart like
//! `--pool` flags do.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capsa::{Capsa, Sandbox, SandboxState, Sandboxes, Snapshots};
use tokio::sync::{Notify, Semaphore};

use crate::error::{ApiError, ApiResult};
use crate::types::{validate_name, CreatePoolRequest, PoolInfo, MAX_POOL_NAME_LEN, MAX_POOL_SIZE};

/// Label naming a sandbox's pool.
pub const LABEL_POOL: &str = "pool";
/// Label holding a member's pool state (`ready` or `acquired`).
pub const LABEL_POOL_STATE: &str = "pool_state";
/// File (in the state root) keeping pools created through the API.
pub const POOLS_FILE: &str = "pools.json";
/// How long an acquire waits for a member when the pool is empty.
pub const ACQUIRE_WAIT: Duration = Duration::from_secs(60);
/// Longest pause between failed restores.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Attached sandboxes shared with the monitor backend's exec cache, so the
/// first exec into a handed-out member reuses the restore's connection.
pub type Attached = Arc<tokio::sync::Mutex<HashMap<String, Arc<Sandbox>>>>;

/// A pool's configuration (flag, API request, or `pools.json` entry): the
/// API's own request type, so a pool means the same from every face.
pub type PoolConfig = CreatePoolRequest;

/// Parses `NAME=SIZE[,memory=MIB][,cpus=N][,snapshot=NAME]` (`capsad --pool`).
pub fn parse_pool_flag(s: &str) -> Result<PoolConfig, String> {
    let fix = "fix: write --pool NAME=SIZE[,memory=MIB][,cpus=N][,snapshot=SNAPSHOT][,image=REF], e.g. --pool py=2,memory=256";
    let mut parts = s.split(',');
    let head = parts.next().unwrap_or_default();
    let (name, size) = head
        .split_once('=')
        .ok_or_else(|| format!("--pool {s:?}: no NAME=SIZE; {fix}"))?;
    let size = size
        .parse::<usize>()
        .map_err(|_| format!("--pool {s:?}: size {size:?} is not a number; {fix}"))?;
    let mut cfg = PoolConfig {
        name: name.to_string(),
        size,
        cpus: None,
        memory_mib: None,
        snapshot: None,
        image: None,
    };
    for kv in parts {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("--pool {s:?}: {kv:?} is not KEY=VALUE; {fix}"))?;
        let num = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("--pool {s:?}: {k}={v:?} is not a number; {fix}"))
        };
        match k {
            "memory" | "memory_mib" => cfg.memory_mib = Some(num(v)?),
            "cpus" => {
                cfg.cpus = Some(
                    u32::try_from(num(v)?)
                        .map_err(|_| format!("--pool {s:?}: cpus out of range"))?,
                )
            }
            "snapshot" => cfg.snapshot = Some(v.to_string()),
            "image" => cfg.image = Some(v.to_string()),
            _ => return Err(format!("--pool {s:?}: unknown key {k:?}; {fix}")),
        }
    }
    Ok(cfg)
}

#[derive(Default)]
struct PoolState {
    ready: VecDeque<String>,
    starting: usize,
    acquired_total: u64,
    restored_total: u64,
    failed_total: u64,
    preparing: bool,
    last_error: Option<String>,
    failing: bool,
    /// The snapshot members restore from, once known.
    base: Option<PathBuf>,
}

struct Pool {
    cfg: PoolConfig,
    st: Mutex<PoolState>,
    changed: Notify,
    worker: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn info(&self) -> PoolInfo {
        let st = self.lock();
        PoolInfo {
            name: self.cfg.name.clone(),
            size: self.cfg.size,
            ready: st.ready.len(),
            starting: st.starting,
            acquired_total: st.acquired_total,
            restored_total: st.restored_total,
            failed_total: st.failed_total,
            cpus: self.cfg.cpus,
            memory_mib: self.cfg.memory_mib,
            snapshot: self.cfg.snapshot.clone(),
            status: if st.preparing {
                "preparing"
            } else if st.failing {
                "failing"
            } else {
                "ready"
            }
            .into(),
            last_error: st.last_error.clone(),
        }
    }
}

struct Shared {
    reg: Sandboxes,
    snapshots: Snapshots,
    attached: Attached,
    restores: Semaphore,
}

/// Every pool of the daemon.
pub struct Pools {
    shared: Arc<Shared>,
    pools: Mutex<BTreeMap<String, Arc<Pool>>>,
    config_file: PathBuf,
    max_members: usize,
}

/// Default bound on the ready members of all pools together (each is a
/// running VM): a client cannot make the daemon hold more than this.
pub const DEFAULT_MAX_POOL_MEMBERS: usize = 16;

/// 8 random hex digits (generated sandbox names, pool members).
pub fn random_hex() -> String {
    let mut b = [0u8; 4];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok();
    if !ok {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ std::process::id())
            .unwrap_or(0);
        b = n.to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Pools {
    /// The pools over `reg` (members), `snapshots` (named snapshots) and the
    /// backend's exec cache; `parallel` restores may run at once (all pools).
    pub fn new(
        reg: Sandboxes,
        snapshots: Snapshots,
        attached: Attached,
        parallel: usize,
        max_members: usize,
    ) -> Self {
        let config_file = reg.root().path().join(POOLS_FILE);
        Self {
            max_members,
            shared: Arc::new(Shared {
                reg,
                snapshots,
                attached,
                restores: Semaphore::new(parallel.max(1)),
            }),
            pools: Mutex::new(BTreeMap::new()),
            config_file,
        }
    }

    /// Sets the most ready members across all pools.
    pub fn set_max_members(&mut self, max: usize) {
        self.max_members = max;
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Pool>>> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks a configuration without creating anything.
    pub fn validate(&self, cfg: &PoolConfig) -> ApiResult<()> {
        validate_name(&cfg.name)?;
        if cfg.name.len() > MAX_POOL_NAME_LEN {
            return Err(ApiError::new(
                crate::error::StatusCode::BAD_REQUEST,
                crate::error::ErrorCode::InvalidName,
                format!(
                    "pool name {:?} is longer than {MAX_POOL_NAME_LEN} bytes",
                    cfg.name
                ),
            )
            .fix(format!(
                "members are named <pool>-<8 hex>: use at most {MAX_POOL_NAME_LEN} characters"
            )));
        }
        let sample = self
            .shared
            .reg
            .root()
            .sandbox_dir(&format!("{}-00000000", cfg.name));
        capsa_vmm::state::check_socket_paths(&sample).map_err(|e| {
            ApiError::bad_request(format!("pool {:?}: {e}", cfg.name))
                .fix("use a shorter pool name, or a state directory with a shorter path")
        })?;
        if !(1..=MAX_POOL_SIZE).contains(&cfg.size) {
            return Err(
                ApiError::bad_request(format!("pool size {} is out of range", cfg.size)).fix(
                    format!("give 1 to {MAX_POOL_SIZE} (each member is a running VM)"),
                ),
            );
        }
        if let Some(c) = cfg.cpus {
            capsa_core::check_cpus(c).map_err(crate::error::core_err)?;
        }
        if let Some(m) = cfg.memory_mib {
            capsa_core::check_memory_mib(m).map_err(crate::error::core_err)?;
        }
        if let Some(i) = &cfg.image {
            if i.is_empty() || i.len() > 512 || i.chars().any(|c| c.is_control()) {
                return Err(ApiError::bad_request("image is not an image reference")
                    .fix("give a name or digest from `capsa image ls`"));
            }
            if cfg.snapshot.is_some() {
                return Err(ApiError::bad_request(
                    "a pool from a snapshot takes its root filesystem from the snapshot",
                )
                .fix("drop image, or drop snapshot"));
            }
        }
        if let Some(s) = &cfg.snapshot {
            if cfg.cpus.is_some() || cfg.memory_mib.is_some() {
                return Err(ApiError::bad_request(
                    "a pool from a snapshot takes cpus and memory from the snapshot",
                )
                .fix("drop cpus/memory_mib, or drop snapshot"));
            }
            self.shared
                .snapshots
                .get(s)
                .map_err(|e| ApiError::from_capsa(&format!("pool {:?}", cfg.name), &e))?;
        }
        Ok(())
    }

    /// Creates (and starts filling) a pool; `persist` records it in `pools.json`.
    pub fn create(&self, cfg: PoolConfig, persist: bool) -> ApiResult<PoolInfo> {
        self.validate(&cfg)?;
        let pool = {
            let mut map = self.map();
            if map.contains_key(&cfg.name) {
                return Err(
                    ApiError::conflict(format!("pool {:?} exists", cfg.name)).fix(format!(
                        "pick another name, or DELETE /v1/pools/{} first",
                        cfg.name
                    )),
                );
            }
            let held: usize = map.values().map(|p| p.cfg.size).sum();
            if held + cfg.size > self.max_members {
                return Err(ApiError::conflict(format!(
                    "pool {:?} of {} would exceed the daemon's {} pool members ({held} held by other pools)",
                    cfg.name, cfg.size, self.max_members
                ))
                .fix("delete a pool, make this one smaller, or start capsad with a larger --max-pool-members"));
            }
            let pool = Arc::new(Pool {
                cfg: cfg.clone(),
                st: Mutex::new(PoolState {
                    preparing: true,
                    ..Default::default()
                }),
                changed: Notify::new(),
                worker: Mutex::new(None),
            });
            map.insert(cfg.name.clone(), pool.clone());
            pool
        };
        self.adopt(&pool);
        let worker = tokio::spawn(fill(self.shared.clone(), pool.clone()));
        *pool.worker.lock().unwrap_or_else(|p| p.into_inner()) = Some(worker);
        if persist {
            self.save();
        }
        tracing::info!(pool = %cfg.name, size = cfg.size, "pool created");
        Ok(pool.info())
    }

    /// Takes over the ready members a previous daemon left running; removes
    /// the ones that are no longer usable.
    fn adopt(&self, pool: &Pool) {
        let Ok(list) = self.shared.reg.list() else {
            return;
        };
        for rec in list {
            if Sandboxes::label(&rec, LABEL_POOL) != Some(pool.cfg.name.as_str())
                || Sandboxes::label(&rec, LABEL_POOL_STATE) != Some("ready")
            {
                continue;
            }
            let mut st = pool.lock();
            if rec.state == SandboxState::Running && st.ready.len() < pool.cfg.size {
                tracing::info!(pool = %pool.cfg.name, sandbox = %rec.name, "adopting a ready member");
                st.ready.push_back(rec.name);
            } else {
                drop(st);
                tracing::info!(pool = %pool.cfg.name, sandbox = %rec.name, state = %rec.state, "removing a stale or surplus member");
                let reg = self.shared.reg.clone();
                tokio::spawn(async move {
                    let _ = reg.remove(&rec.name, true).await;
                });
            }
        }
    }

    /// Removes ready members of pools that are not configured (after a restart).
    pub fn clean_orphans(&self) {
        let Ok(list) = self.shared.reg.list() else {
            return;
        };
        let names: Vec<String> = self.map().keys().cloned().collect();
        for rec in list {
            let (Some(p), Some("ready")) = (
                Sandboxes::label(&rec, LABEL_POOL),
                Sandboxes::label(&rec, LABEL_POOL_STATE),
            ) else {
                continue;
            };
            if names.iter().any(|n| n == p) {
                continue;
            }
            tracing::info!(pool = p, sandbox = %rec.name, "removing a ready member of a pool that is gone");
            let reg = self.shared.reg.clone();
            tokio::spawn(async move {
                let _ = reg.remove(&rec.name, true).await;
            });
        }
    }

    /// The pools saved in `pools.json` (none when it is missing or unreadable).
    pub fn saved(&self) -> Vec<PoolConfig> {
        match std::fs::read(&self.config_file) {
            Ok(b) if b.len() < 1 << 20 => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(file = %self.config_file.display(), "ignoring unreadable pools: {e}");
                Vec::new()
            }),
            _ => Vec::new(),
        }
    }

    fn save(&self) {
        let list: Vec<PoolConfig> = self.map().values().map(|p| p.cfg.clone()).collect();
        let tmp = self.config_file.with_extension("json.tmp");
        let r = serde_json::to_vec_pretty(&list)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &self.config_file));
        if let Err(e) = r {
            tracing::warn!(file = %self.config_file.display(), "cannot save the pools: {e}");
        }
    }

    fn pool(&self, name: &str) -> ApiResult<Arc<Pool>> {
        self.map().get(name).cloned().ok_or_else(|| {
            ApiError::new(
                crate::error::StatusCode::NOT_FOUND,
                crate::error::ErrorCode::NotFound,
                format!("no pool named {name:?}"),
            )
            .fix("list pools with GET /v1/pools, or create one with POST /v1/pools")
        })
    }

    /// Every pool.
    pub fn list(&self) -> Vec<PoolInfo> {
        self.map().values().map(|p| p.info()).collect()
    }

    /// One pool.
    pub fn get(&self, name: &str) -> ApiResult<PoolInfo> {
        Ok(self.pool(name)?.info())
    }

    /// Whether a pool restores from the named snapshot.
    pub fn uses_snapshot(&self, snapshot: &str) -> Option<String> {
        self.map()
            .values()
            .find(|p| p.cfg.snapshot.as_deref() == Some(snapshot))
            .map(|p| p.cfg.name.clone())
    }

    /// Deletes a pool: stops its refill and destroys its idle members.
    pub async fn remove(&self, name: &str) -> ApiResult<()> {
        let removed = self.map().remove(name);
        let Some(pool) = removed else {
            return Err(self
                .pool(name)
                .err()
                .unwrap_or_else(|| ApiError::internal("pool vanished")));
        };
        self.save();
        if let Some(w) = pool.worker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            w.abort();
        }
        let idle: Vec<String> = pool.lock().ready.drain(..).collect();
        for m in &idle {
            self.shared.attached.lock().await.remove(m);
            if let Err(e) = self.shared.reg.remove(m, true).await {
                tracing::warn!(pool = name, sandbox = %m, "removing an idle member: {e}");
            }
        }
        // A restore the abort cut short leaves a labelled ready member.
        self.clean_orphans();
        tracing::info!(pool = name, removed = idle.len(), "pool deleted");
        Ok(())
    }

    /// Hands out a ready member (waiting up to [`ACQUIRE_WAIT`] when empty),
    /// or, with `name`, restores a fresh one under that name.
    pub async fn acquire(&self, pool_name: &str, name: Option<&str>) -> ApiResult<String> {
        let pool = self.pool(pool_name)?;
        if let Some(name) = name {
            return self.acquire_named(&pool, name).await;
        }
        let deadline = tokio::time::Instant::now() + ACQUIRE_WAIT;
        loop {
            let notified = pool.changed.notified();
            let next = pool.lock().ready.pop_front();
            if let Some(m) = next {
                pool.changed.notify_waiters();
                // A member someone deleted (or whose VM died) is skipped.
                match self.shared.reg.get(&m) {
                    Ok(rec) if rec.state == SandboxState::Running => {}
                    Ok(_) => {
                        tracing::warn!(pool = pool_name, sandbox = %m, "a ready member is not running; removing it");
                        let _ = self.shared.reg.remove(&m, true).await;
                        continue;
                    }
                    Err(_) => continue,
                }
                if let Err(e) = self
                    .shared
                    .reg
                    .set_label(&m, LABEL_POOL_STATE, Some("acquired"))
                {
                    tracing::warn!(pool = pool_name, sandbox = %m, "labelling: {e}");
                    let _ = self.shared.reg.remove(&m, true).await;
                    continue;
                }
                pool.lock().acquired_total += 1;
                return Ok(m);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                let why = pool.lock().last_error.clone();
                return Err(ApiError::unavailable(format!(
                    "pool {pool_name:?} has no ready member after {}s{}",
                    ACQUIRE_WAIT.as_secs(),
                    why.map(|w| format!(" (last restore error: {w})"))
                        .unwrap_or_default()
                ))
                .fix("retry later, or make the pool larger (DELETE and POST /v1/pools)"));
            }
        }
    }

    async fn acquire_named(&self, pool: &Pool, name: &str) -> ApiResult<String> {
        if self.shared.reg.get(name).is_ok() {
            return Err(ApiError::conflict(format!("sandbox {name:?} exists"))
                .fix("pick another name, or DELETE the existing sandbox first"));
        }
        let deadline = tokio::time::Instant::now() + ACQUIRE_WAIT;
        let base = loop {
            let notified = pool.changed.notified();
            if let Some(b) = pool.lock().base.clone() {
                break b;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                return Err(ApiError::unavailable(format!(
                    "pool {:?} has no base snapshot yet",
                    pool.cfg.name
                ))
                .fix("retry once GET /v1/pools/{name} reports status ready"));
            }
        };
        let sb = restore_member(&self.shared, &pool.cfg.name, &base, name, "acquired")
            .await
            .map_err(|e| ApiError::from_capsa(&format!("restoring {name:?}"), &e))?;
        self.shared
            .attached
            .lock()
            .await
            .insert(name.to_string(), Arc::new(sb));
        pool.lock().acquired_total += 1;
        Ok(name.to_string())
    }

    /// The named snapshot store.
    pub fn snapshots(&self) -> &Snapshots {
        &self.shared.snapshots
    }
}

impl Drop for Pools {
    fn drop(&mut self) {
        for p in self.map().values() {
            if let Some(w) = p.worker.lock().unwrap_or_else(|p| p.into_inner()).take() {
                w.abort();
            }
        }
    }
}

async fn restore_member(
    shared: &Shared,
    pool: &str,
    base: &Path,
    name: &str,
    state: &str,
) -> capsa::Result<Sandbox> {
    let sb = shared
        .reg
        .create_restored(
            Capsa::restore(base)
                .name(name)
                .label(LABEL_POOL, pool)
                .label(LABEL_POOL_STATE, state),
        )
        .await?;
    // Right after a restore TCG has no translated code: the first fork+exec
    // costs ~100 ms. Pay it here, before the member counts as ready, as the
    // library's pool does, so acquire-to-first-exec stays short.
    let warm = sb.warm_up().await;
    if let Err(e) = warm {
        let _ = shared.reg.remove(name, true).await;
        return Err(e);
    }
    Ok(sb)
}

/// The snapshot a pool's members restore from: the named one, or the
/// library's base snapshot for the pool's spec (booting one sandbox to make
/// it when missing).
async fn base_of(shared: &Shared, cfg: &PoolConfig) -> capsa::Result<PathBuf> {
    if let Some(s) = &cfg.snapshot {
        return Ok(shared.snapshots.get(s)?.path().to_path_buf());
    }
    let mut b = Capsa::sandbox();
    if let Some(c) = cfg.cpus {
        b = b.cpus(c);
    }
    if let Some(m) = cfg.memory_mib {
        b = b.memory_mb(m);
    }
    if let Some(i) = &cfg.image {
        b = b.image(i);
    }
    let dir = capsa::base_snapshot::dir_for(&b).await?.ok_or_else(|| {
        capsa::Error::InvalidArgument("this pool's spec has no base snapshot".into())
    })?;
    if !dir.join(capsa_core::SNAPSHOT_META_FILE).is_file() {
        tracing::info!(pool = %cfg.name, dir = %dir.display(), "booting one sandbox to make the pool's base snapshot");
        let sb = capsa::base_snapshot::build(b).await?;
        let _ = sb.kill().await;
        if !dir.join(capsa_core::SNAPSHOT_META_FILE).is_file() {
            return Err(capsa::Error::InvalidArgument(format!(
                "the base snapshot was not saved in {} (see the daemon log)",
                dir.display()
            )));
        }
    }
    Ok(dir)
}

/// A pool's refill loop: keeps `ready + starting == size`, one restore at a
/// time per pool (and globally bounded by the shared semaphore).
async fn fill(shared: Arc<Shared>, pool: Arc<Pool>) {
    let mut backoff = Duration::from_secs(1);
    let base = loop {
        let r = {
            let _permit = shared.restores.acquire().await;
            base_of(&shared, &pool.cfg).await
        };
        match r {
            Ok(b) => {
                let mut st = pool.lock();
                st.base = Some(b.clone());
                st.preparing = false;
                break b;
            }
            Err(e) => {
                tracing::warn!(pool = %pool.cfg.name, "preparing the pool's snapshot: {e}");
                let mut st = pool.lock();
                st.failed_total += 1;
                st.failing = true;
                st.last_error = Some(e.to_string());
            }
        }
        pool.changed.notify_waiters();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    };
    pool.changed.notify_waiters();
    backoff = Duration::from_secs(1);
    loop {
        let notified = pool.changed.notified();
        let want = {
            let mut st = pool.lock();
            if st.ready.len() + st.starting < pool.cfg.size {
                st.starting += 1;
                true
            } else {
                false
            }
        };
        if !want {
            notified.await;
            continue;
        }
        let name = format!("{}-{}", pool.cfg.name, random_hex());
        let r = {
            let _permit = shared.restores.acquire().await;
            let t = std::time::Instant::now();
            let r = restore_member(&shared, &pool.cfg.name, &base, &name, "ready").await;
            tracing::debug!(pool = %pool.cfg.name, sandbox = %name, took = ?t.elapsed(), ok = r.is_ok(), "restored a member");
            r
        };
        let failed = match r {
            Ok(sb) => {
                shared
                    .attached
                    .lock()
                    .await
                    .insert(name.clone(), Arc::new(sb));
                let mut st = pool.lock();
                st.starting -= 1;
                st.restored_total += 1;
                st.failing = false;
                st.ready.push_back(name);
                false
            }
            Err(e) => {
                tracing::warn!(pool = %pool.cfg.name, sandbox = %name, "restoring a member: {e}");
                let mut st = pool.lock();
                st.starting -= 1;
                st.failed_total += 1;
                st.failing = true;
                st.last_error = Some(e.to_string());
                true
            }
        };
        pool.changed.notify_waiters();
        if failed {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        } else {
            backoff = Duration::from_secs(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_flags() {
        let c = parse_pool_flag("py=2,memory=256,cpus=1").unwrap();
        assert_eq!(
            c,
            PoolConfig {
                name: "py".into(),
                size: 2,
                cpus: Some(1),
                memory_mib: Some(256),
                snapshot: None,
                image: None
            }
        );
        let c = parse_pool_flag("a=1,snapshot=base").unwrap();
        assert_eq!(c.snapshot.as_deref(), Some("base"));
        for bad in ["py", "py=x", "py=1,mem", "py=1,color=red", "py=1,cpus=-1"] {
            let e = parse_pool_flag(bad).unwrap_err();
            assert!(e.contains("fix:"), "{bad}: {e}");
        }
    }
}
