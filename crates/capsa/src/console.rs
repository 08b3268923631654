//! The guest's serial console as seen from the host.
//!
//! A background task drains the VMM's console output as fast as it comes,
//! appends it to the console log, and keeps the newest bytes in a bounded
//! buffer for readers and pattern waits. Draining eagerly means a guest that
//! prints a lot never stalls because nobody on the host is reading; the bound
//! means it cannot grow host memory without limit either (the log keeps all).

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::PollSender;

use crate::Error;

/// Most console bytes kept in memory for readers; older bytes are dropped (the log keeps them).
pub const CONSOLE_BUFFER_LIMIT: usize = 4 << 20;

#[derive(Default)]
struct Buffer {
    data: VecDeque<u8>,
    eof: bool,
    dropped: u64,
    wakers: Vec<Waker>,
}

struct Shared {
    buf: Mutex<Buffer>,
    notify: Notify,
    log: Option<PathBuf>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Buffer> {
        // A panic while holding this lock leaves plain bytes behind; keep going.
        self.buf.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake(&self, b: &mut Buffer) {
        for w in b.wakers.drain(..) {
            w.wake();
        }
        self.notify.notify_waiters();
    }
}

/// A handle on a VM's serial console. Cheap to clone; clones share one stream.
#[derive(Clone)]
pub struct VmConsole {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Vec<u8>>,
}

impl std::fmt::Debug for VmConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConsole")
            .field("log", &self.shared.log)
            .finish()
    }
}

impl VmConsole {
    /// Starts the pump tasks over the VMM's console streams.
    pub(crate) fn start(
        output: Box<dyn AsyncRead + Send + Sync + Unpin>,
        input: Box<dyn AsyncWrite + Send + Sync + Unpin>,
        log: Option<PathBuf>,
    ) -> io::Result<Self> {
        Self::start_with_log(output, input, log.clone(), log)
    }

    /// Like [`VmConsole::start`], but the log shown by [`VmConsole::log_path`]
    /// (`shown_log`) may be kept by someone else (the monitor process writes
    /// `console.log` itself); only `write_log` is appended to here.
    pub(crate) fn start_with_log(
        mut output: Box<dyn AsyncRead + Send + Sync + Unpin>,
        mut input: Box<dyn AsyncWrite + Send + Sync + Unpin>,
        write_log: Option<PathBuf>,
        shown_log: Option<PathBuf>,
    ) -> io::Result<Self> {
        let log = shown_log;
        let mut log_file = match &write_log {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map(tokio::fs::File::from_std)?,
            ),
            None => None,
        };
        let shared = Arc::new(Shared {
            buf: Mutex::new(Buffer::default()),
            notify: Notify::new(),
            log,
        });
        let s = shared.clone();
        tokio::spawn(async move {
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                let n = match output.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if let Some(f) = log_file.as_mut() {
                    if let Err(e) = f.write_all(&chunk[..n]).await {
                        tracing::warn!("console log write failed, logging stops: {e}");
                        log_file = None;
                    }
                }
                let mut b = s.lock();
                b.data.extend(&chunk[..n]);
                if b.data.len() > CONSOLE_BUFFER_LIMIT {
                    let excess = b.data.len() - CONSOLE_BUFFER_LIMIT;
                    b.data.drain(..excess);
                    b.dropped += excess as u64;
                }
                s.wake(&mut b);
            }
            if let Some(f) = log_file.as_mut() {
                let _ = f.flush().await;
            }
            let mut b = s.lock();
            b.eof = true;
            s.wake(&mut b);
        });
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
        tokio::spawn(async move {
            while let Some(bytes) = rx.recv().await {
                if input.write_all(&bytes).await.is_err() || input.flush().await.is_err() {
                    break;
                }
            }
        });
        Ok(Self { shared, tx })
    }

    /// The console log file, if one is kept.
    pub fn log_path(&self) -> Option<&Path> {
        self.shared.log.as_deref()
    }

    /// Sends bytes to the guest.
    pub async fn write(&self, bytes: &[u8]) -> Result<(), Error> {
        self.tx
            .send(bytes.to_vec())
            .await
            .map_err(|_| Error::ConsoleClosed {
                waiting_for: None,
                tail: self.tail(),
            })
    }

    /// Sends `line` followed by a newline.
    pub async fn write_line(&self, line: &str) -> Result<(), Error> {
        let mut b = Vec::with_capacity(line.len() + 1);
        b.extend_from_slice(line.as_bytes());
        b.push(b'\n');
        self.write(&b).await
    }

    /// Takes everything buffered so far without waiting.
    pub fn read_available(&self) -> String {
        let mut b = self.shared.lock();
        let bytes: Vec<u8> = b.data.drain(..).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Reads at least one byte, waiting for the guest; `Ok(0)` once the console closed.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut b = self.shared.lock();
                if let Some(n) = take_into(&mut b, buf) {
                    return Ok(n);
                }
            }
            notified.await;
        }
    }

    /// Waits until `pattern` appears; returns the text up to and including it, consuming it.
    pub async fn wait_for(&self, pattern: &str, timeout: Duration) -> Result<String, Error> {
        self.wait_for_any(&[pattern], timeout).await.map(|(_, s)| s)
    }

    /// Waits until any of `patterns` appears; returns which one (its index) and the text
    /// up to and including it. The earliest match in the stream wins.
    pub async fn wait_for_any(
        &self,
        patterns: &[&str],
        timeout: Duration,
    ) -> Result<(usize, String), Error> {
        if patterns.is_empty() || patterns.iter().any(|p| p.is_empty()) {
            return Err(Error::InvalidArgument(
                "wait_for needs at least one non-empty pattern".into(),
            ));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut b = self.shared.lock();
                let hay = b.data.make_contiguous();
                let found = patterns
                    .iter()
                    .enumerate()
                    .filter_map(|(i, p)| {
                        memchr::memmem::find(hay, p.as_bytes()).map(|at| (at + p.len(), i))
                    })
                    .min();
                if let Some((end, idx)) = found {
                    let bytes: Vec<u8> = b.data.drain(..end).collect();
                    return Ok((idx, String::from_utf8_lossy(&bytes).into_owned()));
                }
                if b.eof {
                    drop(b);
                    return Err(Error::ConsoleClosed {
                        waiting_for: Some(patterns.join(" | ")),
                        tail: self.tail(),
                    });
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Error::ConsoleTimeout {
                    pattern: patterns.join(" | "),
                    after: timeout,
                    tail: self.tail(),
                });
            }
        }
    }

    /// Splits into an [`AsyncRead`] and an [`AsyncWrite`] half, e.g. for `tokio::io::copy`.
    pub fn split(&self) -> (ConsoleReader, ConsoleWriter) {
        (
            ConsoleReader {
                shared: self.shared.clone(),
            },
            ConsoleWriter {
                tx: PollSender::new(self.tx.clone()),
            },
        )
    }

    /// The last few hundred buffered bytes, for error messages (not consumed).
    fn tail(&self) -> String {
        let b = self.shared.lock();
        let skip = b.data.len().saturating_sub(600);
        let bytes: Vec<u8> = b.data.iter().skip(skip).copied().collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

fn take_into(b: &mut Buffer, buf: &mut [u8]) -> Option<usize> {
    if !b.data.is_empty() {
        let n = buf.len().min(b.data.len());
        for (dst, src) in buf.iter_mut().zip(b.data.drain(..n)) {
            *dst = src;
        }
        return Some(n);
    }
    b.eof.then_some(0)
}

/// The reading half of a console; yields what the guest prints.
pub struct ConsoleReader {
    shared: Arc<Shared>,
}

impl AsyncRead for ConsoleReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut b = self.shared.lock();
        let room = out.remaining();
        if room == 0 {
            return Poll::Ready(Ok(()));
        }
        if !b.data.is_empty() {
            let n = room.min(b.data.len());
            let chunk: Vec<u8> = b.data.drain(..n).collect();
            out.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        if b.eof {
            return Poll::Ready(Ok(()));
        }
        b.wakers.push(cx.waker().clone());
        Poll::Pending
    }
}

/// The writing half of a console; bytes go to the guest.
pub struct ConsoleWriter {
    tx: PollSender<Vec<u8>>,
}

impl AsyncWrite for ConsoleWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let closed = || io::Error::new(io::ErrorKind::BrokenPipe, "console closed");
        match self.tx.poll_reserve(cx) {
            Poll::Ready(Ok(())) => {
                self.tx.send_item(buf.to_vec()).map_err(|_| closed())?;
                Poll::Ready(Ok(buf.len()))
            }
            Poll::Ready(Err(_)) => Poll::Ready(Err(closed())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tx.close();
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console() -> (VmConsole, tokio::io::DuplexStream, tokio::io::DuplexStream) {
        let (guest_out, host_in) = tokio::io::duplex(1 << 16);
        let (host_out, guest_in) = tokio::io::duplex(1 << 16);
        let c = VmConsole::start(Box::new(host_in), Box::new(host_out), None).unwrap();
        (c, guest_out, guest_in)
    }

    #[tokio::test]
    async fn wait_for_consumes_up_to_match() {
        let (c, mut g, _gi) = console();
        g.write_all(b"boot... ready> rest").await.unwrap();
        let s = c.wait_for("ready>", Duration::from_secs(2)).await.unwrap();
        assert_eq!(s, "boot... ready>");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(c.read_available(), " rest");
    }

    #[tokio::test]
    async fn wait_for_any_earliest_and_timeout_and_eof() {
        let (c, mut g, _gi) = console();
        g.write_all(b"xx B yy A").await.unwrap();
        let (i, _) = c
            .wait_for_any(&["A", "B"], Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(i, 1);
        let e = c
            .wait_for("never", Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::ConsoleTimeout { .. }), "{e}");
        drop(g);
        let e = c
            .wait_for("never", Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::ConsoleClosed { .. }), "{e}");
    }

    #[tokio::test]
    async fn split_halves_round_trip() {
        let (c, mut g, mut gi) = console();
        let (mut r, mut w) = c.split();
        w.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        gi.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        g.write_all(b"world").await.unwrap();
        let mut got = [0u8; 5];
        r.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"world");
    }

    #[tokio::test]
    async fn buffer_is_bounded() {
        let (c, mut g, _gi) = console();
        let chunk = vec![b'x'; 1 << 16];
        for _ in 0..((CONSOLE_BUFFER_LIMIT >> 16) + 8) {
            g.write_all(&chunk).await.unwrap();
        }
        g.write_all(b"END").await.unwrap();
        let s = c.wait_for("END", Duration::from_secs(5)).await.unwrap();
        assert!(s.len() <= CONSOLE_BUFFER_LIMIT, "{}", s.len());
    }
}
