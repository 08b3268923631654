//! The guest agent (`capsa.mode=agent`): exec, files and info for the host,
//! served over vsock port [`capsa_proto::AGENT_PORT`].
//!
//! # Shape
//!
//! One connection per operation (see `capsa_proto`). An accept loop
//! ([`listen::serve`]) hands each connection to [`Agent::dispatch`], which
//! runs [`Agent::serve_connection`] on a thread of its own, up to
//! [`AgentConfig::max_connections`] at once (beyond that the connection gets
//! `Error{Busy}` and is closed). `serve_connection` is generic over the
//! stream (`Read + Write + AsRawFd`), so the same code serves vsock in the
//! guest and Unix sockets in host tests.
//!
//! Exec children are reaped through a [`Reaper`] (see there for why PID 1
//! needs one). Each exec runs in its own session and process group.
//!
//! # Threat model
//!
//! The host is trusted to run the VM, but its messages are parsed as if they
//! were hostile, because a buggy host must not be able to crash PID 1 (which
//! panics the guest kernel) or exhaust guest memory:
//! - no panics on any input; every failure is a reply or a closed connection;
//! - memory per connection grows only with bytes received and is capped at
//!   about one frame ([`capsa_proto::MAX_FRAME`]) plus one I/O chunk; the
//!   connection count is capped, so total agent memory is bounded;
//! - a connection that sends nothing is closed after
//!   [`AgentConfig::open_timeout`] (before `Open`) or
//!   [`AgentConfig::idle_timeout`] (mid file transfer);
//! - paths and exec requests are validated with `capsa_proto::check_path`
//!   and `ExecRequest::validate` before use.
//!
//! What the host asks for is done with root's rights: the agent is the host's
//! hand inside the sandbox, not a boundary against it.

mod exec;
mod frame;
mod fs;
mod identity;
mod info;
pub mod listen;
mod reaper;
pub(crate) mod sys;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capsa_proto::{
    write_frame, AgentError, AgentFrame, ClientFrame, ErrorKind, ProtoError, Request,
    PROTOCOL_VERSION,
};

pub use capsa_proto::AGENT_LISTENING_MARKER;
pub use exec::DRAIN_IDLE;
pub use listen::{Acceptor, Backoff, VsockListener, VsockStream};
pub use reaper::{Reaper, Reaping};

use crate::console::{debug, error, warning};

/// Name of the threads that serve one connection each (PID 1's panic hook
/// spares these: a panic there drops one connection, not the VM).
pub const CONNECTION_THREAD: &str = "agent-conn";

/// Tunables of the agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `TERM` in the default environment of exec'd processes.
    pub term: String,
    /// Most connections served at once.
    pub max_connections: usize,
    /// How long a new connection may take to send its `Open` frame.
    pub open_timeout: Duration,
    /// Longest silence of the host in the middle of a file transfer (and the
    /// longest a blocked send to the host may take).
    pub idle_timeout: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            term: crate::cmdline::DEFAULT_TERM.to_string(),
            max_connections: 256,
            open_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// Why a conversation ended early.
pub(crate) enum Fail {
    /// Tell the client this, then close.
    Reply(AgentError),
    /// The connection is unusable (closed, timed out, broken); just close.
    Gone,
}

/// Sends one frame on a blocking connection.
pub(crate) fn send<S: Write>(conn: &mut S, frame: &AgentFrame) -> Result<(), Fail> {
    write_frame(conn, frame).map_err(|_| Fail::Gone)
}

/// Names a frame for error messages without dumping its payload.
pub(crate) fn client_frame_name(f: &ClientFrame) -> &'static str {
    match f {
        ClientFrame::Open { .. } => "Open",
        ClientFrame::Stdin(_) => "Stdin",
        ClientFrame::StdinEof => "StdinEof",
        ClientFrame::Signal(_) => "Signal",
        ClientFrame::Resize(_) => "Resize",
        ClientFrame::Data(_) => "Data",
        ClientFrame::End => "End",
    }
}

pub(crate) fn invalid(message: impl Into<String>) -> AgentError {
    AgentError {
        kind: ErrorKind::InvalidInput,
        message: message.into(),
    }
}

/// The agent: configuration, the exec reaper and the connection count.
pub struct Agent {
    config: AgentConfig,
    reaper: Arc<Reaper>,
    active: AtomicUsize,
}

/// Decrements the connection count when a connection thread ends (or never started).
struct Slot(Arc<Agent>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Agent {
    /// A new agent. Use [`Reaping::Central`] when the process reaps all its
    /// children on `SIGCHLD` through [`Agent::reaper`] (PID 1), else
    /// [`Reaping::PerChild`].
    pub fn new(config: AgentConfig, reaping: Reaping) -> Arc<Self> {
        Arc::new(Self {
            config,
            reaper: Reaper::new(reaping),
            active: AtomicUsize::new(0),
        })
    }

    /// The table of exec children (the supervisor reaps through it).
    pub fn reaper(&self) -> &Arc<Reaper> {
        &self.reaper
    }

    /// Connections being served right now.
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Serves `stream` on a new thread, or answers `Error{Busy}` and closes it
    /// when [`AgentConfig::max_connections`] are already being served (or no
    /// thread can be started).
    pub fn dispatch<S>(self: &Arc<Self>, stream: S)
    where
        S: Read + Write + AsRawFd + Send + 'static,
    {
        let before = self.active.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(Arc::clone(self));
        if before >= self.config.max_connections {
            drop(slot);
            busy(stream, format!("agent is serving {before} connections"));
            return;
        }
        // Shared so the stream can be taken back if the thread cannot start.
        let cell = Arc::new(Mutex::new(Some(stream)));
        let for_thread = Arc::clone(&cell);
        let spawned = std::thread::Builder::new()
            .name(CONNECTION_THREAD.into())
            .stack_size(512 * 1024)
            .spawn(move || {
                let _slot = slot;
                let stream = for_thread.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(stream) = stream {
                    _slot.0.serve_connection(stream);
                }
            });
        if let Err(e) = spawned {
            warning!("agent: cannot start a connection thread: {e}");
            let stream = cell.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(stream) = stream {
                busy(stream, format!("agent cannot start a thread: {e}"));
            }
        }
    }

    /// Serves one connection to its end on the calling thread: reads `Open`,
    /// does what it asks, replies, closes. Never panics on peer input.
    pub fn serve_connection<S: Read + Write + AsRawFd>(&self, mut stream: S) {
        let fd = stream.as_raw_fd();
        // Not a socket (a pipe in a test): no timeouts, still correct.
        let _ = sys::set_socket_timeouts(fd, self.config.open_timeout);
        let mut rd = frame::FrameReader::new();
        let result = match rd.read_blocking(&mut stream) {
            Ok(ClientFrame::Open { version, request }) if version == PROTOCOL_VERSION => {
                let _ = sys::set_socket_timeouts(fd, self.config.idle_timeout);
                self.handle(&mut stream, &mut rd, request)
            }
            Ok(ClientFrame::Open { version, .. }) => Err(Fail::Reply(AgentError {
                kind: ErrorKind::VersionMismatch,
                message: format!("agent speaks protocol {PROTOCOL_VERSION}, client sent {version}"),
            })),
            Ok(other) => Err(Fail::Reply(invalid(format!(
                "first frame must be Open, got {}",
                client_frame_name(&other)
            )))),
            Err(ProtoError::Closed) | Err(ProtoError::Io(_)) => Err(Fail::Gone),
            Err(e) => Err(Fail::Reply(invalid(e.to_string()))),
        };
        match result {
            Ok(()) | Err(Fail::Gone) => {}
            Err(Fail::Reply(e)) => {
                debug!("agent: replying error: {e}");
                let _ = send(&mut stream, &AgentFrame::Error(e));
            }
        }
        sys::shutdown_write(fd);
    }

    fn handle<S: Read + Write + AsRawFd>(
        &self,
        stream: &mut S,
        rd: &mut frame::FrameReader,
        request: Request,
    ) -> Result<(), Fail> {
        let reply = match request {
            Request::Info => AgentFrame::Info(info::info()),
            Request::Exec(req) => return exec::run(self, stream, rd, req),
            Request::WriteFile(req) => return fs::write_file(stream, rd, req),
            Request::ReadFile { path } => return fs::read_file(stream, &path),
            Request::Stat { path } => fs::stat(&path)?,
            Request::ListDir { path } => fs::list_dir(&path)?,
            Request::ListDirPage { path, after } => fs::list_dir_page(&path, after.as_deref())?,
            Request::Mkdir {
                path,
                parents,
                mode,
            } => fs::mkdir(&path, parents, mode)?,
            Request::Remove { path, recursive } => fs::remove(&path, recursive)?,
            Request::SetIdentity(req) => identity::set_identity(req)?,
            Request::Mount {
                tag,
                path,
                read_only,
            } => fs::mount_virtiofs(&tag, &path, read_only)?,
            Request::Unmount { path } => fs::unmount(&path)?,
        };
        send(stream, &reply)
    }
}

/// Answers `Error{Busy}` without reading anything, then closes.
fn busy<S: Write + AsRawFd>(mut stream: S, message: String) {
    let _ = sys::set_socket_timeouts(stream.as_raw_fd(), Duration::from_secs(1));
    let _ = send(
        &mut stream,
        &AgentFrame::Error(AgentError {
            kind: ErrorKind::Busy,
            message,
        }),
    );
    sys::shutdown_write(stream.as_raw_fd());
}

/// Starts the agent of PID 1: a thread that listens on vsock port
/// [`capsa_proto::AGENT_PORT`] (re-listening after transport resets) and
/// prints [`AGENT_LISTENING_MARKER`] each time it listens. The caller reaps
/// children through [`Agent::reaper`] ([`Reaping::Central`]).
pub fn start_vsock(config: AgentConfig) -> std::io::Result<Arc<Agent>> {
    let agent = Agent::new(config, Reaping::Central);
    let for_thread = Arc::clone(&agent);
    std::thread::Builder::new()
        .name("agent-accept".into())
        .spawn(move || {
            listen::serve(
                &for_thread,
                || VsockListener::bind(capsa_proto::AGENT_PORT),
                || crate::console::write_line(AGENT_LISTENING_MARKER),
                Backoff::default(),
                &|| false,
            )
        })?;
    Ok(agent)
}

/// Signals the host-mode agent takes synchronously.
const HOST_MODE_SIGNALS: &[libc::c_int] =
    &[libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Runs the agent as an ordinary process on a Unix socket at `path`
/// (`capsa-init --agent-unix PATH`), for development and host tests.
///
/// Same code paths as in the guest, PID 1's reaping included: the process
/// becomes a child subreaper (so orphans of exec'd commands come back to it,
/// as they would to PID 1) and reaps centrally on `SIGCHLD`. `SIGTERM`,
/// `SIGINT` or `SIGHUP` kill every exec'd process group and end it.
/// Returns the exit code.
pub fn run_on_unix_socket(path: &Path) -> i32 {
    if let Err(e) = sys::block_signals(HOST_MODE_SIGNALS) {
        error!("agent: cannot block signals: {e}");
        return 1;
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        warning!(
            "agent: cannot become a child subreaper: {}",
            std::io::Error::last_os_error()
        );
    }
    let first = match std::os::unix::net::UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) => {
            error!("agent: cannot listen on {}: {e}", path.display());
            return 1;
        }
    };
    let agent = Agent::new(AgentConfig::default(), Reaping::Central);
    let for_thread = Arc::clone(&agent);
    let owned_path = path.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name("agent-accept".into())
        .spawn(move || {
            let mut first = Some(first);
            listen::serve(
                &for_thread,
                || match first.take() {
                    Some(l) => Ok(l),
                    None => {
                        let _ = std::fs::remove_file(&owned_path);
                        std::os::unix::net::UnixListener::bind(&owned_path)
                    }
                },
                || crate::console::write_line(AGENT_LISTENING_MARKER),
                Backoff::default(),
                &|| false,
            )
        });
    if let Err(e) = spawned {
        error!("agent: cannot start the accept thread: {e}");
        return 1;
    }
    let set = sys::sigset(HOST_MODE_SIGNALS);
    loop {
        // SAFETY: valid sigset; a null siginfo pointer is allowed.
        let sig = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        match sig {
            libc::SIGCHLD => agent.reaper().reap_all(),
            libc::SIGTERM | libc::SIGINT | libc::SIGHUP => {
                agent.reaper().kill_all();
                let _ = std::fs::remove_file(path);
                return 0;
            }
            _ => {}
        }
    }
}
