//! Wiring one guest command to this terminal: shared by `capsa run` and `capsa exec`.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use capsa::ExitStatus;
use capsa_api::types::ExecRequest;
use capsa_api::{ExecChunk, ExecControl, ExecSession};

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

/// The service request for `argv` with the `--timeout` and terminal settings applied.
pub fn request(argv: &[String], stdio: Stdio, timeout: Option<f64>) -> anyhow::Result<ExecRequest> {
    if argv.is_empty() {
        anyhow::bail!("no command given: put it after `--`, e.g. `-- uname -a`");
    }
    let timeout_ms = match timeout {
        Some(t) if !(t.is_finite() && t > 0.0) => {
            anyhow::bail!("--timeout must be a positive number of seconds")
        }
        Some(t) => Some((t * 1000.0).ceil().min(u64::MAX as f64) as u64),
        None => None,
    };
    let mut req = ExecRequest {
        argv: argv.to_vec(),
        timeout_ms,
        // A terminal needs the session's controls (resizes) even without -i.
        interactive: stdio.interactive || stdio.tty.is_some(),
        ..Default::default()
    };
    if let Some((rows, cols)) = stdio.tty {
        req.tty = true;
        req.rows = Some(rows);
        req.cols = Some(cols);
        req.env.insert(
            "TERM".into(),
            std::env::var("TERM").unwrap_or_else(|_| "xterm".into()),
        );
    }
    Ok(req)
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
/// One loop for every service: the session is the same shape whether the
/// command runs through the local registry or a capsad.
pub async fn drive(session: &mut ExecSession, stdio: Stdio) -> anyhow::Result<Finished> {
    let raw = if stdio.tty.is_some() && stdio.interactive {
        RawMode::enter(0)
    } else {
        None
    };
    // SIGINT too in raw mode (where Ctrl-C is a key for the guest): only a
    // `kill -INT` sends it then, and it must not skip restoring the terminal.
    let mut signals = Hangup::catch()?;
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    let control = session.control.clone();
    // Stdin goes in on its own task: a command that does not read its input
    // must not stop this loop from printing its output.
    let feeder = match &control {
        Some(c) if stdio.interactive => {
            let c = c.clone();
            let mut rx = stdin_chunks();
            Some(tokio::spawn(async move {
                while let Some(chunk) = rx.recv().await {
                    if c.send(ExecControl::Stdin(chunk.into())).await.is_err() {
                        return;
                    }
                }
                let _ = c.send(ExecControl::StdinEof).await;
            }))
        }
        Some(c) => {
            let _ = c.send(ExecControl::StdinEof).await;
            None
        }
        None => None,
    };
    let ended = loop {
        tokio::select! {
            c = session.output.recv() => match c {
                Some(ExecChunk::Stdout(b)) => {
                    let mut o = std::io::stdout();
                    o.write_all(&b)?;
                    o.flush()?;
                }
                Some(ExecChunk::Stderr(b)) => {
                    let mut e = std::io::stderr();
                    e.write_all(&b)?;
                    e.flush()?;
                }
                Some(ExecChunk::Exit(s)) => break Ok(s),
                Some(ExecChunk::Error(e)) => return Err(e.into()),
                None => anyhow::bail!("the exec stream ended before the command did"),
            },
            sig = signals.recv() => break Err(sig),
            _ = winch.recv(), if stdio.tty.is_some() => {
                if let (Some(c), Some((rows, cols))) = (&control, window_size()) {
                    // Full only if nobody read 64 resizes; the next window
                    // change sends the size again.
                    if c.try_send(ExecControl::Resize { rows, cols }).is_err() {
                        tracing::debug!("resize to {rows}x{cols} dropped");
                    }
                }
            }
        }
    };
    let finished = match ended {
        Ok(status) => Finished::Exited(status),
        Err(libc::SIGINT) => Finished::Interrupted,
        Err(sig) => {
            // What a closing terminal does to its session.
            if let Some(c) = &control {
                let _ = c.try_send(ExecControl::Signal(libc::SIGHUP));
                let wait_exit = async {
                    while let Some(c) = session.output.recv().await {
                        if matches!(c, ExecChunk::Exit(_) | ExecChunk::Error(_)) {
                            break;
                        }
                    }
                };
                let _ = tokio::time::timeout(HANGUP_GRACE, wait_exit).await;
            }
            Finished::Hangup(sig)
        }
    };
    if let Some(f) = feeder {
        f.abort();
    }
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

/// The shell's code and message for a command that could not start,
/// whichever service refused it (`command_not_found` /
/// `command_not_executable`, before or inside an exec stream).
pub fn not_started(e: &anyhow::Error) -> Option<(u8, String)> {
    let e = e.downcast_ref::<capsa_api::ApiError>()?;
    match e.detail.code {
        capsa_api::ErrorCode::CommandNotFound => Some((127, e.detail.message.clone())),
        capsa_api::ErrorCode::CommandNotExecutable => Some((126, e.detail.message.clone())),
        _ => None,
    }
}
