//! Wiring one guest command to this terminal: shared by `capsa run` and `capsa exec`.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use capsa::{Command, ExecChild, ExitStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::term::{Hangup, RawMode};

/// How the command meets the terminal.
#[derive(Debug, Clone, Copy)]
pub struct Stdio {
    /// Stream this terminal's stdin to the command.
    pub interactive: bool,
    /// Run on a pseudo-terminal of this size (rows, cols).
    pub tty: Option<(u16, u16)>,
}

impl Stdio {
    /// From the `-i`/`-t`/`--force-tty` flags; a pty takes this terminal's
    /// size (80x24 when it has none). Like `docker run -t`, a PTY is refused
    /// when stdin is not a terminal, unless forced.
    pub fn from_flags(interactive: bool, tty: bool, force_tty: bool) -> anyhow::Result<Self> {
        if tty && !force_tty && !crate::term::is_tty(0) {
            anyhow::bail!(
                "the input device is not a TTY; fix: drop -t (use -i alone to stream piped input), \
                 or pass --force-tty to run on a pseudo-terminal anyway"
            );
        }
        let tty = (tty || force_tty).then(|| window_size().unwrap_or((24, 80)));
        Ok(Self { interactive, tty })
    }
}

/// How a driven command ended.
pub enum Finished {
    /// It exited (or was killed by its timeout or a signal).
    Exited(ExitStatus),
    /// The user pressed Ctrl-C (outside raw mode).
    Interrupted,
    /// The CLI got this signal (SIGHUP: the terminal closed; SIGTERM); the
    /// command was sent SIGHUP, as a closing terminal does.
    Hangup(i32),
}

impl Finished {
    /// The exit code of a session that did not end by the command's own exit
    /// (the shell convention, 128 + signal).
    pub fn signal_code(&self) -> Option<ExitCode> {
        match self {
            Finished::Exited(_) => None,
            Finished::Interrupted => Some(ExitCode::from(130)),
            Finished::Hangup(sig) => Some(ExitCode::from((128 + sig).clamp(0, 255) as u8)),
        }
    }
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

/// The terminal size of stdin, else of stdout, if either is a terminal.
pub fn window_size() -> Option<(u16, u16)> {
    [0, 1].into_iter().find_map(|fd| {
        // SAFETY: TIOCGWINSZ fills the winsize struct we own.
        unsafe {
            let mut ws: libc::winsize = std::mem::zeroed();
            (libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_row > 0 && ws.ws_col > 0)
                .then_some((ws.ws_row, ws.ws_col))
        }
    })
}

/// This terminal's stdin as a stream of chunks, read on a plain thread (a
/// blocking read cannot be cancelled and must not hold up the runtime).
/// The channel closes at EOF or on a read error (the terminal went away).
pub fn stdin_chunks() -> tokio::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        let mut i = std::io::stdin();
        let mut buf = [0u8; 16 * 1024];
        loop {
            match i.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    });
    rx
}

/// How long a command gets to exit after the SIGHUP of a closed terminal
/// before its connection is dropped (and the agent kills it).
pub const HANGUP_GRACE: Duration = Duration::from_secs(2);

/// Pumps stdin/stdout/stderr and window changes until the command ends, or
/// Ctrl-C (outside raw mode), SIGHUP or SIGTERM. A failed resize is logged
/// and the session goes on. The terminal mode is restored on every path.
pub async fn drive(child: &mut ExecChild, stdio: Stdio) -> anyhow::Result<Finished> {
    let raw = if stdio.tty.is_some() && stdio.interactive {
        RawMode::enter(0)
    } else {
        None
    };
    // SIGINT too in raw mode (where Ctrl-C is a key for the guest): only a
    // `kill -INT` sends it then, and it must not skip restoring the terminal.
    let mut signals = Hangup::catch()?;
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    let out = child.stdout().map(|o| tokio::spawn(pump(o, false)));
    let err = child.stderr().map(|o| tokio::spawn(pump(o, true)));
    if let Some(mut stdin) = child.stdin() {
        let mut rx = stdin_chunks();
        tokio::spawn(async move {
            while let Some(chunk) = rx.recv().await {
                if stdin.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            let _ = stdin.shutdown().await;
        });
    }
    let ended = loop {
        tokio::select! {
            // Cancel-safe: losing the race to a resize loses no status.
            s = child.wait() => break Ok(s?),
            sig = signals.recv() => break Err(sig),
            _ = winch.recv(), if stdio.tty.is_some() => {
                if let Some((r, c)) = window_size() {
                    if let Err(e) = child.resize(r, c).await {
                        tracing::debug!("resizing the guest terminal to {r}x{c}: {e}");
                    }
                }
            }
        }
    };
    let pumps = [out, err].into_iter().flatten();
    let finished = match ended {
        Ok(status) => {
            for t in pumps {
                let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
            }
            Finished::Exited(status)
        }
        Err(libc::SIGINT) => {
            pumps.for_each(|t| t.abort());
            Finished::Interrupted
        }
        Err(sig) => {
            // What a closing terminal does to its session.
            let _ = child.signal(libc::SIGHUP).await;
            let _ = tokio::time::timeout(HANGUP_GRACE, child.wait()).await;
            pumps.for_each(|t| t.abort());
            Finished::Hangup(sig)
        }
    };
    drop(raw);
    Ok(finished)
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

/// The shell's code and message for a command that could not start,
/// whichever face refused it: the direct path ([`NotStarted`]) or capsad
/// (`command_not_found` / `command_not_executable`, before or inside an
/// exec stream).
pub fn not_started(e: &anyhow::Error) -> Option<(u8, String)> {
    if let Some(ns) = e.downcast_ref::<NotStarted>() {
        return Some((ns.code, ns.message.clone()));
    }
    use capsad::ErrorCode as C;
    match e.downcast_ref::<capsad::client::ClientError>()? {
        capsad::client::ClientError::Api { detail, .. } => match detail.code {
            C::CommandNotFound => Some((127, detail.message.clone())),
            C::CommandNotExecutable => Some((126, detail.message.clone())),
            _ => None,
        },
        _ => None,
    }
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
