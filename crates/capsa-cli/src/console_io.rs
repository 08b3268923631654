//! This terminal on a guest serial console: shared by `capsa boot` and `capsa attach`.

use std::future::Future;
use std::io::{Read, Write};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::term::{Hangup, RawMode};

/// The detach key: Ctrl-] (as telnet and virsh use).
pub const DETACH: u8 = 0x1d;

/// Why a console session ended.
pub enum Ended<T> {
    /// The user pressed the detach key.
    Detached,
    /// Ctrl-C outside raw mode (stdin is not a terminal), or SIGHUP/SIGTERM.
    Interrupted,
    /// The console stream closed.
    Closed,
    /// The `until` future finished first (e.g. the VM ended).
    Finished(T),
}

/// Copies the console to stdout and stdin to the console (raw mode when stdin
/// is a terminal) until Ctrl-], Ctrl-C (not in raw mode), SIGHUP or SIGTERM,
/// the stream closes, or `until` completes. The terminal is restored on every
/// path.
///
/// A serial line has no window size the host could set: the guest's console
/// keeps the size it was given (see `stty size` there). On the first window
/// change this says so once, with what to do, instead of silently typing
/// `stty` into whatever program has the console.
pub async fn bridge<R, W, F>(mut reader: R, mut writer: W, until: F) -> Ended<F::Output>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
    F: Future,
{
    let raw = RawMode::enter(0);
    let mut out_task = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        let mut stdout = std::io::stdout();
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stdout
                        .write_all(&buf[..n])
                        .and_then(|_| stdout.flush())
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    // stdin is read on a plain thread: a blocking read cannot be cancelled, and
    // must not hold up the runtime when the session ends first.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || tx.blocking_send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let interactive = raw.is_some();
    let mut signals = Hangup::catch().ok();
    let mut winch =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok();
    let mut stdin_open = true;
    tokio::pin!(until);
    let ended = loop {
        tokio::select! {
            v = &mut until => break Ended::Finished(v),
            _ = &mut out_task => break Ended::Closed,
            chunk = rx.recv(), if stdin_open => match chunk {
                Some(bytes) => {
                    let (data, detach) = match bytes.iter().position(|&c| c == DETACH) {
                        Some(p) => (&bytes[..p], true),
                        None => (&bytes[..], false),
                    };
                    if writer.write_all(data).await.is_err() {
                        stdin_open = false;
                    }
                    if detach {
                        break Ended::Detached;
                    }
                }
                None => stdin_open = false,
            },
            _ = async { match signals.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {
                break Ended::Interrupted
            }
            _ = async { match winch.as_mut() { Some(w) => w.recv().await, None => std::future::pending().await } } => {
                // Once per session: the notice must not bury the console.
                winch = None;
                if interactive {
                    eprint!("\r\n[capsa] the serial console has no window size, so this resize does not \
                        reach the guest; there, run `stty rows R cols C` if a program needs it, or use \
                        `capsa exec -it NAME -- sh` for a terminal that follows resizes\r\n");
                }
            }
        }
    };
    if matches!(ended, Ended::Finished(_)) {
        // Let the last output (e.g. the guest's power-off lines) reach the terminal.
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut out_task).await;
    }
    out_task.abort();
    drop(raw);
    ended
}

/// `capsa attach`: this terminal on a sandbox's live console (from any
/// service) until Ctrl-] or the console closes; the sandbox keeps running.
pub async fn attach(name: &str, console: capsa_api::ConsoleSession) -> anyhow::Result<()> {
    let capsa_api::ConsoleSession { mut output, input } = console;
    // The bridge works on byte streams: pipe the session through.
    let (reader, mut to_reader) = tokio::io::duplex(64 * 1024);
    let (mut from_writer, writer) = tokio::io::duplex(64 * 1024);
    let out = tokio::spawn(async move {
        while let Some(b) = output.recv().await {
            if to_reader.write_all(&b).await.is_err() {
                break;
            }
        }
    });
    let inp = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = from_writer.read(&mut buf).await {
            if n == 0
                || input
                    .send(bytes::Bytes::copy_from_slice(&buf[..n]))
                    .await
                    .is_err()
            {
                break;
            }
        }
    });
    eprintln!("[capsa] attached to {name}; Ctrl-] detaches (the sandbox keeps running)\r");
    let never = std::future::pending::<()>();
    match bridge(reader, writer, never).await {
        Ended::Closed => eprint!("\r\n[capsa] the console of {name} closed\r\n"),
        _ => eprint!("\r\n[capsa] detached from {name}\r\n"),
    }
    // The bridge dropped its writer: the input task ends and the session closes.
    let _ = tokio::time::timeout(Duration::from_secs(2), inp).await;
    out.abort();
    Ok(())
}
