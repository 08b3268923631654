//! `capsa run`: a fresh sandbox, one command, its output and exit code, teardown.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use capsa::{Accel, Capsa, Command, DiskSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::term::RawMode;

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
    /// Accelerator: auto (probe), kvm or tcg.
    #[arg(long, default_value = "auto", value_parser = crate::boot::parse_accel)]
    accel: Accel,
    /// Kill the command after this many seconds (exit code 124, like timeout(1)).
    #[arg(long)]
    timeout: Option<f64>,
    /// Attach a disk image (raw or qcow2); append :ro for read-only. Repeatable.
    #[arg(long = "disk", value_name = "PATH[:ro]")]
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
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
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

fn window_size() -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ fills the winsize struct we own.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        (libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_row > 0)
            .then_some((ws.ws_row, ws.ws_col))
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
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
    // Ctrl-C while booting tears the VM down too: dropping the future drops the VM.
    let sb = tokio::select! {
        r = async {
            if args.no_snapshot {
                b.build().await
            } else {
                capsa::base_snapshot::build(b).await
            }
        } => r?,
        _ = tokio::signal::ctrl_c() => return Ok(ExitCode::from(130)),
    };
    for (h, g) in &args.copy_in {
        sb.copy_in(h, g).await?;
    }

    let mut cmd = Command::new(&args.command[0]).args(args.command[1..].iter().cloned());
    if args.interactive {
        cmd = cmd.stdin_piped();
    }
    if let Some(t) = args.timeout {
        if !(t.is_finite() && t > 0.0) {
            anyhow::bail!("--timeout must be a positive number of seconds");
        }
        cmd = cmd.timeout(Duration::from_secs_f64(t));
    }
    let tty = args
        .tty
        .then(window_size)
        .flatten()
        .or(args.tty.then_some((24, 80)));
    if let Some((rows, cols)) = tty {
        cmd = cmd.pty(rows, cols).env(
            "TERM",
            std::env::var("TERM").unwrap_or_else(|_| "xterm".into()),
        );
    }
    let mut child = sb.spawn(&cmd).await?;
    let raw = if args.tty && args.interactive {
        RawMode::enter(0)
    } else {
        None
    };

    let out = child.stdout().map(|o| tokio::spawn(pump(o, false)));
    let err = child.stderr().map(|o| tokio::spawn(pump(o, true)));
    if let Some(mut stdin) = child.stdin() {
        // A plain thread: a blocking stdin read cannot be cancelled.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
        std::thread::spawn(move || {
            let mut i = std::io::stdin();
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n) = i.read(&mut buf) {
                if n == 0 || tx.blocking_send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            while let Some(chunk) = rx.recv().await {
                if stdin.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            let _ = stdin.shutdown().await;
        });
    }
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    let status = loop {
        tokio::select! {
            s = child.wait() => break Some(s?),
            _ = tokio::signal::ctrl_c(), if raw.is_none() => break None,
            _ = winch.recv(), if tty.is_some() => {
                if let Some((r, c)) = window_size() {
                    let _ = child.resize(r, c).await;
                }
            }
        }
    };
    for t in [out, err].into_iter().flatten() {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    drop(raw);
    let Some(status) = status else {
        eprintln!("[capsa] interrupted; tearing the sandbox down");
        sb.kill().await?;
        return Ok(ExitCode::from(130));
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
    let code = if status.timed_out {
        eprintln!("[capsa] command timed out");
        124
    } else if let Some(sig) = status.signal {
        128 + sig
    } else {
        status.code.unwrap_or(1)
    };
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

async fn pump(mut from: capsa::ExecOutput, to_stderr: bool) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let r = if to_stderr {
                    let mut e = std::io::stderr();
                    e.write_all(&buf[..n]).and_then(|_| e.flush())
                } else {
                    let mut o = std::io::stdout();
                    o.write_all(&buf[..n]).and_then(|_| o.flush())
                };
                if r.is_err() {
                    return;
                }
            }
        }
    }
}
