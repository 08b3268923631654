//! The monitor's RPC service: the [`capsa_core::VmInstance`] operations, over tarpc.
//!
//! The same service is served on the monitor's stdin/stdout (its spawner) and
//! on `monitor.sock` (anyone reattaching). Frames are length-delimited JSON,
//! bounded by [`MAX_FRAME`]. JSON, not bincode: `VmStatus` and `ExitReason`
//! are internally tagged enums, which bincode cannot decode.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use capsa_core::{
    ExitReason, InputEvent, NetDecision, NetworkPolicy, ShareSpec, SnapshotMeta, VmSpec, VmStatus,
};
use serde::{Deserialize, Serialize};
use tarpc::tokio_serde::formats::Json;
use tarpc::tokio_util::codec::LengthDelimitedCodec;
use tokio::io::{AsyncRead, AsyncWrite};

/// Largest RPC frame either side accepts; a peer sending more is disconnected.
pub const MAX_FRAME: usize = 16 << 20;

/// Deadline put on long calls (`wait`, `kill`); tarpc's default is 10 s.
/// Kept under tokio's ~2 year timer limit; `wait` re-issues the call when it passes.
pub const LONG_CALL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Deadline put on `snapshot`: saving copies guest RAM and disks, which takes
/// seconds per GiB under TCG and longer on slow disks.
pub const SNAPSHOT_CALL: Duration = Duration::from_secs(30 * 60);

/// An error answered by the monitor; `code` is stable for matching.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}{}", fix.as_deref().map(|f| format!(". Fix: {f}")).unwrap_or_default())]
pub struct RpcError {
    /// A stable, snake_case code: `not_running`, `starting`, `backend`, `start_failed`, ...
    pub code: String,
    /// What failed.
    pub message: String,
    /// What to do about it, when known.
    pub fix: Option<String>,
}

impl RpcError {
    /// An error with a code and a message.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_string(),
            message: message.into(),
            fix: None,
        }
    }
}

impl From<capsa_core::Error> for RpcError {
    fn from(e: capsa_core::Error) -> Self {
        let code = match &e {
            capsa_core::Error::InvalidSpec { .. } => "invalid_spec",
            capsa_core::Error::Unsupported { .. } => "unsupported",
            capsa_core::Error::NotRunning { .. } => "not_running",
            capsa_core::Error::Timeout { .. } => "timeout",
            _ => "backend",
        };
        // The message already ends in ". Fix: ..." for errors that carry one.
        Self {
            code: code.into(),
            fix: None,
            message: e.to_string(),
        }
    }
}

impl From<RpcError> for capsa_core::Error {
    fn from(e: RpcError) -> Self {
        capsa_core::Error::Backend {
            backend: "capsa-vmm",
            message: if e.code == "not_running" || e.code == "starting" {
                e.message.clone()
            } else {
                format!("{} ({})", e.message, e.code)
            },
            fix: e.fix,
            source: None,
        }
    }
}

/// Facts about a monitor and its VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MonitorInfo {
    /// The sandbox name.
    pub name: String,
    /// The monitor's pid.
    pub monitor_pid: u32,
    /// QEMU's pid, once started.
    pub vmm_pid: Option<u32>,
    /// The sandbox directory.
    pub state_dir: PathBuf,
    /// The hybrid-vsock socket, if the VM has vsock.
    pub vsock_socket: Option<PathBuf>,
    /// The console socket, if the VM has a console.
    pub console_socket: Option<PathBuf>,
    /// The console log, if the VM has a console.
    pub console_log: Option<PathBuf>,
    /// The spec the VM runs.
    pub spec: VmSpec,
    /// Creation time (unix seconds).
    pub created_at: u64,
    /// The monitor's version (crate version).
    pub version: String,
}

/// The monitor's control service (mirrors [`capsa_core::VmInstance`]).
#[tarpc::service]
pub trait Monitor {
    /// Facts about the monitor and VM; answers even while the VM starts.
    async fn describe() -> MonitorInfo;
    /// The VM's status (`Starting` until QEMU runs).
    async fn status() -> Result<VmStatus, RpcError>;
    /// Stops the vCPUs.
    async fn pause() -> Result<(), RpcError>;
    /// Restarts paused vCPUs.
    async fn resume() -> Result<(), RpcError>;
    /// Asks the guest to shut down; returns once asked.
    async fn request_shutdown() -> Result<(), RpcError>;
    /// Ends the VM at once; returns once it has ended.
    async fn kill() -> Result<(), RpcError>;
    /// Waits for the VM to end. Long-running: give the context a far deadline ([`LONG_CALL`]).
    async fn wait() -> Result<ExitReason, RpcError>;
    /// Whether the monitor keeps the VM when its spawner goes away (stdin EOF).
    async fn set_keep_alive(keep: bool);
    /// Saves the VM into `dir`, an absolute path to a new or empty directory
    /// (see [`capsa_core::VmInstance::snapshot`]); the VM goes on as it was.
    /// Long-running: give the context [`SNAPSHOT_CALL`].
    async fn snapshot(dir: PathBuf) -> Result<SnapshotMeta, RpcError>;
    /// Attaches a host directory to the running VM (see
    /// [`capsa_core::VmInstance::attach_share`]); the virtiofsd it starts
    /// belongs to the monitor and ends with the VM.
    async fn attach_share(share: ShareSpec) -> Result<(), RpcError>;
    /// Detaches the share at guest path `guest`; returns it.
    async fn detach_share(guest: String) -> Result<ShareSpec, RpcError>;
    /// The shares attached now.
    async fn shares() -> Result<Vec<ShareSpec>, RpcError>;
    /// Replaces the VM's network policy; new flows follow it at once.
    async fn set_network_policy(policy: NetworkPolicy) -> Result<(), RpcError>;
    /// The network policy in force.
    async fn network_policy() -> Result<NetworkPolicy, RpcError>;
    /// The latest network decisions (bounded), oldest first.
    async fn network_log() -> Result<Vec<NetDecision>, RpcError>;
    /// Forwards a host port into the VM; the listener belongs to the monitor.
    async fn add_port_forward(forward: capsa_core::PortForward) -> Result<(), RpcError>;
    /// Stops forwarding `host_ip:host_port`; returns the forward removed.
    async fn remove_port_forward(
        host_ip: std::net::Ipv4Addr,
        host_port: u16,
    ) -> Result<capsa_core::PortForward, RpcError>;
    /// The host ports forwarded now.
    async fn port_forwards() -> Result<Vec<capsa_core::PortForward>, RpcError>;
    /// Dumps the screen as a binary PPM into a new file under the sandbox
    /// directory's `screens/` and returns its path; the caller moves it away.
    async fn screendump() -> Result<PathBuf, RpcError>;
    /// Sends input events to the VM's tablet and keyboard, as one batch.
    async fn send_input(events: Vec<InputEvent>) -> Result<(), RpcError>;
}

/// Directory of the sandbox directory that screen dumps pass through.
pub const SCREENS_DIR: &str = "screens";

/// A tarpc context whose deadline is `after` from now.
pub fn context_with_deadline(after: Duration) -> tarpc::context::Context {
    let mut ctx = tarpc::context::current();
    ctx.deadline = Instant::now() + after;
    ctx
}

/// The framed JSON transport both ends use over any byte stream.
pub fn transport<S, In, Out>(io: S) -> tarpc::serde_transport::Transport<S, In, Out, Json<In, Out>>
where
    S: AsyncRead + AsyncWrite,
    In: for<'de> Deserialize<'de>,
    Out: Serialize,
{
    let framed = LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_framed(io);
    tarpc::serde_transport::new(framed, Json::default())
}
