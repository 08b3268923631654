//! Wiring one guest command to this terminal: shared by `capsa run` and `capsa exec`.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use capsa::{Command, ExecChild, ExitStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::term::RawMode;

/// How the command meets the terminal.
#[derive(Debug, Clone, Copy)]
pub struct Stdio {
    /// Stream this terminal's stdin to the command.
    pub interactive: bool,
    /// Run on a pseudo-terminal of this size (rows, cols).
    pub tty: Option<(u16, u16)>,
}

impl Stdio {
    /// From the `-i`/`-t` flags; a pty takes this terminal's size (80x24 when it has none).
    pub fn from_flags(interactive: bool, tty: bool) -> Self {
        let tty = tty.then(|| window_size().unwrap_or((24, 80)));
        Self { interactive, tty }
    }
}

/// How a driven command ended.
pub enum Finished {
    /// It exited (or was killed by its timeout or a signal).
    Exited(ExitStatus),
    /// The user pressed Ctrl-C (outside raw mode).
    Interrupted,
}

/// Builds the guest command for `argv` with the `--timeout` and terminal settings applied.
pub fn command(argv: &[String], stdio: Stdio, timeout: Option<f64>) -> anyhow::Result<Command> {
    let Some((program, args)) = argv.split_first() else {
        anyhow::bail!("no command given: put it after `--`, e.g. `-- uname -a`");
    };
    let mut cmd = Command::new(program).args(args.iter().cloned());
    if stdio.interactive {
        cmd = cmd.stdin_piped();
    }
    if let Some(t) = timeout {
        if !(t.is_finite() && t > 0.0) {
            anyhow::bail!("--timeout must be a positive number of seconds");
        }
        cmd = cmd.timeout(Duration::from_secs_f64(t));
    }
    if let Some((rows, cols)) = stdio.tty {
        cmd = cmd.pty(rows, cols).env(
            "TERM",
            std::env::var("TERM").unwrap_or_else(|_| "xterm".into()),
        );
    }
    Ok(cmd)
}

/// The terminal size of stdout, if it is a terminal.
pub fn window_size() -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ fills the winsize struct we own.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        (libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_row > 0)
            .then_some((ws.ws_row, ws.ws_col))
    }
}

/// Pumps stdin/stdout/stderr and window changes until the command ends or Ctrl-C.
pub async fn drive(child: &mut ExecChild, stdio: Stdio) -> anyhow::Result<Finished> {
    let raw = if stdio.tty.is_some() && stdio.interactive {
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
            _ = winch.recv(), if stdio.tty.is_some() => {
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
    Ok(match status {
        Some(s) => Finished::Exited(s),
        None => Finished::Interrupted,
    })
}

/// The shell convention: the exit code, 128+signal, or 124 after `--timeout`.
/// A code or signal the guest reports out of range (a forged answer) is
/// never mistaken for success: it becomes 255.
pub fn exit_code(status: &ExitStatus) -> ExitCode {
    let code = if status.timed_out {
        eprintln!("[capsa] command timed out");
        124
    } else if let Some(sig) = status.signal {
        if (1..=127).contains(&sig) {
            128 + sig as u8
        } else {
            255
        }
    } else {
        match status.code {
            Some(c) => u8::try_from(c).unwrap_or(255),
            None => 1,
        }
    };
    ExitCode::from(code)
}

/// A command that could not start: the program is missing (exit 127) or
/// not executable (126), as a shell reports it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct NotStarted {
    /// 127 or 126.
    pub code: u8,
    /// The guest's reason.
    pub message: String,
}

/// Turns a failed start into [`NotStarted`] where the shell has a code for it.
pub fn start_error(e: capsa::Error) -> anyhow::Error {
    match e.spawn_exit_code() {
        Some(code) => NotStarted {
            code,
            message: e.to_string(),
        }
        .into(),
        None => e.into(),
    }
}

/// The same for a start refused by capsad.
pub fn remote_start_error(e: capsad::client::ClientError) -> anyhow::Error {
    use capsad::ErrorCode as C;
    if let capsad::client::ClientError::Api { detail, .. } = &e {
        let code = match detail.code {
            C::CommandNotFound => Some(127),
            C::CommandNotExecutable => Some(126),
            _ => None,
        };
        if let Some(code) = code {
            return NotStarted {
                code,
                message: detail.message.clone(),
            }
            .into();
        }
    }
    e.into()
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
