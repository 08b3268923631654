//! The shim's warm pool: per host, per base snapshot (one image chain and VM
//! size), up to `$CAPSA_SHIM_POOL_SIZE` sandboxes restored ahead of time and
//! idle, which a later shim claims instead of restoring.
//!
//! Why no daemon: the shim is one short-lived process per task, so the pool
//! must outlive it, but a task must not depend on a second service being up.
//! The members are ordinary monitor-backed sandboxes in the shim's registry
//! (they already outlive the process that made them), and their labels are
//! the pool's only state:
//! - `owner=containerd-shim`, `containerd.pool=<base key>` on every member;
//! - `containerd.pool_state=warming` while restoring, `ready` once its agent
//!   answered and the first fork+exec was paid, `claimed` once a shim took it
//!   (with `containerd.namespace` / `containerd.id` of its container, so
//!   containerd's dead-shim cleanup finds it by label, as it finds a
//!   shim-named sandbox by name).
//!
//! Two `flock`s per key under `<cache>/pool/` make it safe across shims:
//! the *claim* lock (held for a list and a label flip: a member goes to one
//! shim) and the *refill* lock (held for a whole refill: one refiller per key,
//! so a `warming` member seen while holding it was left by a refiller that
//! died, and is removed). A lock dies with its process, so a killed shim never
//! wedges the pool. Dead members are removed by the next refill.
//!
//! The shim that claimed (or restored, or cold-booted) a sandbox refills the
//! pool in the background and, on Shutdown, waits for that refill before it
//! exits (bounded), so no restore is cut in half. Idle members stay until
//! claimed or removed (`capsa rm -f`; `capsa ps` lists them): a pool is
//! memory spent ahead of time, which is why it is off unless configured.

use std::path::{Path, PathBuf};
use std::time::Duration;

use capsa::image::FileLock;
use sha2::{Digest, Sha256};

use crate::service::{LABEL_ID, LABEL_NAMESPACE, LABEL_OWNER, OWNER};

/// Environment variable: how many idle members to keep per base snapshot
/// (0 or unset: no pool).
pub const POOL_SIZE_ENV: &str = "CAPSA_SHIM_POOL_SIZE";
/// Largest pool per key (each member holds a VM's memory).
pub const MAX_POOL_SIZE: usize = 8;
/// Label naming a member's pool (its base snapshot's directory name).
pub const LABEL_POOL: &str = "containerd.pool";
/// Label with a member's state: `warming`, `ready`, `claimed`.
pub const LABEL_POOL_STATE: &str = "containerd.pool_state";
const WARMING: &str = "warming";
const READY: &str = "ready";
const CLAIMED: &str = "claimed";
const RETIRED: &str = "retired";
/// How long Shutdown waits for a refill before the shim exits anyway.
pub const REFILL_WAIT: Duration = Duration::from_secs(120);

/// The configured pool size (0: off). A bad value is logged and means off.
pub fn size() -> usize {
    let Ok(v) = std::env::var(POOL_SIZE_ENV) else {
        return 0;
    };
    match v.trim().parse::<usize>() {
        Ok(n) if n <= MAX_POOL_SIZE => n,
        _ => {
            tracing::warn!(
                value = v,
                "{POOL_SIZE_ENV} must be a number from 0 to {MAX_POOL_SIZE}; fix: set it in containerd's environment; the pool is off"
            );
            0
        }
    }
}

/// One pool: the members restored from one base snapshot.
#[derive(Debug, Clone)]
pub struct Key {
    /// The base snapshot directory.
    pub base: PathBuf,
    /// The label value (the base directory's name).
    pub label: String,
    /// A short hash of it, for member and lock names.
    short: String,
}

impl Key {
    /// The pool of sandboxes restored from `base`.
    pub fn of(base: &Path) -> Option<Key> {
        let label = base.file_name()?.to_str()?.to_string();
        let short: String = Sha256::digest(label.as_bytes())
            .iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect();
        Some(Key {
            base: base.to_path_buf(),
            label,
            short,
        })
    }

    fn lock_path(&self, kind: &str) -> PathBuf {
        crate::rootfs::cache_dir()
            .join("pool")
            .join(format!("{}.{kind}.lock", self.short))
    }

    fn member_name(&self) -> String {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let h = Sha256::digest(format!("{}/{}/{:?}", self.short, std::process::id(), t));
        let r: String = h.iter().take(4).map(|b| format!("{b:02x}")).collect();
        format!("ctrdpool-{}-{r}", self.short)
    }
}

/// The exclusive lock at `path`, its directory made first.
fn flock(path: &Path) -> std::io::Result<FileLock> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    FileLock::exclusive(path).map_err(std::io::Error::other)
}

async fn flock_async(path: PathBuf) -> std::io::Result<FileLock> {
    tokio::task::spawn_blocking(move || flock(&path))
        .await
        .map_err(std::io::Error::other)?
}

fn is(rec: &capsa::SandboxRecord, key: &str, value: &str) -> bool {
    capsa::Sandboxes::label(rec, key) == Some(value)
}

/// Takes a ready member of `key` for container `id` of `namespace` and
/// attaches to it; `None` when there is none (or it did not answer: it is
/// removed, and the caller restores as without a pool).
pub async fn claim(
    reg: &capsa::Sandboxes,
    key: &Key,
    namespace: &str,
    id: &str,
) -> Option<(String, capsa::Sandbox)> {
    let name = {
        let _lock = match flock_async(key.lock_path("claim")).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("the pool's claim lock: {e}");
                return None;
            }
        };
        let list = reg.list().ok()?;
        let rec = list.into_iter().find(|r| {
            r.state == capsa::SandboxState::Running
                && is(r, LABEL_POOL, &key.label)
                && is(r, LABEL_POOL_STATE, READY)
        })?;
        // The container's labels first: a shim dying before the state flip
        // leaves a ready member that the next claim simply relabels.
        let mut labelled = Ok(());
        for (k, v) in [
            (LABEL_NAMESPACE, namespace),
            (LABEL_ID, id),
            (LABEL_POOL_STATE, CLAIMED),
        ] {
            labelled = reg.set_label(&rec.name, k, Some(v));
            if labelled.is_err() {
                break;
            }
        }
        if let Err(e) = labelled {
            tracing::warn!(sandbox = rec.name, "claiming a pool member: {e}");
            let _ = reg.remove(&rec.name, true).await;
            return None;
        }
        rec.name
    };
    match reg.open(&name).await {
        Ok(sb) => Some((name, sb)),
        Err(e) => {
            tracing::warn!(
                sandbox = name,
                "a claimed pool member did not answer ({e}); removing it"
            );
            let _ = reg.remove(&name, true).await;
            None
        }
    }
}

/// What a shim does for the pools after its task started.
pub struct Upkeep {
    /// The registry the members live in.
    pub reg: capsa::Sandboxes,
    /// The task's pool, to refill (when the task came from or made a base).
    pub key: Option<Key>,
    /// Members to keep ready in it.
    pub size: usize,
    /// Ready members of any pool idle longer than this are removed.
    pub max_idle: Option<Duration>,
}

impl Upkeep {
    /// Expires idle members, then refills the task's pool.
    pub async fn run(self) {
        if let Some(max_idle) = self.max_idle {
            expire(&self.reg, max_idle).await;
        }
        if let Some(key) = self.key {
            refill(self.reg, key, self.size).await;
        }
    }
}

/// Whether a ready member created at `created_at` (unix seconds) has been
/// idle longer than `max_idle` at `now`.
fn idle_too_long(created_at: u64, now: u64, max_idle: Duration) -> bool {
    now.saturating_sub(created_at) > max_idle.as_secs()
}

/// Removes ready members of every pool that have waited longer than
/// `max_idle` for a task: an image nobody runs any more must not keep its
/// VMs (and their memory) for ever. Each goes under its pool's claim lock,
/// so a claim never gets a member being removed.
pub async fn expire(reg: &capsa::Sandboxes, max_idle: Duration) {
    let Ok(list) = reg.list() else { return };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let base_dir = crate::rootfs::cache_dir().join("base");
    for rec in list {
        let Some(label) = capsa::Sandboxes::label(&rec, LABEL_POOL) else {
            continue;
        };
        if !is(&rec, LABEL_POOL_STATE, READY) || !idle_too_long(rec.created_at, now, max_idle) {
            continue;
        }
        let Some(key) = Key::of(&base_dir.join(label)) else {
            continue;
        };
        tracing::debug!(
            sandbox = rec.name,
            idle_secs = now.saturating_sub(rec.created_at),
            "pool member idle too long"
        );
        retire(
            reg,
            &key,
            std::slice::from_ref(&rec.name),
            "idle for longer than pool_max_idle_secs",
        )
        .await;
    }
}

/// Removes those of `names` (members of `key`'s pool) that are still ready:
/// they are marked retired under the pool's claim lock, so no claim can
/// take one, then removed. `why` goes to the log.
async fn retire(reg: &capsa::Sandboxes, key: &Key, names: &[String], why: &str) {
    match flock_async(key.lock_path("claim")).await {
        Ok(_claim) => {
            for name in names {
                if reg.get(name).is_ok_and(|r| is(&r, LABEL_POOL_STATE, READY)) {
                    let _ = reg.set_label(name, LABEL_POOL_STATE, Some(RETIRED));
                }
            }
        }
        Err(e) => {
            tracing::warn!("the pool's claim lock: {e}");
            return;
        }
    }
    for name in names {
        if reg
            .get(name)
            .is_ok_and(|r| is(&r, LABEL_POOL_STATE, RETIRED))
        {
            tracing::info!(sandbox = name, "removing a pool member {why}");
            let _ = reg.remove(name, true).await;
        }
    }
}

/// Brings `key`'s pool up to `size` ready members: removes dead members and
/// ones an earlier refiller left warming, then restores the missing ones
/// one at a time (they compete for the cores the tasks use).
pub async fn refill(reg: capsa::Sandboxes, key: Key, size: usize) {
    let _lock = match flock_async(key.lock_path("refill")).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("the pool's refill lock: {e}");
            return;
        }
    };
    let Ok(list) = reg.list() else { return };
    let mut ready = Vec::new();
    for rec in &list {
        let Some(pool) = capsa::Sandboxes::label(rec, LABEL_POOL) else {
            continue;
        };
        let state = capsa::Sandboxes::label(rec, LABEL_POOL_STATE).unwrap_or_default();
        if state == CLAIMED {
            continue;
        }
        if pool != key.label {
            // Another key's idle member whose base snapshot is gone (a new
            // capsa or kernel, a cleared cache) will never be claimed.
            if rec.is_live() && base_exists(&key.base, pool) {
                continue;
            }
        } else if rec.is_live() && state == READY {
            ready.push(rec.name.clone());
            continue;
        }
        tracing::info!(sandbox = rec.name, state, vm = %rec.state, "removing a dead, abandoned or unusable pool member");
        let _ = reg.remove(&rec.name, true).await;
    }
    // The size went down: retire the surplus.
    if ready.len() > size {
        let surplus: Vec<String> = ready.split_off(size);
        retire(&reg, &key, &surplus, "above the pool size").await;
    }
    let mut ready = ready.len();
    while ready < size {
        let name = key.member_name();
        let started = std::time::Instant::now();
        match restore_member(&reg, &key, &name).await {
            Ok(()) => {
                ready += 1;
                tracing::info!(sandbox = name, elapsed = ?started.elapsed(), ready, size, "pool member ready");
            }
            Err(e) => {
                tracing::warn!(sandbox = name, "restoring a pool member: {e}");
                let _ = reg.remove(&name, true).await;
                return;
            }
        }
    }
}

/// Whether the base snapshot of pool `label` (a sibling of `base`) exists;
/// a label that is not a plain directory name never names one.
fn base_exists(base: &Path, label: &str) -> bool {
    let plain = !label.is_empty()
        && label.len() <= 128
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    plain
        && base
            .parent()
            .is_some_and(|d| d.join(label).join(capsa_core::SNAPSHOT_META_FILE).is_file())
}

async fn restore_member(reg: &capsa::Sandboxes, key: &Key, name: &str) -> capsa::Result<()> {
    let sb = reg
        .create_restored(
            capsa::Capsa::restore(&key.base)
                .name(name)
                .label(LABEL_OWNER, OWNER)
                .label(LABEL_POOL, key.label.clone())
                .label(LABEL_POOL_STATE, WARMING),
        )
        .await?;
    // Right after a restore TCG has no translated code: the first fork+exec
    // costs ~100 ms; pay it before the member counts as ready.
    sb.warm_up().await?;
    reg.set_label(name, LABEL_POOL_STATE, Some(READY))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_names_are_valid_sandbox_names() {
        let k = Key::of(Path::new("/c/base/base-0123abcd")).unwrap();
        assert_eq!(k.label, "base-0123abcd");
        let n = k.member_name();
        assert!(n.starts_with("ctrdpool-") && n.len() <= 40, "{n}");
        assert!(n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        assert!(Key::of(Path::new("/")).is_none());
    }

    #[test]
    fn only_plain_labels_name_a_base() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base-a");
        std::fs::create_dir_all(d.path().join("base-b")).unwrap();
        std::fs::write(
            d.path().join("base-b").join(capsa_core::SNAPSHOT_META_FILE),
            b"{}",
        )
        .unwrap();
        assert!(base_exists(&base, "base-b"));
        assert!(!base_exists(&base, "base-c"));
        assert!(!base_exists(&base, "../base-b"));
        assert!(!base_exists(&base, ""));
    }

    #[test]
    fn members_expire_only_after_the_idle_time() {
        let d = Duration::from_secs(60);
        assert!(!idle_too_long(1000, 1060, d));
        assert!(idle_too_long(1000, 1061, d));
        // A clock behind the record, or a record from the future: not idle.
        assert!(!idle_too_long(2000, 1000, d));
        assert!(idle_too_long(0, u64::MAX, d));
    }

    #[test]
    fn the_size_is_bounded() {
        // One test touches the variable (tests run in threads).
        std::env::set_var(POOL_SIZE_ENV, "2");
        assert_eq!(size(), 2);
        std::env::set_var(POOL_SIZE_ENV, "99");
        assert_eq!(size(), 0);
        std::env::set_var(POOL_SIZE_ENV, "x");
        assert_eq!(size(), 0);
        std::env::remove_var(POOL_SIZE_ENV);
        assert_eq!(size(), 0);
    }
}
