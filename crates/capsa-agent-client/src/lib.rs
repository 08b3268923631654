//! Host-side client of the capsa guest agent (`capsa-init` in
//! `capsa.mode=agent`): run processes, move files and ask for facts inside a
//! running VM.
//!
//! The protocol (crate `capsa_proto`) uses one stream per operation, so this
//! client holds no connection state: every call asks its [`Connector`] for a
//! fresh stream to the agent, speaks one conversation on it and drops it. How
//! such a stream is obtained (a vsock to guest port
//! [`AGENT_PORT`](capsa_proto::AGENT_PORT), e.g. through a hybrid-vsock Unix
//! socket and `CONNECT 1024`) is the connector's business; any
//! `AsyncRead + AsyncWrite` stream works, which is how the tests drive an
//! agent on a plain Unix socket.
//!
//! Every call takes an explicit deadline; there are no hidden defaults. On
//! a deadline the connection is dropped, which makes the agent abandon the
//! operation (and kill an exec'd process).
//!
//! Nothing is buffered whole: file content and process output move in
//! [`CHUNK`]-sized frames through bounded buffers, so a
//! slow consumer slows the producer in the guest instead of growing memory.
//!
//! ```no_run
//! # async fn demo() -> Result<(), capsa_agent_client::AgentClientError> {
//! use std::time::Duration;
//! use capsa_agent_client::{AgentClient, BoxedStream, ExecRequest};
//!
//! let client = AgentClient::new(|| async {
//!     let s = tokio::net::UnixStream::connect("/tmp/agent.sock").await?;
//!     Ok(Box::new(s) as BoxedStream)
//! });
//! let out = client
//!     .exec_output(
//!         ExecRequest { argv: vec!["uname".into(), "-a".into()], ..Default::default() },
//!         Duration::from_secs(10),
//!     )
//!     .await?;
//! assert!(out.status.success());
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod error;
mod exec;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use capsa_proto::{asynch, check_path, ClientFrame, Request, CHUNK, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use capsa_proto::{
    AgentError, AgentFrame, AgentInfo, DirEntry, ErrorKind, ExecRequest, ExitStatus, FileKind,
    FileMeta, PtySize, WriteFileRequest,
};
pub use error::{AgentClientError, Result};
pub use exec::{ExecChild, ExecOutput, ExecStdin, Output};

/// The most entries [`AgentClient::list_dir`] accepts for one directory
/// (about 40 MiB of names at worst); [`AgentClient::list_dir_bounded`] takes
/// another bound.
pub const MAX_LIST_ENTRIES: usize = 1 << 17;

/// A connected byte stream to the agent.
pub trait AgentStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AgentStream for T {}

/// A boxed [`AgentStream`], what connectors return.
pub type BoxedStream = Box<dyn AgentStream>;

/// The future a [`Connector`] returns.
pub type ConnectFuture<'a> = Pin<Box<dyn Future<Output = io::Result<BoxedStream>> + Send + 'a>>;

/// Opens a new stream to the agent, once per operation.
///
/// Implemented for closures `Fn() -> impl Future<Output = io::Result<BoxedStream>>`.
/// A connector should fail rather than wait forever when the agent is not
/// there; callers' deadlines bound it anyway.
pub trait Connector: Send + Sync + 'static {
    /// Connects to the agent.
    fn connect(&self) -> ConnectFuture<'_>;
}

impl<F, Fut> Connector for F
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = io::Result<BoxedStream>> + Send + 'static,
{
    fn connect(&self) -> ConnectFuture<'_> {
        Box::pin(self())
    }
}

/// Client of one guest agent. Cheap to clone; calls may run concurrently
/// (each has its own connection).
#[derive(Clone)]
pub struct AgentClient {
    connector: Arc<dyn Connector>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient").finish_non_exhaustive()
    }
}

/// Names an agent frame for error messages without dumping its payload.
pub(crate) fn frame_name(f: &AgentFrame) -> &'static str {
    match f {
        AgentFrame::Info(_) => "Info",
        AgentFrame::Started { .. } => "Started",
        AgentFrame::Stdout(_) => "Stdout",
        AgentFrame::Stderr(_) => "Stderr",
        AgentFrame::Exited(_) => "Exited",
        AgentFrame::Ready => "Ready",
        AgentFrame::Meta(_) => "Meta",
        AgentFrame::Entries(_) => "Entries",
        AgentFrame::Data(_) => "Data",
        AgentFrame::End => "End",
        AgentFrame::Done(_) => "Done",
        AgentFrame::Error(_) => "Error",
        AgentFrame::EntriesPage { .. } => "EntriesPage",
    }
}

fn unexpected(op: &str, f: &AgentFrame) -> AgentClientError {
    AgentClientError::Protocol(format!("unexpected {} frame in {op}", frame_name(f)))
}

fn invalid_path(path: &str) -> Result<()> {
    check_path(path).map_err(|e| AgentClientError::InvalidRequest(e.to_string()))
}

/// Runs `fut` under `deadline`, naming `op` in the timeout error.
async fn within<T>(
    op: &'static str,
    deadline: Duration,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(deadline, fut).await {
        Ok(r) => r,
        Err(_) => {
            tracing::debug!("agent {op}: deadline of {deadline:?} passed");
            Err(AgentClientError::Timeout {
                op,
                after: deadline,
            })
        }
    }
}

async fn send(s: &mut BoxedStream, frame: &ClientFrame) -> Result<()> {
    asynch::write_frame(s, frame).await?;
    s.flush().await?;
    Ok(())
}

/// Reads the next frame; an `Error` frame becomes [`AgentClientError::Remote`].
async fn recv(s: &mut BoxedStream) -> Result<AgentFrame> {
    match asynch::read_frame::<AgentFrame>(s).await? {
        AgentFrame::Error(e) => Err(AgentClientError::Remote(e)),
        f => Ok(f),
    }
}

/// After a failed write the agent has usually said why (an `Error` frame
/// before closing); prefer that over the bare write error.
async fn explain(s: &mut BoxedStream, write_error: AgentClientError) -> AgentClientError {
    match asynch::read_frame::<AgentFrame>(s).await {
        Ok(AgentFrame::Error(e)) => AgentClientError::Remote(e),
        _ => write_error,
    }
}

impl AgentClient {
    /// A client that reaches the agent through `connector`.
    pub fn new(connector: impl Connector) -> Self {
        Self {
            connector: Arc::new(connector),
        }
    }

    /// A client sharing an existing connector.
    pub fn from_shared(connector: Arc<dyn Connector>) -> Self {
        Self { connector }
    }

    /// Connects and sends `Open(request)`.
    async fn open(&self, request: Request) -> Result<BoxedStream> {
        let mut s = self
            .connector
            .connect()
            .await
            .map_err(AgentClientError::Connect)?;
        send(
            &mut s,
            &ClientFrame::Open {
                version: PROTOCOL_VERSION,
                request,
            },
        )
        .await?;
        Ok(s)
    }

    /// One request, one reply frame.
    async fn call(
        &self,
        op: &'static str,
        request: Request,
        deadline: Duration,
    ) -> Result<AgentFrame> {
        within(op, deadline, async {
            let mut s = self.open(request).await?;
            recv(&mut s).await
        })
        .await
    }

    /// Agent and guest facts; also a cheap liveness probe.
    pub async fn info(&self, deadline: Duration) -> Result<AgentInfo> {
        match self.call("info", Request::Info, deadline).await? {
            AgentFrame::Info(i) => Ok(i),
            other => Err(unexpected("info", &other)),
        }
    }

    /// Starts a process and returns it with its streams (see [`ExecChild`]).
    ///
    /// `start_deadline` bounds connecting and starting only. The run itself
    /// is bounded by `req.timeout_ms` (the agent kills the process group and
    /// reports `timed_out`), by the caller dropping the [`ExecChild`], or by
    /// a timeout around [`ExecChild::wait`].
    ///
    /// A program that does not exist fails with
    /// [`AgentClientError::Remote`] of kind [`ErrorKind::NotFound`].
    pub async fn exec(&self, req: ExecRequest, start_deadline: Duration) -> Result<ExecChild> {
        req.validate()
            .map_err(|e| AgentClientError::InvalidRequest(e.to_string()))?;
        let stdin = req.stdin || req.pty.is_some();
        let pty = req.pty.is_some();
        let (s, pid) = within("exec", start_deadline, async {
            let mut s = self.open(Request::Exec(req)).await?;
            match recv(&mut s).await? {
                AgentFrame::Started { pid } => Ok((s, pid)),
                other => Err(unexpected("exec", &other)),
            }
        })
        .await?;
        tracing::debug!("agent exec started pid {pid}");
        Ok(ExecChild::spawn(s, pid, stdin, pty))
    }

    /// Runs a process to its end and collects its output (stdin, if
    /// requested, is closed at once). `deadline` bounds the whole run; when
    /// it passes, the connection is dropped and the agent kills the process.
    ///
    /// The output is held in memory: use [`exec`](Self::exec) and stream it
    /// when it may be large.
    pub async fn exec_output(&self, req: ExecRequest, deadline: Duration) -> Result<Output> {
        req.validate()
            .map_err(|e| AgentClientError::InvalidRequest(e.to_string()))?;
        within("exec_output", deadline, async {
            let mut child = self.exec(req, deadline).await?;
            drop(child.stdin());
            let (out, err) = (child.stdout(), child.stderr());
            let (stdout, stderr) = tokio::join!(exec::read_all(out), exec::read_all(err));
            let status = child.wait().await?;
            Ok(Output {
                status,
                stdout: stdout?,
                stderr: stderr?,
            })
        })
        .await
    }

    /// Creates or replaces a file with the content of `reader`, streamed in
    /// [`CHUNK`] pieces. The agent writes a temporary
    /// file and renames it into place, so the target changes all at once or
    /// not at all. Returns the new file's metadata.
    pub async fn write_file<R: AsyncRead + Unpin>(
        &self,
        req: WriteFileRequest,
        mut reader: R,
        deadline: Duration,
    ) -> Result<FileMeta> {
        invalid_path(&req.path)?;
        within("write_file", deadline, async {
            let mut s = self.open(Request::WriteFile(req)).await?;
            match recv(&mut s).await? {
                AgentFrame::Ready => {}
                other => return Err(unexpected("write_file", &other)),
            }
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = reader.read(&mut buf).await?;
                let frame = if n == 0 {
                    ClientFrame::End
                } else {
                    ClientFrame::Data(buf[..n].to_vec())
                };
                if let Err(e) = send(&mut s, &frame).await {
                    return Err(explain(&mut s, e).await);
                }
                if n == 0 {
                    break;
                }
            }
            match recv(&mut s).await? {
                AgentFrame::Done(Some(meta)) => Ok(meta),
                other => Err(unexpected("write_file", &other)),
            }
        })
        .await
    }

    /// Streams a regular file's content into `writer` and returns its
    /// metadata (taken when the file was opened).
    pub async fn read_file<W: AsyncWrite + Unpin>(
        &self,
        path: &str,
        mut writer: W,
        deadline: Duration,
    ) -> Result<FileMeta> {
        invalid_path(path)?;
        within("read_file", deadline, async {
            let mut s = self
                .open(Request::ReadFile {
                    path: path.to_string(),
                })
                .await?;
            let meta = match recv(&mut s).await? {
                AgentFrame::Meta(m) => m,
                other => return Err(unexpected("read_file", &other)),
            };
            // The guest announced the size when it opened the file: never
            // write more than that, whatever it streams afterwards (a file
            // growing meanwhile, or a hostile agent streaming forever).
            let mut left = meta.size;
            loop {
                match recv(&mut s).await? {
                    AgentFrame::Data(d) => {
                        let n = (d.len() as u64).min(left) as usize;
                        writer.write_all(&d[..n]).await?;
                        left -= n as u64;
                        if n < d.len() {
                            tracing::warn!(
                                path,
                                size = meta.size,
                                "the guest sent more than the size it announced; the copy \
                                 stops at that size"
                            );
                            break;
                        }
                    }
                    AgentFrame::End => break,
                    other => return Err(unexpected("read_file", &other)),
                }
            }
            writer.flush().await?;
            Ok(meta)
        })
        .await
    }

    /// Metadata of `path`, not following a final symlink.
    pub async fn stat(&self, path: &str, deadline: Duration) -> Result<FileMeta> {
        invalid_path(path)?;
        let req = Request::Stat {
            path: path.to_string(),
        };
        match self.call("stat", req, deadline).await? {
            AgentFrame::Meta(m) => Ok(m),
            other => Err(unexpected("stat", &other)),
        }
    }

    /// All entries of a directory, sorted by name. Large directories are
    /// fetched page by page (one connection per page); `deadline` bounds all
    /// of them together.
    pub async fn list_dir(&self, path: &str, deadline: Duration) -> Result<Vec<DirEntry>> {
        self.list_dir_bounded(path, MAX_LIST_ENTRIES, deadline)
            .await
    }

    /// Like [`AgentClient::list_dir`], but fails with
    /// [`AgentClientError::Protocol`] once the guest has sent more than
    /// `max_entries` entries, so an endless listing cannot grow memory.
    pub async fn list_dir_bounded(
        &self,
        path: &str,
        max_entries: usize,
        deadline: Duration,
    ) -> Result<Vec<DirEntry>> {
        invalid_path(path)?;
        within("list_dir", deadline, async {
            let mut all = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let mut s = self
                    .open(Request::ListDirPage {
                        path: path.to_string(),
                        after: after.take(),
                    })
                    .await?;
                match recv(&mut s).await? {
                    AgentFrame::EntriesPage { entries, more } => {
                        let last = entries.last().map(|e| e.name.clone());
                        all.extend(entries);
                        if all.len() > max_entries {
                            return Err(AgentClientError::Protocol(format!(
                                "{path} lists more than {max_entries} entries; copy a \
                                 smaller directory or raise the limit"
                            )));
                        }
                        match (more, last) {
                            (true, Some(last)) => after = Some(last),
                            (true, None) => {
                                return Err(AgentClientError::Protocol(
                                    "empty page announcing more entries".into(),
                                ))
                            }
                            (false, _) => return Ok(all),
                        }
                    }
                    other => return Err(unexpected("list_dir", &other)),
                }
            }
        })
        .await
    }

    /// One page of a directory's entries, sorted by name, starting after the
    /// name `after`; `more` says whether another page follows.
    pub async fn list_dir_page(
        &self,
        path: &str,
        after: Option<&str>,
        deadline: Duration,
    ) -> Result<(Vec<DirEntry>, bool)> {
        invalid_path(path)?;
        let req = Request::ListDirPage {
            path: path.to_string(),
            after: after.map(str::to_string),
        };
        match self.call("list_dir", req, deadline).await? {
            AgentFrame::EntriesPage { entries, more } => Ok((entries, more)),
            other => Err(unexpected("list_dir", &other)),
        }
    }

    /// Creates a directory (with `parents`: like `mkdir -p`) with exactly
    /// `mode` (not filtered by a umask); returns its metadata.
    pub async fn mkdir(
        &self,
        path: &str,
        parents: bool,
        mode: u32,
        deadline: Duration,
    ) -> Result<FileMeta> {
        invalid_path(path)?;
        let req = Request::Mkdir {
            path: path.to_string(),
            parents,
            mode,
        };
        match self.call("mkdir", req, deadline).await? {
            AgentFrame::Done(Some(m)) => Ok(m),
            other => Err(unexpected("mkdir", &other)),
        }
    }

    /// Gives the guest a fresh identity (hostname, machine id, RNG reseed,
    /// wall clock); used right after a snapshot restore so clones differ.
    pub async fn set_identity(
        &self,
        req: capsa_proto::IdentityRequest,
        deadline: Duration,
    ) -> Result<()> {
        req.validate()
            .map_err(|e| AgentClientError::InvalidRequest(e.to_string()))?;
        match self
            .call("set_identity", Request::SetIdentity(req), deadline)
            .await?
        {
            AgentFrame::Done(_) => Ok(()),
            other => Err(unexpected("set_identity", &other)),
        }
    }

    /// Mounts the virtio-fs device tagged `tag` at guest path `path`.
    pub async fn mount(
        &self,
        tag: &str,
        path: &str,
        read_only: bool,
        deadline: Duration,
    ) -> Result<()> {
        invalid_path(path)?;
        let req = Request::Mount {
            tag: tag.to_string(),
            path: path.to_string(),
            read_only,
        };
        match self.call("mount", req, deadline).await? {
            AgentFrame::Done(_) => Ok(()),
            other => Err(unexpected("mount", &other)),
        }
    }

    /// Unmounts (lazily) what is mounted at guest path `path`.
    pub async fn unmount(&self, path: &str, deadline: Duration) -> Result<()> {
        invalid_path(path)?;
        let req = Request::Unmount {
            path: path.to_string(),
        };
        match self.call("unmount", req, deadline).await? {
            AgentFrame::Done(_) => Ok(()),
            other => Err(unexpected("unmount", &other)),
        }
    }

    /// Removes a file, a symlink or an empty directory; with `recursive`, a
    /// directory and everything below it (symlinks are not followed).
    pub async fn remove(&self, path: &str, recursive: bool, deadline: Duration) -> Result<()> {
        invalid_path(path)?;
        let req = Request::Remove {
            path: path.to_string(),
            recursive,
        };
        match self.call("remove", req, deadline).await? {
            AgentFrame::Done(_) => Ok(()),
            other => Err(unexpected("remove", &other)),
        }
    }
}
