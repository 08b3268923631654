//! The one interface every face translates onto.
//!
//! The library's registry ([`crate::local::LocalService`]) and the HTTP
//! client of capsad (`capsa_client::RemoteService`) implement [`Service`];
//! capsad's handlers call a [`Service`], and the CLI holds one `dyn Service`
//! chosen by `--host`. A verb is written once, in the local implementation;
//! the other faces only move its request and answer.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use tokio::sync::mpsc;

use crate::error::{ApiError, ApiResult};
use crate::types::{
    AcquireRequest, CreatePoolRequest, CreateSandboxRequest, ExecRequest, Health, ImageInfo,
    NetworkLog, NetworkPolicyBody, PoolInfo, PortForwardBody, PortQuery, PullEvent, PullRequest,
    SandboxInfo, ScreenActionsRequest, ScreenActionsResponse, ScreenInfo, ScreenshotBody,
    ScreenshotRequest, ShareRequest, SnapshotInfo,
};

/// A sandbox's files: the same walk ([`capsa::copy`]) serves every face.
pub type Files = Box<dyn capsa::copy::GuestFs>;

/// Output of a running command, in order; the last item is `Exit` or `Error`.
#[derive(Debug, Clone)]
pub enum ExecChunk {
    /// Bytes the command wrote to stdout (or to its terminal).
    Stdout(Bytes),
    /// Bytes the command wrote to stderr.
    Stderr(Bytes),
    /// The command ended.
    Exit(capsa::ExitStatus),
    /// The exec failed after it started (the agent went away, ...).
    Error(ApiError),
}

/// Input to a running command besides its arguments.
#[derive(Debug, Clone)]
pub enum ExecControl {
    /// Bytes for its stdin.
    Stdin(Bytes),
    /// Closes its stdin.
    StdinEof,
    /// Its terminal's new size.
    Resize {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// A signal for its process group.
    Signal(i32),
}

/// A started command. Dropping it ends the command (the agent kills what is
/// left when its connection closes).
pub struct ExecSession {
    /// Output, then the exit.
    pub output: mpsc::Receiver<ExecChunk>,
    /// Stdin and controls; `None` when the request asked for no stdin.
    pub control: Option<mpsc::Sender<ExecControl>>,
    /// Whatever keeps the command's connection open.
    pub _keep: Box<dyn Send + Sync>,
}

impl std::fmt::Debug for ExecSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecSession").finish_non_exhaustive()
    }
}

impl ExecSession {
    /// Collects the whole output and the exit (for non-interactive callers).
    pub async fn collect(mut self) -> ApiResult<(Vec<u8>, Vec<u8>, capsa::ExitStatus)> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(c) = self.output.recv().await {
            match c {
                ExecChunk::Stdout(b) => out.extend_from_slice(&b),
                ExecChunk::Stderr(b) => err.extend_from_slice(&b),
                ExecChunk::Exit(s) => return Ok((out, err, s)),
                ExecChunk::Error(e) => return Err(e),
            }
        }
        Err(ApiError::internal(
            "the exec stream ended before the command did",
        ))
    }
}

/// A live console: output (history first) and input typed into the guest.
pub struct ConsoleSession {
    /// Console output; closes when the console does.
    pub output: mpsc::Receiver<Bytes>,
    /// Bytes typed into the guest's console.
    pub input: mpsc::Sender<Bytes>,
}

/// The operations on sandboxes, snapshots and pools, once for every face.
///
/// Inputs are checked by the implementation that acts on them (the local
/// one): a face never needs to validate before calling.
#[async_trait]
pub trait Service: Send + Sync {
    /// Liveness and counts.
    async fn health(&self) -> ApiResult<Health>;
    /// Every known sandbox.
    async fn list(&self) -> ApiResult<Vec<SandboxInfo>>;
    /// One sandbox (`not_found` when unknown).
    async fn get(&self, name: &str) -> ApiResult<SandboxInfo>;
    /// Creates a sandbox (a generated name when `req.name` is absent) and
    /// boots it unless `req.start` is false, or restores it from a snapshot.
    async fn create(&self, req: CreateSandboxRequest) -> ApiResult<SandboxInfo>;
    /// Boots a stopped sandbox.
    async fn start(&self, name: &str) -> ApiResult<SandboxInfo>;
    /// Shuts a sandbox down gracefully, killing it after `grace` (default
    /// [`capsa::DEFAULT_STOP_TIMEOUT`]).
    async fn stop(&self, name: &str, grace: Option<Duration>) -> ApiResult<SandboxInfo>;
    /// Kills a sandbox's VM at once.
    async fn kill(&self, name: &str) -> ApiResult<SandboxInfo>;
    /// Forgets a sandbox and its state; a running one needs `force`.
    async fn remove(&self, name: &str, force: bool) -> ApiResult<()>;
    /// Starts a command in a running sandbox.
    async fn exec(&self, name: &str, req: ExecRequest) -> ApiResult<ExecSession>;
    /// A running sandbox's files.
    async fn files(&self, name: &str) -> ApiResult<Files>;
    /// The console log so far, then (with `follow`) new output until the
    /// sandbox ends.
    async fn console_log(
        &self,
        name: &str,
        follow: bool,
    ) -> ApiResult<BoxStream<'static, ApiResult<Bytes>>>;
    /// The live console.
    async fn console_attach(&self, name: &str) -> ApiResult<ConsoleSession>;
    /// Snapshots a running sandbox into the snapshot store as `snapshot`.
    async fn snapshot_create(&self, name: &str, snapshot: &str) -> ApiResult<SnapshotInfo>;
    /// Every snapshot in the store.
    async fn snapshot_list(&self) -> ApiResult<Vec<SnapshotInfo>>;
    /// Deletes a snapshot (`conflict` while a pool restores from it).
    async fn snapshot_remove(&self, snapshot: &str) -> ApiResult<()>;
    /// Creates a warm pool (it fills in the background).
    async fn pool_create(&self, req: CreatePoolRequest) -> ApiResult<PoolInfo>;
    /// Every pool.
    async fn pool_list(&self) -> ApiResult<Vec<PoolInfo>>;
    /// One pool.
    async fn pool_get(&self, name: &str) -> ApiResult<PoolInfo>;
    /// Deletes a pool and its idle members (handed-out ones stay).
    async fn pool_remove(&self, name: &str) -> ApiResult<()>;
    /// Hands out a ready member of a pool.
    async fn pool_acquire(&self, pool: &str, req: AcquireRequest) -> ApiResult<SandboxInfo>;
    /// Attaches a host directory to a running sandbox and mounts it
    /// (virtio-fs hot-plug; works on restored and pooled sandboxes); answers
    /// the sandbox's shares.
    async fn share_add(&self, name: &str, share: ShareRequest) -> ApiResult<Vec<ShareRequest>>;
    /// Unmounts and detaches the share mounted at `guest`.
    async fn share_remove(&self, name: &str, guest: &str) -> ApiResult<()>;
    /// The shares attached to a running sandbox.
    async fn share_list(&self, name: &str) -> ApiResult<Vec<ShareRequest>>;
    /// The network policy in force on a running sandbox.
    async fn network_policy(&self, name: &str) -> ApiResult<NetworkPolicyBody>;
    /// Replaces a running sandbox's network policy; new flows follow it at once.
    async fn set_network_policy(&self, name: &str, body: NetworkPolicyBody) -> ApiResult<()>;
    /// A running sandbox's latest network decisions, with their reasons.
    async fn network_log(&self, name: &str) -> ApiResult<NetworkLog>;
    /// Forwards a host port into a running sandbox from now on (works on
    /// restored and pooled sandboxes); answers the sandbox's forwards.
    async fn port_add(&self, name: &str, port: PortForwardBody) -> ApiResult<Vec<PortForwardBody>>;
    /// Stops forwarding a host port (connections already made go on).
    async fn port_remove(&self, name: &str, port: PortQuery) -> ApiResult<()>;
    /// The host ports forwarded into a running sandbox.
    async fn port_list(&self, name: &str) -> ApiResult<Vec<PortForwardBody>>;
    /// The display of a sandbox (refused for a headless one, with the fix).
    async fn screen_info(&self, name: &str) -> ApiResult<ScreenInfo>;
    /// A screenshot of a running sandbox (PNG).
    async fn screenshot(&self, name: &str, req: ScreenshotRequest) -> ApiResult<ScreenshotBody>;
    /// Performs a batch of pointer and keyboard actions, optionally followed
    /// by a screenshot after a settle time.
    async fn screen_actions(
        &self,
        name: &str,
        req: ScreenActionsRequest,
    ) -> ApiResult<ScreenActionsResponse>;
    /// A viewer of the sandbox's screen: the raw RFB (VNC) byte stream of
    /// QEMU's VNC server, both ways (a [`ConsoleSession`]-shaped pipe).
    /// Without `input` the session is view-only, enforced here: the
    /// viewer's key, pointer and clipboard messages never reach QEMU
    /// ([`crate::viewer::rfb`]).
    async fn screen_vnc(&self, name: &str, input: bool) -> ApiResult<ConsoleSession>;
    /// Pulls an image from a registry into the store and converts it to a
    /// root filesystem: progress events, ending with `Done` or `Error`.
    /// Dropping the receiver abandons the pull.
    async fn image_pull(&self, req: PullRequest) -> ApiResult<mpsc::Receiver<PullEvent>>;
    /// Every image in the image store.
    async fn image_list(&self) -> ApiResult<Vec<ImageInfo>>;
    /// One image, by name, digest or unique digest prefix.
    async fn image_get(&self, image: &str) -> ApiResult<ImageInfo>;
    /// Removes an image from the store (its blobs stay until a prune).
    async fn image_remove(&self, image: &str) -> ApiResult<ImageInfo>;
}
