//! A running exec: its stdio streams, control and exit status.
//!
//! After `Started`, the connection is split between two tasks: a reader that
//! routes `Stdout`/`Stderr` frames into bounded in-memory pipes
//! ([`tokio::io::duplex`]) and delivers the final status, and a writer that
//! turns what the caller writes into `Stdin` frames and forwards signals and
//! resizes. The pipes are bounded, so a caller that reads slowly makes the
//! reader task stop reading the connection, which makes the agent stop
//! reading the process's pipe, which blocks the process: back-pressure end
//! to end, nothing buffered without bound.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use capsa_proto::{asynch, AgentFrame, ClientFrame, ExitStatus, PtySize, CHUNK};
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf, ReadHalf, WriteHalf,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::{frame_name, AgentClientError, BoxedStream, Result};

/// Capacity of each in-memory stdio pipe between the caller and the tasks.
const PIPE_BYTES: usize = 2 * CHUNK;
/// Queued control messages (signals, resizes) before `signal` waits.
const CONTROL_QUEUE: usize = 16;
/// Highest signal number Linux knows (`SIGRTMAX`); the agent refuses more.
const MAX_SIGNAL: i32 = 64;

/// The caller's end of a process's stdin. Writes become `Stdin` frames;
/// shutting it down or dropping it closes the process's stdin (on a PTY:
/// sends `^D`).
#[derive(Debug)]
pub struct ExecStdin(DuplexStream);

impl AsyncWrite for ExecStdin {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The caller's end of a process's stdout or stderr: bytes in the order the
/// process wrote them, then EOF once the exec is over.
#[derive(Debug)]
pub struct ExecOutput(DuplexStream);

impl AsyncRead for ExecOutput {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

/// Messages from the caller to the writer task.
enum Control {
    Signal(i32),
    Resize(PtySize),
}

/// A process running in the guest.
///
/// Take its streams with [`stdin`](Self::stdin), [`stdout`](Self::stdout) and
/// [`stderr`](Self::stderr) and read them concurrently with waiting (as with
/// any child process, an output stream that is taken but not read fills up
/// and stalls the process). Streams not taken when [`wait`](Self::wait) is
/// called are dropped: output is discarded, stdin is closed.
///
/// Dropping an `ExecChild` closes the connection; the agent then kills the
/// process group.
#[derive(Debug)]
pub struct ExecChild {
    pid: u32,
    stdin: Option<ExecStdin>,
    stdout: Option<ExecOutput>,
    stderr: Option<ExecOutput>,
    control: mpsc::Sender<Control>,
    status: Option<oneshot::Receiver<Result<ExitStatus>>>,
    exit: Option<ExitStatus>,
    /// Why the first `wait` failed, repeated by later calls.
    failure: Option<String>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Control::Signal(n) => write!(f, "Signal({n})"),
            Control::Resize(s) => write!(f, "Resize({}x{})", s.rows, s.cols),
        }
    }
}

impl ExecChild {
    /// Takes over a connection on which `Started{pid}` was just received.
    pub(crate) fn spawn(stream: BoxedStream, pid: u32, stdin: bool, pty: bool) -> Self {
        let (rd, wr) = tokio::io::split(stream);
        let (out_user, out_task) = tokio::io::duplex(PIPE_BYTES);
        let (err_user, err_task) = if pty {
            (None, None)
        } else {
            let (u, t) = tokio::io::duplex(PIPE_BYTES);
            (Some(u), Some(t))
        };
        let (in_user, in_task) = if stdin {
            let (u, t) = tokio::io::duplex(PIPE_BYTES);
            (Some(u), Some(t))
        } else {
            (None, None)
        };
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (status_tx, status_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let reader = tokio::spawn(read_loop(rd, Some(out_task), err_task, status_tx, done_tx));
        let writer = tokio::spawn(write_loop(wr, in_task, control_rx, done_rx));
        Self {
            pid,
            stdin: in_user.map(ExecStdin),
            stdout: Some(ExecOutput(out_user)),
            stderr: err_user.map(ExecOutput),
            control: control_tx,
            status: Some(status_rx),
            exit: None,
            failure: None,
            reader,
            writer,
        }
    }

    /// The process id in the guest (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Takes the process's stdin: `None` if the request had `stdin: false`
    /// and no PTY, or if it was taken already.
    pub fn stdin(&mut self) -> Option<ExecStdin> {
        self.stdin.take()
    }

    /// Takes the process's stdout (with a PTY: everything the terminal
    /// shows); `None` once taken.
    pub fn stdout(&mut self) -> Option<ExecOutput> {
        self.stdout.take()
    }

    /// Takes the process's stderr; `None` with a PTY (merged into stdout) or
    /// once taken.
    pub fn stderr(&mut self) -> Option<ExecOutput> {
        self.stderr.take()
    }

    async fn control(&self, c: Control) -> Result<()> {
        self.control.send(c).await.map_err(|_| {
            AgentClientError::Io(io::Error::new(
                io::ErrorKind::NotConnected,
                "the exec has ended",
            ))
        })
    }

    /// Sends signal `sig` to the process's group; an error means the exec
    /// has ended.
    ///
    /// Signals (and resizes) go out ahead of stdin bytes still buffered in
    /// the client, so they are not stuck behind a caller that keeps writing;
    /// in the guest they are handled in order with the stdin frames that
    /// reached it. To interrupt a program on a PTY the way a terminal does,
    /// write `\x03` to stdin instead.
    ///
    /// A signal number outside `1..=64` is refused here, before it can reach
    /// the agent (which would end the exec over it).
    pub async fn signal(&self, sig: i32) -> Result<()> {
        if !(1..=MAX_SIGNAL).contains(&sig) {
            return Err(AgentClientError::InvalidRequest(format!(
                "signal {sig} is out of range; give a number from 1 to {MAX_SIGNAL}"
            )));
        }
        self.control(Control::Signal(sig)).await
    }

    /// Kills the process group (`SIGKILL`).
    pub async fn kill(&self) -> Result<()> {
        self.signal(9).await
    }

    /// Resizes the PTY (ignored by the agent without one).
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        self.control(Control::Resize(PtySize { rows, cols })).await
    }

    /// Waits for the process to end and returns how it ended. Drops the
    /// streams that were not taken first (see the type's docs).
    ///
    /// Has no deadline of its own: bound it with the request's `timeout_ms`
    /// (enforced in the guest) or wrap it in `tokio::time::timeout`.
    /// Calling it again returns the same status (or the same failure).
    ///
    /// Cancel-safe: it may be a branch of a `tokio::select!` loop that also
    /// resizes or signals; a `wait` dropped before the status arrived loses
    /// nothing, the next call picks the status up.
    pub async fn wait(&mut self) -> Result<ExitStatus> {
        if let Some(st) = self.exit {
            return Ok(st);
        }
        self.stdin = None;
        self.stdout = None;
        self.stderr = None;
        let Some(rx) = self.status.as_mut() else {
            return Err(self.failed_again());
        };
        // Awaited in place (not taken out of `self`): if this future is
        // dropped here, the receiver and the status to come stay put.
        let got = rx.await;
        self.status = None;
        let st = match got {
            Ok(Ok(st)) => st,
            Ok(Err(e)) => {
                self.failure = Some(e.to_string());
                return Err(e);
            }
            Err(_) => {
                let e = AgentClientError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the exec's connection task ended without a status",
                ));
                self.failure = Some(e.to_string());
                return Err(e);
            }
        };
        self.exit = Some(st);
        Ok(st)
    }

    /// The error of a `wait` after one that failed: the same reason again.
    fn failed_again(&self) -> AgentClientError {
        AgentClientError::Io(io::Error::new(
            io::ErrorKind::NotConnected,
            format!(
                "the exec had already failed: {}",
                self.failure.as_deref().unwrap_or("unknown reason")
            ),
        ))
    }
}

impl Drop for ExecChild {
    fn drop(&mut self) {
        // Both halves of the stream go away with the tasks: the connection
        // closes and the agent kills the process group if it still runs.
        self.reader.abort();
        self.writer.abort();
    }
}

async fn forward(sink: &mut Option<DuplexStream>, data: &[u8]) {
    if let Some(s) = sink {
        if s.write_all(data).await.is_err() {
            // The caller dropped this stream: discard its output from now on.
            *sink = None;
        }
    }
}

async fn read_loop(
    mut rd: ReadHalf<BoxedStream>,
    mut stdout: Option<DuplexStream>,
    mut stderr: Option<DuplexStream>,
    status: oneshot::Sender<Result<ExitStatus>>,
    done: oneshot::Sender<()>,
) {
    let result = loop {
        match asynch::read_frame::<AgentFrame>(&mut rd).await {
            Ok(AgentFrame::Stdout(data)) => forward(&mut stdout, &data).await,
            Ok(AgentFrame::Stderr(data)) => forward(&mut stderr, &data).await,
            Ok(AgentFrame::Exited(st)) => break Ok(st),
            Ok(AgentFrame::Error(e)) => break Err(AgentClientError::Remote(e)),
            Ok(other) => {
                break Err(AgentClientError::Protocol(format!(
                    "unexpected {} frame during an exec",
                    frame_name(&other)
                )))
            }
            Err(e) => break Err(e.into()),
        }
    };
    if let Err(e) = &result {
        tracing::debug!("exec connection ended: {e}");
    }
    // EOF for the caller's readers, after every byte was handed over.
    drop(stdout);
    drop(stderr);
    let _ = status.send(result);
    let _ = done.send(());
}

/// Reads the caller's stdin, or never completes when there is none.
async fn read_stdin(stdin: &mut Option<DuplexStream>, buf: &mut [u8]) -> io::Result<usize> {
    match stdin {
        Some(s) => s.read(buf).await,
        None => std::future::pending().await,
    }
}

async fn write_loop(
    mut wr: WriteHalf<BoxedStream>,
    mut stdin: Option<DuplexStream>,
    mut control: mpsc::Receiver<Control>,
    mut done: oneshot::Receiver<()>,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let frame = tokio::select! {
            // Control first: a signal or resize must not wait behind a
            // stream of stdin data the caller keeps writing.
            biased;
            // The exec is over: drop our half so the connection closes.
            _ = &mut done => return,
            c = control.recv() => match c {
                Some(Control::Signal(n)) => ClientFrame::Signal(n),
                Some(Control::Resize(size)) => ClientFrame::Resize(size),
                // The ExecChild is gone (and is aborting this task).
                None => return,
            },
            n = read_stdin(&mut stdin, &mut buf) => match n {
                Ok(n) if n > 0 => ClientFrame::Stdin(buf[..n].to_vec()),
                _ => {
                    stdin = None;
                    ClientFrame::StdinEof
                }
            },
        };
        let sent = async {
            asynch::write_frame(&mut wr, &frame).await?;
            wr.flush().await?;
            Ok::<_, capsa_proto::ProtoError>(())
        };
        if let Err(e) = sent.await {
            // The reader reports why the connection ended.
            tracing::debug!("exec connection write failed: {e}");
            return;
        }
    }
}

/// What [`AgentClient::exec_output`](crate::AgentClient::exec_output) collects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// How the process ended.
    pub status: ExitStatus,
    /// Everything it wrote to stdout (with a PTY: everything the terminal showed).
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr (empty with a PTY).
    pub stderr: Vec<u8>,
}

/// Reads a stream to its end (`None` reads as empty).
pub(crate) async fn read_all(out: Option<ExecOutput>) -> io::Result<Vec<u8>> {
    let mut v = Vec::new();
    if let Some(mut o) = out {
        o.read_to_end(&mut v).await?;
    }
    Ok(v)
}
