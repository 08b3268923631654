//! Where named-sandbox commands go: straight to the monitors, or to a capsad.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use capsa::{Command, ExecChild, SandboxBuilder, Sandboxes};
use serde::Serialize;
use tokio::io::AsyncReadExt;

use crate::exec_io::{self, Finished, Stdio};
use crate::named::{Conn, CreateArgs};

/// One sandbox as the CLI shows it, the same whether it came from the state
/// directory or from capsad.
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
}

impl View {
    /// The view of a sandbox record from the state directory.
    pub fn from_record(r: &capsa::SandboxRecord) -> Self {
        Self {
            name: r.name.clone(),
            state: serde_json::to_value(r.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| format!("{:?}", r.state).to_lowercase()),
            cpus: r.spec.as_ref().map(|s| s.cpus),
            memory_mib: r.spec.as_ref().map(|s| s.memory_mib),
            // A pid of a process that has ended means nothing (it may be reused).
            monitor_pid: r.monitor_pid.filter(|_| r.is_live()),
            vmm_pid: r.vmm_pid.filter(|_| r.is_live()),
            created_at: r.created_at,
            exit: r.exit.as_ref().and_then(|e| serde_json::to_value(e).ok()),
            pool: Sandboxes::label(r, "pool").map(str::to_string),
            pool_state: Sandboxes::label(r, "pool_state").map(str::to_string),
        }
    }
}

/// The backend of the named-sandbox commands.
pub enum Target {
    /// The monitors in a state directory, with no daemon.
    Direct(Sandboxes),
    /// A capsad.
    Remote(crate::remote::Remote),
}

/// A command started by [`Target::spawn`].
pub enum Running {
    /// Through the sandbox's agent; the sandbox handle keeps the connection.
    Direct {
        _sandbox: Box<capsa::Sandbox>,
        child: ExecChild,
    },
    /// Through capsad.
    Remote(crate::remote::RemoteExec),
}

impl Running {
    /// Wires the command to this terminal until it ends.
    pub async fn drive(&mut self, stdio: Stdio) -> anyhow::Result<Finished> {
        match self {
            Running::Direct { child, .. } => exec_io::drive(child, stdio).await,
            Running::Remote(r) => r.drive(stdio).await,
        }
    }

    /// Kills the command (not the sandbox).
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        match self {
            Running::Direct { child, .. } => Ok(child.kill().await?),
            Running::Remote(r) => r.kill().await,
        }
    }
}

impl Target {
    /// Picks the target from `--host` / `--state-dir`.
    pub fn from_conn(conn: &Conn) -> anyhow::Result<Self> {
        match &conn.host {
            Some(h) => Ok(Target::Remote(crate::remote::Remote::connect(
                h,
                conn.token_file.as_deref(),
            )?)),
            None => Ok(Target::Direct(Sandboxes::new(conn.state_dir.clone()))),
        }
    }

    pub async fn create(&self, b: SandboxBuilder, a: &CreateArgs) -> anyhow::Result<View> {
        match self {
            Target::Direct(s) => {
                let sb = s.create(b).await?;
                let rec = sb.detach().await?;
                Ok(View::from_record(&rec))
            }
            Target::Remote(r) => r.create(a).await,
        }
    }

    pub async fn list(&self) -> anyhow::Result<Vec<View>> {
        match self {
            Target::Direct(s) => Ok(s.list()?.iter().map(View::from_record).collect()),
            Target::Remote(r) => r.list().await,
        }
    }

    pub async fn inspect(&self, name: &str) -> anyhow::Result<serde_json::Value> {
        match self {
            Target::Direct(s) => Ok(serde_json::to_value(s.get(name)?)?),
            Target::Remote(r) => r.inspect(name).await,
        }
    }

    pub async fn spawn(&self, name: &str, cmd: &Command, stdio: Stdio) -> anyhow::Result<Running> {
        match self {
            Target::Direct(s) => {
                let sb = s.open(name).await?;
                let child = sb.spawn(cmd).await.map_err(exec_io::start_error)?;
                Ok(Running::Direct {
                    _sandbox: Box::new(sb),
                    child,
                })
            }
            Target::Remote(r) => Ok(Running::Remote(r.spawn(name, cmd, stdio).await?)),
        }
    }

    pub async fn copy_in(&self, name: &str, host: &Path, guest: &str) -> anyhow::Result<()> {
        match self {
            Target::Direct(s) => Ok(s.open(name).await?.copy_in(host, guest).await?),
            Target::Remote(r) => r.copy_in(name, host, guest).await,
        }
    }

    pub async fn copy_out(&self, name: &str, guest: &str, host: &Path) -> anyhow::Result<()> {
        match self {
            Target::Direct(s) => Ok(s.open(name).await?.copy_out(guest, host).await?),
            Target::Remote(r) => r.copy_out(name, guest, host).await,
        }
    }

    pub async fn logs(&self, name: &str, follow: bool) -> anyhow::Result<()> {
        match self {
            Target::Direct(s) => direct_logs(s, name, follow).await,
            Target::Remote(r) => r.logs(name, follow).await,
        }
    }

    pub async fn attach(&self, name: &str) -> anyhow::Result<()> {
        match self {
            Target::Direct(s) => {
                let rec = s.get(name)?;
                let sock = rec.dir.join("console.sock");
                let stream = tokio::net::UnixStream::connect(&sock).await.map_err(|e| {
                    anyhow::anyhow!(
                        "cannot reach the console of {name} at {}: {e} (is it running? see `capsa ps`)",
                        sock.display()
                    )
                })?;
                let (r, w) = stream.into_split();
                bridge_console(name, r, w).await
            }
            Target::Remote(r) => r.attach(name).await,
        }
    }

    pub async fn start(&self, name: &str) -> anyhow::Result<()> {
        match self {
            Target::Direct(s) => {
                let sb = s.start(name).await?;
                sb.detach().await?;
                Ok(())
            }
            Target::Remote(r) => r.start(name).await,
        }
    }

    pub async fn stop(&self, name: &str, grace: Duration) -> anyhow::Result<()> {
        match self {
            Target::Direct(s) => {
                s.stop(name, grace).await?;
                Ok(())
            }
            Target::Remote(r) => r.stop(name, grace).await,
        }
    }

    pub async fn kill(&self, name: &str) -> anyhow::Result<()> {
        match self {
            Target::Direct(s) => {
                s.kill(name).await?;
                Ok(())
            }
            Target::Remote(r) => r.kill(name).await,
        }
    }

    pub async fn remove(&self, name: &str, force: bool) -> anyhow::Result<()> {
        match self {
            Target::Direct(s) => Ok(s.remove(name, force).await?),
            Target::Remote(r) => r.remove(name, force).await,
        }
    }
}

/// Prints the console log, then (with `follow`) new output until the sandbox ends.
async fn direct_logs(s: &Sandboxes, name: &str, follow: bool) -> anyhow::Result<()> {
    let rec = s.get(name)?;
    let path = rec.dir.join("console.log");
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            anyhow::bail!("{name} has no console log yet ({})", path.display())
        }
        Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", path.display())),
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = std::io::stdout();
    loop {
        let n = file.read(&mut buf).await?;
        if n > 0 {
            out.write_all(&buf[..n])?;
            out.flush()?;
            continue;
        }
        if !follow {
            return Ok(());
        }
        let live = matches!(
            s.get(name).map(|r| View::from_record(&r).state),
            Ok(st) if st == "running" || st == "starting" || st == "paused"
        );
        if !live {
            // One last read catches what was written before the end.
            while let Ok(n) = file.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n])?;
            }
            out.flush()?;
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// Wires this terminal to a live console stream until Ctrl-] or the stream ends.
pub async fn bridge_console<R, W>(name: &str, reader: R, writer: W) -> anyhow::Result<()>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin,
{
    eprintln!("[capsa] attached to {name}; Ctrl-] detaches (the sandbox keeps running)\r");
    let never = std::future::pending::<()>();
    match crate::console_io::bridge(reader, writer, never).await {
        crate::console_io::Ended::Closed => eprint!("\r\n[capsa] the console of {name} closed\r\n"),
        _ => eprint!("\r\n[capsa] detached from {name}\r\n"),
    }
    Ok(())
}

/// The default token file of a capsad socket: `capsad.token` beside it.
pub fn default_token_file(socket: &Path) -> PathBuf {
    socket
        .parent()
        .map_or_else(|| PathBuf::from("capsad.token"), |d| d.join("capsad.token"))
}
