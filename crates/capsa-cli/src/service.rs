//! Where the commands on named sandboxes, snapshots and pools go: one
//! [`Service`], the local registry or a capsad chosen by `--host`. Every
//! subcommand calls the service the same way, whichever it is.

use std::path::PathBuf;

use capsa_api::local::LocalService;
use capsa_api::types::SandboxInfo;
use capsa_api::Service;
use capsa_client::RemoteService;
use serde::Serialize;

/// Options every named-sandbox command shares.
#[derive(clap::Args, Debug, Clone)]
pub struct Conn {
    /// Talk to this capsad instead of the monitors directly: `unix:///path/to/capsad.sock`
    /// (or a bare socket path).
    #[arg(long, env = "CAPSA_HOST", global = true)]
    pub host: Option<String>,
    /// Bearer token file for --host (default: capsad.token next to the socket).
    #[arg(long, env = "CAPSA_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// State directory of the sandboxes (default: $XDG_RUNTIME_DIR/capsa, /run/capsa for root).
    #[arg(long, env = "CAPSA_STATE_DIR", global = true)]
    pub state_dir: Option<PathBuf>,
    /// Directory of the named snapshots (default: $XDG_DATA_HOME/capsa/snapshots,
    /// i.e. ~/.local/share/capsa/snapshots). With --host, capsad's store is used.
    #[arg(long, env = "CAPSA_SNAPSHOT_DIR", global = true)]
    pub snapshot_dir: Option<PathBuf>,
}

/// The service `--host` names: capsad's, or the local registry.
pub fn connect(conn: &Conn) -> anyhow::Result<Box<dyn Service>> {
    Ok(match &conn.host {
        Some(h) => Box::new(RemoteService::connect(h, conn.token_file.as_deref())?),
        None => Box::new(LocalService::new(
            conn.state_dir.clone(),
            conn.snapshot_dir.clone(),
        )),
    })
}

/// One sandbox as the CLI shows it, the same whichever service answered.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct View {
    /// The sandbox's name.
    pub name: String,
    /// starting, running, paused, stopped or dead.
    pub state: String,
    /// vCPUs, when the spec is known.
    pub cpus: Option<u32>,
    /// Guest memory in MiB, when the spec is known.
    pub memory_mib: Option<u64>,
    /// The monitor process.
    pub monitor_pid: Option<u32>,
    /// The VMM (QEMU) process.
    pub vmm_pid: Option<u32>,
    /// Creation time, unix seconds.
    pub created_at: u64,
    /// How it ended, if it has.
    pub exit: Option<serde_json::Value>,
    /// The capsad warm pool it belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// `ready` (idle in its pool) or `acquired`, for pool members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_state: Option<String>,
    /// Who manages it besides capsa (e.g. `containerd-shim`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl From<SandboxInfo> for View {
    fn from(i: SandboxInfo) -> Self {
        let spec = i.spec.as_ref();
        View {
            state: serde_json::to_value(i.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| "unknown".into()),
            cpus: spec
                .and_then(|s| s.get("cpus"))
                .and_then(|v| v.as_u64())
                .and_then(|v| u32::try_from(v).ok()),
            memory_mib: spec
                .and_then(|s| s.get("memory_mib"))
                .and_then(|v| v.as_u64()),
            monitor_pid: i.monitor_pid,
            vmm_pid: i.vmm_pid,
            pool: i.pool,
            pool_state: i.pool_state,
            owner: i.owner,
            created_at: i.created_at.unwrap_or(0),
            exit: i.exit,
            name: i.name,
        }
    }
}

/// Runs `f` on each name in turn, printing the name when it worked and the
/// error when it did not (going on with the rest); fails if any failed.
pub async fn each_name<F, Fut>(names: &[String], f: F) -> std::process::ExitCode
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = capsa_api::ApiResult<()>>,
{
    let mut failed = false;
    for n in names {
        match f(n.clone()).await {
            Ok(()) => println!("{n}"),
            Err(e) => {
                failed = true;
                crate::report(&e.into());
            }
        }
    }
    if failed {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
