//! What the HTTP layer needs from "something that runs sandboxes".
//!
//! Handlers only see [`Backend`], so routing, validation, auth and streaming
//! do not depend on how sandboxes are kept alive. Every input has been
//! validated by the caller (names, guest paths, env) before a backend sees it,
//! and the server serializes lifecycle calls per name.

use std::path::PathBuf;

use async_trait::async_trait;
use capsa::ExecChild;

use crate::api::{
    AcquireRequest, CreatePoolRequest, CreateSandboxRequest, PoolInfo, SandboxInfo, SnapshotInfo,
};
use crate::error::{ApiError, ApiResult};

/// Where a sandbox's console lives on the host.
#[derive(Debug, Clone)]
pub struct ConsolePaths {
    /// Append-only log of everything the guest printed.
    pub log: PathBuf,
    /// Live console socket (history, then live bytes; input goes to the guest).
    pub socket: PathBuf,
}

/// The operations capsad serves, on sandboxes named by already-validated names.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Short name of the implementation, reported by `/v1/health`.
    fn kind(&self) -> &'static str;
    /// Every known sandbox.
    async fn list(&self) -> ApiResult<Vec<SandboxInfo>>;
    /// One sandbox (`not_found` when unknown).
    async fn get(&self, name: &str) -> ApiResult<SandboxInfo>;
    /// Creates `name` and boots it unless `req.start` is false (`conflict` when taken).
    async fn create(&self, name: &str, req: &CreateSandboxRequest) -> ApiResult<SandboxInfo>;
    /// Boots a stopped sandbox.
    async fn start(&self, name: &str) -> ApiResult<SandboxInfo>;
    /// Shuts a sandbox down gracefully (then kills it after a grace period).
    async fn stop(&self, name: &str) -> ApiResult<SandboxInfo>;
    /// Kills a sandbox's VM at once.
    async fn kill(&self, name: &str) -> ApiResult<SandboxInfo>;
    /// Forgets a sandbox and its state; a running one needs `force`.
    async fn remove(&self, name: &str, force: bool) -> ApiResult<()>;
    /// Starts a command in a running sandbox.
    async fn spawn(&self, name: &str, cmd: &capsa::Command) -> ApiResult<ExecChild>;
    /// The running sandbox's files, for the file endpoints (upload,
    /// download, stat, list, mkdir): the same [`capsa::copy::GuestFs`] the
    /// library's copies walk.
    async fn files(&self, name: &str) -> ApiResult<capsa::copy::AgentFs>;
    /// The console's host paths (`unavailable` when this backend has none).
    async fn console(&self, name: &str) -> ApiResult<ConsolePaths>;

    /// Starts the configured pools once the daemon owns its socket (saved
    /// ones and `flags`); `Err` is a configuration error to report and exit.
    fn start_pools(&self, flags: Vec<pools::PoolConfig>) -> Result<(), String> {
        if flags.is_empty() {
            Ok(())
        } else {
            Err("--pool needs the monitor backend; fix: drop --backend in-process".into())
        }
    }
    /// Attaches and mounts a (policy-checked) share on a running sandbox; returns its shares.
    async fn share_add(
        &self,
        _name: &str,
        _share: capsa::ShareSpec,
    ) -> ApiResult<Vec<capsa::ShareSpec>> {
        Err(monitor_only("runtime shares"))
    }
    /// Unmounts and detaches the share at `guest`.
    async fn share_remove(&self, _name: &str, _guest: &str) -> ApiResult<()> {
        Err(monitor_only("runtime shares"))
    }
    /// The shares attached to a running sandbox.
    async fn shares(&self, _name: &str) -> ApiResult<Vec<capsa::ShareSpec>> {
        Err(monitor_only("runtime shares"))
    }
    /// Snapshots a running sandbox into the snapshot store as `snapshot`.
    async fn snapshot_create(&self, _name: &str, _snapshot: &str) -> ApiResult<SnapshotInfo> {
        Err(monitor_only("snapshots"))
    }
    /// Every snapshot in the store.
    async fn snapshot_list(&self) -> ApiResult<Vec<SnapshotInfo>> {
        Err(monitor_only("snapshots"))
    }
    /// Deletes a snapshot (`conflict` while a pool restores from it).
    async fn snapshot_remove(&self, _snapshot: &str) -> ApiResult<()> {
        Err(monitor_only("snapshots"))
    }
    /// Creates a warm pool (validated; it fills in the background).
    async fn pool_create(&self, _req: &CreatePoolRequest) -> ApiResult<PoolInfo> {
        Err(monitor_only("pools"))
    }
    /// Every pool.
    async fn pool_list(&self) -> ApiResult<Vec<PoolInfo>> {
        Err(monitor_only("pools"))
    }
    /// One pool.
    async fn pool_get(&self, _name: &str) -> ApiResult<PoolInfo> {
        Err(monitor_only("pools"))
    }
    /// Deletes a pool and its idle members (handed-out ones stay).
    async fn pool_remove(&self, _name: &str) -> ApiResult<()> {
        Err(monitor_only("pools"))
    }
    /// Hands out a ready member of a pool.
    async fn pool_acquire(&self, _pool: &str, _req: &AcquireRequest) -> ApiResult<SandboxInfo> {
        Err(monitor_only("pools"))
    }
}

fn monitor_only(what: &str) -> ApiError {
    ApiError::unavailable(format!("{what} need the monitor backend"))
        .fix("run capsad with --backend monitor (the default)")
}

pub mod in_process;
pub mod monitor;
pub mod pools;
