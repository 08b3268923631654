//! Named sandboxes that outlive the CLI: `create`, `ps`, `exec`, `cp`, `logs`,
//! `attach`, `start`, `stop`, `kill`, `rm`, `inspect`.
//!
//! Each command talks either straight to the sandboxes' monitors (found in the
//! state directory) or, with `--host`/`CAPSA_HOST`, to a `capsad` daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use capsa::{Accel, Capsa, DiskSpec};

use crate::exec_io::{self, Finished, Stdio};
use crate::target::Target;

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
}

/// Flags of `capsa create`.
#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// The sandbox's name: 1-63 of a-z, 0-9, '-', '_', '.', starting with a letter or digit.
    #[arg(long)]
    pub name: String,
    /// Restore the named snapshot (see `capsa snapshot ls`) instead of booting:
    /// the VM is the snapshot's (no --cpus/--memory/--accel/--disk), with a fresh identity.
    #[arg(long, value_name = "SNAPSHOT", conflicts_with_all = ["cpus", "memory", "accel", "disks", "network", "allow", "deny"])]
    pub from_snapshot: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Guest memory, e.g. 512M or 2G.
    #[arg(long, default_value = "512M", value_parser = crate::parse_mib)]
    pub memory: u64,
    /// Environment variable for every exec (KEY=VALUE). Repeatable.
    #[arg(long = "env", short = 'e', value_parser = crate::run::parse_env)]
    pub env: Vec<(String, String)>,
    /// Default working directory for execs.
    #[arg(long, short = 'w')]
    pub workdir: Option<String>,
    /// Accelerator: auto (probe), kvm or tcg.
    #[arg(long, default_value = "auto", value_parser = crate::boot::parse_accel)]
    pub accel: Accel,
    /// Attach a disk image (raw or qcow2); append :ro for read-only, :dev to allow a host block device. Repeatable.
    #[arg(long = "disk", value_name = "PATH[:ro][:dev]")]
    pub disks: Vec<String>,
    /// Print the new sandbox's record as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub net: crate::network::NetArgs,
}

/// Flags of `capsa exec`.
#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// The sandbox.
    pub name: String,
    /// Stream this terminal's stdin to the command.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Run the command on a pseudo-terminal (use with -i for a shell).
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Use a pseudo-terminal even though stdin is not a terminal (implies -t).
    #[arg(long)]
    pub force_tty: bool,
    /// Environment variable (KEY=VALUE). Repeatable.
    #[arg(long = "env", short = 'e', value_parser = crate::run::parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory in the guest.
    #[arg(long, short = 'w')]
    pub workdir: Option<String>,
    /// Kill the command after this many seconds (exit code 124).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Flags of `capsa cp`.
#[derive(clap::Args, Debug)]
pub struct CpArgs {
    /// Source: a host path, or NAME:/guest/path.
    pub src: String,
    /// Destination: a host path, or NAME:/guest/path.
    pub dst: String,
}

/// Flags of `capsa logs`.
#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    /// The sandbox.
    pub name: String,
    /// Keep printing new console output until the sandbox ends or Ctrl-C.
    #[arg(short = 'f', long)]
    pub follow: bool,
}

/// Flags of `capsa ps`.
#[derive(clap::Args, Debug)]
pub struct PsArgs {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Flags of commands that take one sandbox name.
#[derive(clap::Args, Debug)]
pub struct NameArgs {
    /// The sandbox.
    pub name: String,
}

/// Flags of `capsa stop`.
#[derive(clap::Args, Debug)]
pub struct StopArgs {
    /// The sandbox.
    pub name: String,
    /// Seconds the guest gets to shut down before it is killed.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
}

/// Flags of `capsa rm`.
#[derive(clap::Args, Debug)]
pub struct RmArgs {
    /// The sandboxes.
    #[arg(required = true)]
    pub names: Vec<String>,
    /// Kill running sandboxes first.
    #[arg(short = 'f', long)]
    pub force: bool,
}

/// Flags of `capsa inspect`.
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// The sandbox.
    pub name: String,
}

pub async fn create(
    conn: &Conn,
    store: &crate::snapshot::StoreArgs,
    a: CreateArgs,
) -> anyhow::Result<ExitCode> {
    if let Some(snap) = &a.from_snapshot {
        let rec = crate::snapshot::create_from(conn, store, &a, snap).await?;
        print_created(&a, &rec)?;
        return Ok(ExitCode::SUCCESS);
    }
    let target = Target::from_conn(conn)?;
    let mut b = Capsa::sandbox()
        .name(&a.name)
        .cpus(a.cpus)
        .memory_mb(a.memory)
        .accel(a.accel);
    for (k, v) in &a.env {
        b = b.env(k, v);
    }
    if let Some(w) = &a.workdir {
        b = b.workdir(w);
    }
    for d in &a.disks {
        b = b.disk(DiskSpec::parse_cli(d));
    }
    b = b.network(a.net.spec()?);
    let rec = target.create(b, &a).await?;
    print_created(&a, &rec)?;
    Ok(ExitCode::SUCCESS)
}

fn print_created(a: &CreateArgs, rec: &crate::target::View) -> anyhow::Result<()> {
    if a.json {
        println!("{}", serde_json::to_string_pretty(rec)?);
    } else {
        println!("{}", a.name);
    }
    Ok(())
}

pub async fn ps(conn: &Conn, a: PsArgs) -> anyhow::Result<ExitCode> {
    let target = Target::from_conn(conn)?;
    let mut list = target.list().await?;
    list.sort_by(|x, y| x.name.cmp(&y.name));
    if a.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<9} {:>4} {:>8} {:>8} {:<16} CREATED",
        "NAME", "STATE", "CPUS", "MEMORY", "PID", "POOL"
    );
    for r in list {
        println!(
            "{:<24} {:<9} {:>4} {:>8} {:>8} {:<16} {}",
            r.name,
            r.state,
            r.cpus.map_or("-".into(), |c| c.to_string()),
            r.memory_mib.map_or("-".into(), |m| format!("{m}M")),
            r.monitor_pid.map_or("-".into(), |p| p.to_string()),
            match (&r.pool, &r.pool_state) {
                (Some(p), Some(s)) => format!("{p} ({s})"),
                (Some(p), None) => p.clone(),
                _ => "-".into(),
            },
            ago(r.created_at)
        );
    }
    // With a daemon, the pools themselves (a pool may have no member yet).
    for line in crate::pool::summaries(conn).await {
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn exec(conn: &Conn, a: ExecArgs) -> anyhow::Result<ExitCode> {
    let stdio = Stdio::from_flags(a.interactive, a.tty, a.force_tty)?;
    let target = Target::from_conn(conn)?;
    let mut cmd = exec_io::command(&a.command, stdio, a.timeout)?;
    for (k, v) in &a.env {
        cmd = cmd.env(k, v);
    }
    if let Some(w) = &a.workdir {
        cmd = cmd.current_dir(w);
    }
    let mut child = target.spawn(&a.name, &cmd, stdio).await?;
    match child.drive(stdio).await? {
        Finished::Exited(s) => Ok(exec_io::exit_code(&s)),
        ended => {
            // The sandbox stays; only the command goes.
            if matches!(ended, Finished::Interrupted) {
                eprintln!("[capsa] interrupted; killing the command (the sandbox keeps running)");
            }
            let _ = child.kill().await;
            Ok(ended.signal_code().unwrap_or(ExitCode::FAILURE))
        }
    }
}

/// One side of `capsa cp`.
#[derive(Debug, PartialEq)]
enum CpEnd {
    Host(PathBuf),
    Guest { name: String, path: String },
}

fn parse_cp_end(s: &str) -> CpEnd {
    // NAME:/abs/path; anything else (./x, /x, x) is a host path.
    if let Some((n, p)) = s.split_once(':') {
        if !n.is_empty() && !n.contains('/') && p.starts_with('/') {
            return CpEnd::Guest {
                name: n.to_string(),
                path: p.to_string(),
            };
        }
    }
    CpEnd::Host(PathBuf::from(s))
}

pub async fn cp(conn: &Conn, a: CpArgs) -> anyhow::Result<ExitCode> {
    let target = Target::from_conn(conn)?;
    match (parse_cp_end(&a.src), parse_cp_end(&a.dst)) {
        (CpEnd::Host(h), CpEnd::Guest { name, path }) => {
            target.copy_in(&name, &h, &path).await?;
        }
        (CpEnd::Guest { name, path }, CpEnd::Host(h)) => {
            target.copy_out(&name, &path, &h).await?;
        }
        (CpEnd::Host(_), CpEnd::Host(_)) => anyhow::bail!(
            "neither side of `capsa cp` names a sandbox: write one side as NAME:/absolute/guest/path"
        ),
        (CpEnd::Guest { .. }, CpEnd::Guest { .. }) => anyhow::bail!(
            "`capsa cp` copies between the host and one sandbox: make one side a host path"
        ),
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn logs(conn: &Conn, a: LogsArgs) -> anyhow::Result<ExitCode> {
    let target = Target::from_conn(conn)?;
    target.logs(&a.name, a.follow).await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn attach(conn: &Conn, a: NameArgs) -> anyhow::Result<ExitCode> {
    let target = Target::from_conn(conn)?;
    target.attach(&a.name).await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn start(conn: &Conn, a: NameArgs) -> anyhow::Result<ExitCode> {
    let target = Target::from_conn(conn)?;
    target.start(&a.name).await?;
    println!("{}", a.name);
    Ok(ExitCode::SUCCESS)
}

pub async fn stop(conn: &Conn, a: StopArgs) -> anyhow::Result<ExitCode> {
    if !(a.timeout.is_finite() && a.timeout >= 0.0) {
        anyhow::bail!("--timeout must be a non-negative number of seconds");
    }
    let target = Target::from_conn(conn)?;
    target
        .stop(&a.name, Duration::from_secs_f64(a.timeout))
        .await?;
    println!("{}", a.name);
    Ok(ExitCode::SUCCESS)
}

pub async fn kill(conn: &Conn, a: NameArgs) -> anyhow::Result<ExitCode> {
    let target = Target::from_conn(conn)?;
    target.kill(&a.name).await?;
    println!("{}", a.name);
    Ok(ExitCode::SUCCESS)
}

pub async fn rm(conn: &Conn, a: RmArgs) -> anyhow::Result<ExitCode> {
    let target = Target::from_conn(conn)?;
    let mut failed = false;
    for n in &a.names {
        match target.remove(n, a.force).await {
            Ok(()) => println!("{n}"),
            Err(e) => {
                failed = true;
                crate::report(&e);
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

pub async fn inspect(conn: &Conn, a: InspectArgs) -> anyhow::Result<ExitCode> {
    let target = Target::from_conn(conn)?;
    let rec = target.inspect(&a.name).await?;
    println!("{}", serde_json::to_string_pretty(&rec)?);
    Ok(ExitCode::SUCCESS)
}

/// "12s ago", "5m ago", ... from unix seconds.
pub(crate) fn ago(created: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let s = now.saturating_sub(created);
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cp_ends() {
        assert_eq!(
            parse_cp_end("box:/etc/hosts"),
            CpEnd::Guest {
                name: "box".into(),
                path: "/etc/hosts".into()
            }
        );
        assert_eq!(parse_cp_end("./a:b"), CpEnd::Host("./a:b".into()));
        assert_eq!(parse_cp_end("/tmp/x"), CpEnd::Host("/tmp/x".into()));
        assert_eq!(parse_cp_end("box:rel"), CpEnd::Host("box:rel".into()));
        assert_eq!(parse_cp_end("a/b:/x"), CpEnd::Host("a/b:/x".into()));
    }

    #[test]
    fn ages() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(ago(now - 5), "5s ago");
        assert_eq!(ago(now - 120), "2m ago");
        assert_eq!(ago(now - 7200), "2h ago");
    }
}
