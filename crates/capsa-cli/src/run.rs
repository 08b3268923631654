//! `capsa run`: a fresh sandbox, one command, its output and exit code, teardown.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use capsa::{Accel, Capsa, DiskSpec};

use crate::exec_io::{self, Finished, Stdio};

/// Flags of `capsa run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Guest memory, e.g. 512M or 2G.
    #[arg(long, default_value = "512M", value_parser = crate::parse_mib)]
    memory: u64,
    /// Environment variable for the command (KEY=VALUE). Repeatable.
    #[arg(long = "env", short = 'e', value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory in the guest.
    #[arg(long, short = 'w')]
    workdir: Option<String>,
    /// Stream this terminal's stdin to the command.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Run the command on a pseudo-terminal (use with -i for a shell).
    #[arg(short = 't', long)]
    tty: bool,
    /// Use a pseudo-terminal even though stdin is not a terminal (implies -t).
    #[arg(long)]
    force_tty: bool,
    /// Accelerator: auto (probe), kvm or tcg.
    #[arg(long, default_value = "auto", value_parser = crate::boot::parse_accel)]
    accel: Accel,
    /// Kill the command after this many seconds (exit code 124, like timeout(1)).
    #[arg(long)]
    timeout: Option<f64>,
    /// Attach a disk image (raw or qcow2); append :ro for read-only, :dev to allow a host block device. Repeatable.
    #[arg(long = "disk", value_name = "PATH[:ro][:dev]")]
    disks: Vec<String>,
    /// Copy a host file or directory into the guest before the command: HOST:GUEST. Repeatable.
    #[arg(long = "copy-in", value_name = "HOST:GUEST", value_parser = parse_copy_in)]
    copy_in: Vec<(PathBuf, String)>,
    /// Copy a guest file or directory out after the command: GUEST:HOST. Repeatable.
    #[arg(long = "copy-out", value_name = "GUEST:HOST", value_parser = parse_copy_out)]
    copy_out: Vec<(String, PathBuf)>,
    /// A name for the VM.
    #[arg(long)]
    name: Option<String>,
    /// Boot cold instead of restoring the cached base snapshot of this spec
    /// (by default the first run saves one and later runs restore it).
    #[arg(long)]
    no_snapshot: bool,
    #[command(flatten)]
    pub net: crate::network::NetArgs,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

pub(crate) fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

fn parse_copy_in(s: &str) -> Result<(PathBuf, String), String> {
    // The guest side is absolute, so the last ':' separates (host paths may hold ':').
    match s.rsplit_once(':') {
        Some((h, g)) if !h.is_empty() && g.starts_with('/') => {
            Ok((PathBuf::from(h), g.to_string()))
        }
        _ => Err(format!(
            "{s:?} is not HOST:GUEST with an absolute GUEST path"
        )),
    }
}

fn parse_copy_out(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once(':') {
        Some((g, h)) if g.starts_with('/') && !h.is_empty() => {
            Ok((g.to_string(), PathBuf::from(h)))
        }
        _ => Err(format!(
            "{s:?} is not GUEST:HOST with an absolute GUEST path"
        )),
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    // Refused before anything boots.
    let stdio = Stdio::from_flags(args.interactive, args.tty, args.force_tty)?;
    let cmd = exec_io::command(&args.command, stdio, args.timeout)?;
    let mut b = Capsa::sandbox()
        .cpus(args.cpus)
        .memory_mb(args.memory)
        .accel(args.accel);
    for (k, v) in &args.env {
        b = b.env(k, v);
    }
    if let Some(w) = &args.workdir {
        b = b.workdir(w);
    }
    for d in &args.disks {
        b = b.disk(DiskSpec::parse_cli(d));
    }
    if let Some(n) = &args.name {
        b = b.name(n);
    }
    b = b.network(args.net.spec()?);
    // Ctrl-C, SIGHUP or SIGTERM while booting tears the VM down too:
    // dropping the future drops the VM.
    let mut signals = crate::term::Hangup::catch()?;
    let sb = tokio::select! {
        r = async {
            if args.no_snapshot {
                b.build().await
            } else {
                capsa::base_snapshot::build(b).await
            }
        } => r?,
        sig = signals.recv() => return Ok(ExitCode::from((128 + sig) as u8)),
    };
    let copied = tokio::select! {
        r = async {
            for (h, g) in &args.copy_in {
                sb.copy_in(h, g).await?;
            }
            Ok::<_, capsa::Error>(())
        } => Some(r),
        sig = signals.recv() => { sb.kill().await?; return Ok(ExitCode::from((128 + sig) as u8)) }
    };
    if let Some(r) = copied {
        r?;
    }
    // From here `drive` catches the signals itself.
    drop(signals);

    let mut child = match sb.spawn(&cmd).await {
        Ok(c) => c,
        Err(e) => {
            let _ = sb.kill().await;
            return Err(exec_io::start_error(e));
        }
    };
    let status = match exec_io::drive(&mut child, stdio).await? {
        Finished::Exited(s) => s,
        ended => {
            if matches!(ended, Finished::Interrupted) {
                eprintln!("[capsa] interrupted; tearing the sandbox down");
            }
            drop(child);
            sb.kill().await?;
            return Ok(ended.signal_code().unwrap_or(ExitCode::FAILURE));
        }
    };
    for (g, h) in &args.copy_out {
        sb.copy_out(g, h).await?;
    }
    if args.disks.is_empty() {
        sb.kill().await?;
    } else {
        // Attached disks may hold unflushed guest writes: shut down properly.
        sb.vm().stop_timeout(Duration::from_secs(10)).await?;
    }
    Ok(exec_io::exit_code(&status))
}
