//! Warm pools: sandboxes restored ahead of time from one snapshot.
//!
//! ```no_run
//! # async fn demo() -> capsa::Result<()> {
//! use capsa::{Capsa, Command};
//! let pool = Capsa::pool(Capsa::sandbox().memory_mb(256)).size(4).build().await?;
//! let sb = pool.acquire().await?;            // a ready sandbox, handed over at once
//! sb.exec(&Command::new("true")).await?;
//! drop(sb);                                   // destroyed, never reused
//! # Ok(()) }
//! ```
//!
//! The pool boots one sandbox cold, snapshots it, destroys it, and from then
//! on only restores: a background task keeps `size` sandboxes ready, starting
//! a replacement as soon as one is handed out. Each restored sandbox gets a
//! fresh identity (see [`crate::RestoreBuilder`]). Sandboxes handed out are
//! plain [`Sandbox`]es owned by the caller: dropping one kills its VM.
//! Dropping the pool kills every ready sandbox, stops the refill, and
//! deletes the pool's snapshot (unless it was given one).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::{Capsa, Error, Result, Sandbox, SandboxBuilder, Snapshot};

/// Default for [`PoolBuilder::size`].
pub const DEFAULT_POOL_SIZE: usize = 2;
/// Pause after a failed restore before the next attempt (so a broken
/// snapshot costs a restore per second, not a busy loop).
const RETRY_PAUSE: Duration = Duration::from_secs(1);

impl Capsa {
    /// Starts describing a warm pool of sandboxes like `sandbox`.
    pub fn pool(sandbox: SandboxBuilder) -> PoolBuilder {
        PoolBuilder {
            sandbox,
            size: DEFAULT_POOL_SIZE,
            parallel: 1,
            snapshot: None,
        }
    }
}

/// Describes a pool; [`PoolBuilder::build`] fills it.
#[derive(Debug, Clone)]
pub struct PoolBuilder {
    sandbox: SandboxBuilder,
    size: usize,
    parallel: usize,
    snapshot: Option<PathBuf>,
}

impl PoolBuilder {
    /// How many sandboxes to keep ready (default [`DEFAULT_POOL_SIZE`]).
    pub fn size(mut self, n: usize) -> Self {
        self.size = n;
        self
    }

    /// How many restores may run at once while refilling (default 1: on a
    /// small host, parallel restores only slow each other down).
    pub fn parallel_restores(mut self, n: usize) -> Self {
        self.parallel = n.max(1);
        self
    }

    /// Restores from this existing snapshot instead of booting and
    /// snapshotting a sandbox first; it must match the sandbox's spec.
    pub fn from_snapshot(mut self, dir: impl Into<PathBuf>) -> Self {
        self.snapshot = Some(dir.into());
        self
    }

    /// Makes (or checks) the pool's snapshot, then returns once the first
    /// sandbox is ready; the rest fill in the background.
    pub async fn build(self) -> Result<Pool> {
        if self.size == 0 {
            return Err(Error::InvalidArgument(
                "a pool of size 0 holds nothing; ask for at least 1".into(),
            ));
        }
        if !self.sandbox.shares.is_empty() {
            return Err(Error::InvalidArgument(
                "a pool's sandboxes are restored from a snapshot, which cannot hold a shared \
                 directory; fix: build the pool without shares and attach them to each acquired \
                 sandbox (Sandbox::share_add)"
                    .into(),
            ));
        }
        let spec = self.sandbox.vm_spec().await?;
        let (dir, owned) = match &self.snapshot {
            Some(d) => {
                let snap = Snapshot::open(d)?;
                snap.check()?;
                snap.meta().check_spec(d, &spec)?;
                (d.clone(), None)
            }
            None => {
                let tmp = tempfile::Builder::new()
                    .prefix("capsa-pool-")
                    .tempdir()
                    .map_err(|e| Error::io("creating the pool's snapshot directory", e))?;
                let sb = self.sandbox.clone().build().await?;
                // VM level: the pool's own restores add the builder's settings.
                sb.vm().snapshot(tmp.path()).await?;
                let _ = sb.kill().await;
                (tmp.path().to_path_buf(), Some(tmp))
            }
        };
        let inner = Arc::new(Inner {
            restore: self.sandbox.restore_from(&dir).expect_spec(spec),
            size: self.size,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            _owned_snapshot: owned,
        });
        let workers = (0..self.parallel.min(self.size))
            .map(|_| tokio::spawn(refill(inner.clone())))
            .collect();
        let pool = Pool { inner, workers };
        pool.wait_ready(1).await?;
        Ok(pool)
    }
}

/// Counters of a pool, for monitoring.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Sandboxes kept ready.
    pub size: usize,
    /// Ready now.
    pub ready: usize,
    /// Being restored now.
    pub restoring: usize,
    /// Handed out so far.
    pub acquired: u64,
    /// Restored so far (handed out or ready).
    pub restored: u64,
    /// Restores that failed.
    pub failed: u64,
    /// The last restore error, if any.
    pub last_error: Option<String>,
}

#[derive(Default)]
struct State {
    ready: VecDeque<Sandbox>,
    stats: PoolStats,
}

struct Inner {
    restore: crate::RestoreBuilder,
    size: usize,
    state: Mutex<State>,
    changed: Notify,
    // Deleted when the last worker is gone (after the pool).
    _owned_snapshot: Option<tempfile::TempDir>,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Keeps the pool full; one per allowed parallel restore.
async fn refill(inner: Arc<Inner>) {
    loop {
        // Registered before the check, so a change in between is not missed.
        let notified = inner.changed.notified();
        let claim = {
            let mut st = inner.lock();
            if st.ready.len() + st.stats.restoring < inner.size {
                st.stats.restoring += 1;
                true
            } else {
                false
            }
        };
        if !claim {
            notified.await;
            continue;
        }
        let result = match inner.restore.clone().build().await {
            // One exec before handing it out: under TCG a restored guest has
            // no translated code yet, and the first fork/exec pays for it.
            Ok(sb) => sb.warm_up().await.map(|_| sb),
            Err(e) => Err(e),
        };
        let failed = {
            let mut st = inner.lock();
            st.stats.restoring -= 1;
            match result {
                Ok(sb) => {
                    st.stats.restored += 1;
                    st.ready.push_back(sb);
                    false
                }
                Err(e) => {
                    tracing::warn!("pool: restore failed: {e}");
                    st.stats.failed += 1;
                    st.stats.last_error = Some(e.to_string());
                    true
                }
            }
        };
        inner.changed.notify_waiters();
        if failed {
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
}

/// A warm pool of sandboxes (see the module docs).
pub struct Pool {
    inner: Arc<Inner>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Pool {
    /// Takes a ready sandbox, waiting for one if the pool is empty (up to
    /// the sandbox's ready timeout); a replacement starts restoring at once.
    pub async fn acquire(&self) -> Result<Sandbox> {
        let deadline = tokio::time::Instant::now() + self.inner.restore.ready_timeout_value();
        loop {
            let notified = self.inner.changed.notified();
            if let Some(sb) = self.try_acquire() {
                return Ok(sb);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                let why = self.inner.lock().stats.last_error.clone();
                return Err(capsa_core::Error::Timeout {
                    what: format!(
                        "a pooled sandbox{}",
                        why.map(|w| format!(" (last restore error: {w})"))
                            .unwrap_or_default()
                    ),
                    after: self.inner.restore.ready_timeout_value(),
                }
                .into());
            }
        }
    }

    /// Takes a ready sandbox if there is one.
    pub fn try_acquire(&self) -> Option<Sandbox> {
        let sb = {
            let mut st = self.inner.lock();
            let sb = st.ready.pop_front()?;
            st.stats.acquired += 1;
            sb
        };
        self.inner.changed.notify_waiters();
        Some(sb)
    }

    /// Counters (ready, restoring, acquired, failures).
    pub fn stats(&self) -> PoolStats {
        let st = self.inner.lock();
        PoolStats {
            size: self.inner.size,
            ready: st.ready.len(),
            ..st.stats.clone()
        }
    }

    /// Waits until at least `n` sandboxes are ready (at most the pool size).
    pub async fn wait_ready(&self, n: usize) -> Result<()> {
        let n = n.min(self.inner.size);
        let deadline = tokio::time::Instant::now() + self.inner.restore.ready_timeout_value();
        loop {
            let notified = self.inner.changed.notified();
            {
                let st = self.inner.lock();
                if st.ready.len() >= n {
                    return Ok(());
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                let why = self.inner.lock().stats.last_error.clone();
                return Err(capsa_core::Error::Timeout {
                    what: format!(
                        "{n} pooled sandboxes{}",
                        why.map(|w| format!(" (last restore error: {w})"))
                            .unwrap_or_default()
                    ),
                    after: self.inner.restore.ready_timeout_value(),
                }
                .into());
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Aborting drops any restore in flight, which kills its VM.
        for w in &self.workers {
            w.abort();
        }
        let ready: Vec<Sandbox> = self.inner.lock().ready.drain(..).collect();
        drop(ready);
    }
}
