//! A typed client of capsad (hyper 1 over a Unix socket or loopback TCP).
//!
//! One connection per request: streams (exec, downloads, console follow,
//! events) own their connection and nothing is multiplexed, so a slow stream
//! never holds up another call.
//!
//! ```no_run
//! # async fn demo() -> Result<(), capsa_client::ClientError> {
//! use capsa_client::Client;
//! use capsa_api::types::{CreateSandboxRequest, ExecRequest};
//! let c = Client::connect("/run/capsa/capsad.sock", "token")?;
//! c.create(&CreateSandboxRequest { name: Some("a".into()), start: true, ..Default::default() }).await?;
//! let out = c.exec_output("a", &ExecRequest { argv: vec!["uname".into()], ..Default::default() }).await?;
//! println!("{}", String::from_utf8_lossy(&out.stdout));
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::pin::Pin;

use base64::Engine as _;
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use http_body_util::{BodyExt, BodyStream, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt};

use capsa_api::types::*;
use capsa_api::ErrorDetail;

/// Longest non-streamed response body read (JSON answers are small).
const MAX_JSON_RESPONSE: usize = 16 << 20;
/// Longest NDJSON line or SSE event accepted from the daemon.
const MAX_LINE: usize = 1 << 20;

/// Everything a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon answered with an error body.
    #[error("capsad: {status}: {}{}", detail.message, detail.fix.as_ref().map(|f| format!("; fix: {f}")).unwrap_or_default())]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// The error body.
        detail: ErrorDetail,
    },
    /// Connecting to the daemon failed.
    #[error("cannot connect to capsad at {at}: {source}; fix: is capsad running? (start it with `capsad`)")]
    Connect {
        /// The socket or address.
        at: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// HTTP failed.
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// Local I/O failed (reading an upload, writing a download).
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon sent something this client does not understand.
    #[error("unexpected answer from capsad: {0}")]
    Decode(String),
    /// The host URL is not `unix:///path` or `http://127.0.0.1:PORT`.
    #[error(
        "bad capsad host {0:?}; fix: use unix:///path/to/capsad.sock or http://127.0.0.1:PORT"
    )]
    BadHost(String),
    /// A WebSocket (interactive exec, live console) failed.
    #[error("WebSocket: {0}")]
    WebSocket(String),
}

/// Result of client calls.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

#[derive(Debug, Clone)]
pub(crate) enum Transport {
    Unix(PathBuf),
    Tcp(String),
}

/// A capsad client (cheap to clone).
#[derive(Debug, Clone)]
pub struct Client {
    pub(crate) transport: Transport,
    pub(crate) token: String,
}

/// Either transport, boxed.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A request body: empty, bytes, or a stream.
type ReqBody = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

/// The collected result of an exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal, if one killed it.
    pub signal: Option<i32>,
    /// Whether its timeout killed it.
    pub timed_out: bool,
    /// Everything on stdout.
    pub stdout: Vec<u8>,
    /// Everything on stderr.
    pub stderr: Vec<u8>,
}

/// One item of a streamed exec, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecChunk {
    /// Bytes from stdout.
    Stdout(Vec<u8>),
    /// Bytes from stderr.
    Stderr(Vec<u8>),
    /// The command ended (last item).
    Exit {
        /// Exit code.
        code: Option<i32>,
        /// Signal.
        signal: Option<i32>,
        /// Killed by its timeout.
        timed_out: bool,
    },
}

/// A boxed stream of results.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T>> + Send>>;

impl Client {
    /// A client of the daemon on Unix socket `socket` (no connection is made yet).
    pub fn connect(socket: impl AsRef<Path>, token: impl Into<String>) -> Result<Self> {
        Ok(Self {
            transport: Transport::Unix(socket.as_ref().to_path_buf()),
            token: token.into(),
        })
    }

    /// A client of the daemon at `host`: `unix:///path/to/capsad.sock`, a bare
    /// absolute socket path, or `http://127.0.0.1:PORT`.
    pub fn from_host(host: &str, token: impl Into<String>) -> Result<Self> {
        let transport = if let Some(p) = host.strip_prefix("unix://") {
            Transport::Unix(p.into())
        } else if host.starts_with('/') {
            Transport::Unix(host.into())
        } else if let Some(a) = host.strip_prefix("http://") {
            Transport::Tcp(a.trim_end_matches('/').to_string())
        } else {
            return Err(ClientError::BadHost(host.into()));
        };
        Ok(Self {
            transport,
            token: token.into(),
        })
    }

    /// A fresh connection to the daemon, and the Host header it wants.
    pub(crate) async fn connect_io(&self) -> Result<(Box<dyn Io>, String)> {
        Ok(match &self.transport {
            Transport::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p).await.map_err(|source| {
                    ClientError::Connect {
                        at: p.display().to_string(),
                        source,
                    }
                })?;
                (Box::new(s), "localhost".into())
            }
            Transport::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a.as_str())
                    .await
                    .map_err(|source| ClientError::Connect {
                        at: a.clone(),
                        source,
                    })?;
                (Box::new(s), a.clone())
            }
        })
    }

    async fn send(&self, req: Request<ReqBody>) -> Result<Response<Incoming>> {
        let (io, _) = self.connect_io().await?;
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("capsad connection: {e}");
            }
        });
        Ok(sender.send_request(req).await?)
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        ctype: Option<&str>,
        body: ReqBody,
    ) -> Request<ReqBody> {
        let host = match &self.transport {
            Transport::Unix(_) => "localhost".to_string(),
            Transport::Tcp(a) => a.clone(),
        };
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host)
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            );
        if let Some(c) = ctype {
            b = b.header(hyper::header::CONTENT_TYPE, c);
        }
        // The parts are all valid by construction (paths are percent-encoded).
        b.body(body).unwrap_or_else(|_| Request::new(empty()))
    }

    /// Sends a request and returns the raw status and body (for tools and tests).
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<Bytes>,
    ) -> Result<(StatusCode, Bytes)> {
        let req = self.request(method, path, content_type, full(body.into()));
        let resp = self.send(req).await?;
        let status = resp.status();
        let body = read_limited(resp.into_body(), MAX_JSON_RESPONSE).await?;
        Ok((status, body))
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        json: Option<Vec<u8>>,
    ) -> Result<T> {
        let (ctype, body) = match json {
            Some(b) => (Some("application/json"), full(b.into())),
            None => (None, empty()),
        };
        let resp = self.send(self.request(method, path, ctype, body)).await?;
        let resp = check(resp).await?;
        let body = read_limited(resp.into_body(), MAX_JSON_RESPONSE).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode(e.to_string()))
    }

    async fn streaming(
        &self,
        method: Method,
        path: &str,
        json: Option<Vec<u8>>,
    ) -> Result<Incoming> {
        let (ctype, body) = match json {
            Some(b) => (Some("application/json"), full(b.into())),
            None => (None, empty()),
        };
        let resp = self.send(self.request(method, path, ctype, body)).await?;
        Ok(check(resp).await?.into_body())
    }

    /// `GET /v1/health`.
    pub async fn health(&self) -> Result<Health> {
        self.call(Method::GET, "/v1/health", None).await
    }

    /// `GET /openapi.json`.
    pub async fn openapi(&self) -> Result<serde_json::Value> {
        self.call(Method::GET, "/openapi.json", None).await
    }

    /// `GET /v1/sandboxes`.
    pub async fn list(&self) -> Result<Vec<SandboxInfo>> {
        self.call(Method::GET, "/v1/sandboxes", None).await
    }

    /// `GET /v1/sandboxes/{name}`.
    pub async fn get(&self, name: &str) -> Result<SandboxInfo> {
        self.call(Method::GET, &sb_path(name, ""), None).await
    }

    /// `POST /v1/sandboxes`: creates (and by default boots) a sandbox.
    pub async fn create(&self, req: &CreateSandboxRequest) -> Result<SandboxInfo> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Decode(e.to_string()))?;
        self.call(Method::POST, "/v1/sandboxes", Some(body)).await
    }

    /// `POST /v1/sandboxes/{name}/start`.
    pub async fn start(&self, name: &str) -> Result<SandboxInfo> {
        self.call(Method::POST, &sb_path(name, "/start"), None)
            .await
    }

    /// `POST /v1/sandboxes/{name}/stop[?grace_secs=N]`.
    pub async fn stop(
        &self,
        name: &str,
        grace: Option<std::time::Duration>,
    ) -> Result<SandboxInfo> {
        let q = grace
            .map(|g| format!("?grace_secs={}", g.as_secs_f64()))
            .unwrap_or_default();
        self.call(Method::POST, &sb_path(name, &format!("/stop{q}")), None)
            .await
    }

    /// `POST /v1/sandboxes/{name}/kill`.
    pub async fn kill(&self, name: &str) -> Result<SandboxInfo> {
        self.call(Method::POST, &sb_path(name, "/kill"), None).await
    }

    /// `DELETE /v1/sandboxes/{name}[?force=true]`.
    pub async fn delete(&self, name: &str, force: bool) -> Result<()> {
        let path = format!("{}?force={force}", sb_path(name, ""));
        let resp = self
            .send(self.request(Method::DELETE, &path, None, empty()))
            .await?;
        check(resp).await?;
        Ok(())
    }

    /// `POST /v1/sandboxes/{name}/exec`: a stream of output chunks as they
    /// happen, ending with [`ExecChunk::Exit`] (an `error` line becomes an `Err`).
    pub async fn exec(&self, name: &str, req: &ExecRequest) -> Result<BoxStream<ExecChunk>> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Decode(e.to_string()))?;
        let incoming = self
            .streaming(Method::POST, &sb_path(name, "/exec"), Some(body))
            .await?;
        let reader = tokio::io::BufReader::new(body_reader(incoming));
        let lines = futures::stream::try_unfold(reader, |mut r| async move {
            let mut line = Vec::new();
            let n = (&mut r)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut line)
                .await?;
            if n == 0 {
                return Ok(None);
            }
            let chunk = decode_exec_event(&line)?;
            Ok(Some((chunk, r)))
        });
        Ok(Box::pin(lines))
    }

    /// Runs a command and collects its output.
    pub async fn exec_output(&self, name: &str, req: &ExecRequest) -> Result<ExecResult> {
        let mut s = self.exec(name, req).await?;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(c) = s.next().await {
            match c? {
                ExecChunk::Stdout(d) => stdout.extend(d),
                ExecChunk::Stderr(d) => stderr.extend(d),
                ExecChunk::Exit {
                    code,
                    signal,
                    timed_out,
                } => {
                    return Ok(ExecResult {
                        code,
                        signal,
                        timed_out,
                        stdout,
                        stderr,
                    })
                }
            }
        }
        Err(ClientError::Decode(
            "the exec stream ended without an exit".into(),
        ))
    }

    /// `GET /v1/sandboxes/{name}/files/stat`: a guest path's metadata.
    pub async fn stat(&self, name: &str, path: &str) -> Result<FileStat> {
        let uri = format!("{}?path={}", sb_path(name, "/files/stat"), enc(path));
        self.call(Method::GET, &uri, None).await
    }

    /// `GET /v1/sandboxes/{name}/files/list`: one page of a guest directory.
    pub async fn list_dir(&self, name: &str, path: &str, after: Option<&str>) -> Result<DirPage> {
        let mut uri = format!("{}?path={}", sb_path(name, "/files/list"), enc(path));
        if let Some(a) = after {
            uri.push_str(&format!("&after={}", enc(a)));
        }
        self.call(Method::GET, &uri, None).await
    }

    /// `POST /v1/sandboxes/{name}/files/mkdir`: a guest directory and its parents.
    pub async fn mkdir(&self, name: &str, path: &str, mode: u32) -> Result<()> {
        let uri = format!(
            "{}?path={}&mode={:o}",
            sb_path(name, "/files/mkdir"),
            enc(path),
            mode
        );
        let resp = self
            .send(self.request(Method::POST, &uri, None, empty()))
            .await?;
        check(resp).await?;
        Ok(())
    }

    /// Like [`Client::upload`], also setting the file's modification time
    /// (seconds since the epoch).
    pub async fn upload_with_mtime<R: AsyncRead + Send + 'static>(
        &self,
        name: &str,
        path: &str,
        mode: u32,
        mtime: Option<i64>,
        reader: R,
    ) -> Result<FileInfo> {
        let stream =
            tokio_util::io::ReaderStream::with_capacity(reader, 64 * 1024).map_ok(Frame::data);
        let body = BodyExt::boxed_unsync(StreamBody::new(stream));
        let mut uri = format!(
            "{}?path={}&mode={:o}",
            sb_path(name, "/files"),
            enc(path),
            mode
        );
        if let Some(t) = mtime {
            uri.push_str(&format!("&mtime={t}"));
        }
        let resp = self
            .send(self.request(Method::PUT, &uri, Some("application/octet-stream"), body))
            .await?;
        let resp = check(resp).await?;
        let body = read_limited(resp.into_body(), MAX_JSON_RESPONSE).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// `PUT /v1/sandboxes/{name}/files`: streams `reader` to the guest file `path`.
    pub async fn upload<R: AsyncRead + Send + 'static>(
        &self,
        name: &str,
        path: &str,
        mode: u32,
        reader: R,
    ) -> Result<FileInfo> {
        self.upload_with_mtime(name, path, mode, None, reader).await
    }

    /// `GET /v1/sandboxes/{name}/files`: streams the guest file into `writer`; returns its size.
    pub async fn download<W: AsyncWrite + Unpin>(
        &self,
        name: &str,
        path: &str,
        mut writer: W,
    ) -> Result<u64> {
        let uri = format!("{}?path={}", sb_path(name, "/files"), enc(path));
        let incoming = self.streaming(Method::GET, &uri, None).await?;
        let mut r = body_reader(incoming);
        let n = tokio::io::copy(&mut r, &mut writer).await?;
        writer.flush().await?;
        Ok(n)
    }

    /// `GET /v1/sandboxes/{name}/console`: the console log so far.
    pub async fn console(&self, name: &str) -> Result<Vec<u8>> {
        let incoming = self
            .streaming(Method::GET, &sb_path(name, "/console"), None)
            .await?;
        Ok(read_limited(incoming, usize::MAX).await?.to_vec())
    }

    /// `GET /v1/sandboxes/{name}/console?follow=true`: the log, then new output as it comes.
    pub async fn console_follow(&self, name: &str) -> Result<BoxStream<Bytes>> {
        let path = format!("{}?follow=true", sb_path(name, "/console"));
        let incoming = self.streaming(Method::GET, &path, None).await?;
        let s = BodyStream::new(incoming)
            .try_filter_map(|f| futures::future::ready(Ok(f.into_data().ok())));
        Ok(Box::pin(s.map_err(ClientError::Http)))
    }

    async fn delete_path(&self, path: &str) -> Result<()> {
        let resp = self
            .send(self.request(Method::DELETE, path, None, empty()))
            .await?;
        check(resp).await?;
        Ok(())
    }

    /// `POST /v1/sandboxes/{name}/snapshot`: snapshots a running sandbox as `snapshot`.
    pub async fn snapshot(&self, name: &str, snapshot: &str) -> Result<SnapshotInfo> {
        let body = serde_json::to_vec(&CreateSnapshotRequest {
            snapshot: snapshot.into(),
        })
        .map_err(|e| ClientError::Decode(e.to_string()))?;
        self.call(Method::POST, &sb_path(name, "/snapshot"), Some(body))
            .await
    }

    /// `POST /v1/sandboxes/{name}/shares`: attach and mount; answers every share.
    pub async fn share_add(&self, name: &str, share: &ShareRequest) -> Result<Vec<ShareRequest>> {
        let body = serde_json::to_vec(share).map_err(|e| ClientError::Decode(e.to_string()))?;
        self.call(Method::POST, &sb_path(name, "/shares"), Some(body))
            .await
    }

    /// `GET /v1/sandboxes/{name}/shares`.
    pub async fn shares(&self, name: &str) -> Result<Vec<ShareRequest>> {
        self.call(Method::GET, &sb_path(name, "/shares"), None)
            .await
    }

    /// `DELETE /v1/sandboxes/{name}/shares?guest=GUEST`.
    pub async fn share_remove(&self, name: &str, guest: &str) -> Result<()> {
        let uri = format!("{}?guest={}", sb_path(name, "/shares"), enc(guest));
        let resp = self
            .send(self.request(Method::DELETE, &uri, None, empty()))
            .await?;
        check(resp).await?;
        Ok(())
    }

    /// `POST /v1/sandboxes/{name}/ports`: answers the sandbox's forwards.
    pub async fn port_add(
        &self,
        name: &str,
        port: &PortForwardBody,
    ) -> Result<Vec<PortForwardBody>> {
        let body = serde_json::to_vec(port).map_err(|e| ClientError::Decode(e.to_string()))?;
        self.call(Method::POST, &sb_path(name, "/ports"), Some(body))
            .await
    }

    /// `GET /v1/sandboxes/{name}/ports`.
    pub async fn ports(&self, name: &str) -> Result<Vec<PortForwardBody>> {
        self.call(Method::GET, &sb_path(name, "/ports"), None).await
    }

    /// `DELETE /v1/sandboxes/{name}/ports?host_port=PORT[&host_ip=IP]`.
    pub async fn port_remove(&self, name: &str, port: &PortQuery) -> Result<()> {
        let mut uri = format!("{}?host_port={}", sb_path(name, "/ports"), port.host_port);
        if let Some(ip) = &port.host_ip {
            uri.push_str(&format!("&host_ip={}", enc(ip)));
        }
        let resp = self
            .send(self.request(Method::DELETE, &uri, None, empty()))
            .await?;
        check(resp).await?;
        Ok(())
    }

    /// `GET /v1/snapshots`.
    pub async fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        self.call(Method::GET, "/v1/snapshots", None).await
    }

    /// `DELETE /v1/snapshots/{name}`.
    pub async fn delete_snapshot(&self, name: &str) -> Result<()> {
        self.delete_path(&format!("/v1/snapshots/{}", seg(name)))
            .await
    }

    /// `POST /v1/pools`: creates a warm pool (it fills in the background).
    pub async fn create_pool(&self, req: &CreatePoolRequest) -> Result<PoolInfo> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Decode(e.to_string()))?;
        self.call(Method::POST, "/v1/pools", Some(body)).await
    }

    /// `GET /v1/pools`.
    pub async fn pools(&self) -> Result<Vec<PoolInfo>> {
        self.call(Method::GET, "/v1/pools", None).await
    }

    /// `GET /v1/pools/{name}`.
    pub async fn pool(&self, name: &str) -> Result<PoolInfo> {
        self.call(Method::GET, &format!("/v1/pools/{}", seg(name)), None)
            .await
    }

    /// `DELETE /v1/pools/{name}`: the pool and its idle members.
    pub async fn delete_pool(&self, name: &str) -> Result<()> {
        self.delete_path(&format!("/v1/pools/{}", seg(name))).await
    }

    /// `POST /v1/images/pull`: the pull's events as they come, ending with
    /// `done` or `error`.
    pub async fn pull(&self, req: &PullRequest) -> Result<BoxStream<PullEvent>> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Decode(e.to_string()))?;
        let incoming = self
            .streaming(Method::POST, "/v1/images/pull", Some(body))
            .await?;
        let reader = tokio::io::BufReader::new(body_reader(incoming));
        let lines = futures::stream::try_unfold(reader, |mut r| async move {
            let mut line = Vec::new();
            let n = (&mut r)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut line)
                .await?;
            if n == 0 {
                return Ok(None);
            }
            let ev: PullEvent = serde_json::from_slice(&line)
                .map_err(|e| ClientError::Decode(format!("pull event: {e}")))?;
            Ok(Some((ev, r)))
        });
        Ok(Box::pin(lines))
    }

    /// `GET /v1/sandboxes/{name}/network`.
    pub async fn network_policy(&self, name: &str) -> Result<NetworkPolicyBody> {
        self.call(Method::GET, &sb_path(name, "/network"), None)
            .await
    }

    /// `PUT /v1/sandboxes/{name}/network`.
    pub async fn set_network_policy(&self, name: &str, body: &NetworkPolicyBody) -> Result<()> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Decode(e.to_string()))?;
        let _: serde_json::Value = self
            .call(Method::PUT, &sb_path(name, "/network"), Some(body))
            .await?;
        Ok(())
    }

    /// `GET /v1/sandboxes/{name}/network/log`.
    pub async fn network_log(&self, name: &str) -> Result<NetworkLog> {
        self.call(Method::GET, &sb_path(name, "/network/log"), None)
            .await
    }

    /// `GET /v1/sandboxes/{name}/screen`.
    pub async fn screen_info(&self, name: &str) -> Result<ScreenInfo> {
        self.call(Method::GET, &sb_path(name, "/screen"), None)
            .await
    }

    /// `POST /v1/sandboxes/{name}/screen/screenshot`.
    pub async fn screenshot(&self, name: &str, req: &ScreenshotRequest) -> Result<ScreenshotBody> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Decode(e.to_string()))?;
        self.call(
            Method::POST,
            &sb_path(name, "/screen/screenshot"),
            Some(body),
        )
        .await
    }

    /// `POST /v1/sandboxes/{name}/screen/actions`.
    pub async fn screen_actions(
        &self,
        name: &str,
        req: &ScreenActionsRequest,
    ) -> Result<ScreenActionsResponse> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Decode(e.to_string()))?;
        self.call(Method::POST, &sb_path(name, "/screen/actions"), Some(body))
            .await
    }

    /// `GET /v1/images`.
    pub async fn images(&self) -> Result<Vec<ImageInfo>> {
        self.call(Method::GET, "/v1/images", None).await
    }

    /// `GET /v1/images/one?image=...`.
    pub async fn image(&self, image: &str) -> Result<ImageInfo> {
        self.call(
            Method::GET,
            &format!("/v1/images/one?image={}", seg(image)),
            None,
        )
        .await
    }

    /// `DELETE /v1/images/one?image=...`.
    pub async fn delete_image(&self, image: &str) -> Result<ImageInfo> {
        self.call(
            Method::DELETE,
            &format!("/v1/images/one?image={}", seg(image)),
            None,
        )
        .await
    }

    /// `POST /v1/pools/{name}/acquire`: a ready member (`name: None`, fast)
    /// or a fresh one restored under `name`. Release it with [`Client::delete`].
    pub async fn acquire(&self, pool: &str, name: Option<&str>) -> Result<SandboxInfo> {
        let body = serde_json::to_vec(&AcquireRequest {
            name: name.map(str::to_string),
        })
        .map_err(|e| ClientError::Decode(e.to_string()))?;
        self.call(
            Method::POST,
            &format!("/v1/pools/{}/acquire", seg(pool)),
            Some(body),
        )
        .await
    }

    /// `GET /v1/events`: server-sent events, decoded.
    pub async fn events(&self) -> Result<BoxStream<Event>> {
        let incoming = self.streaming(Method::GET, "/v1/events", None).await?;
        let reader = tokio::io::BufReader::new(body_reader(incoming));
        let s = futures::stream::try_unfold(reader, |mut r| async move {
            loop {
                let mut line = String::new();
                let n = (&mut r).take(MAX_LINE as u64).read_line(&mut line).await?;
                if n == 0 {
                    return Ok(None);
                }
                if let Some(data) = line.trim_end().strip_prefix("data:") {
                    let ev: Event = serde_json::from_str(data.trim_start())
                        .map_err(|e| ClientError::Decode(format!("event: {e}")))?;
                    return Ok(Some((ev, r)));
                }
            }
        });
        Ok(Box::pin(s))
    }
}

fn empty() -> ReqBody {
    BodyExt::boxed_unsync(Full::new(Bytes::new()).map_err(|never| match never {}))
}

fn full(b: Bytes) -> ReqBody {
    BodyExt::boxed_unsync(Full::new(b).map_err(|never| match never {}))
}

/// One exec event (an NDJSON line or a WebSocket text frame) as a chunk; an
/// `error` event becomes the API error it carries.
pub(crate) fn decode_exec_event(raw: &[u8]) -> Result<ExecChunk> {
    let ev: ExecEvent =
        serde_json::from_slice(raw).map_err(|e| ClientError::Decode(format!("exec event: {e}")))?;
    let b64 = |d: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(d)
            .map_err(|e| ClientError::Decode(format!("exec data: {e}")))
    };
    Ok(match ev {
        ExecEvent::Stdout { data } => ExecChunk::Stdout(b64(&data)?),
        ExecEvent::Stderr { data } => ExecChunk::Stderr(b64(&data)?),
        ExecEvent::Exit {
            code,
            signal,
            timed_out,
        } => ExecChunk::Exit {
            code,
            signal,
            timed_out,
        },
        ExecEvent::Error { code, message } => {
            return Err(ClientError::Api {
                status: StatusCode::OK,
                detail: ErrorDetail {
                    code,
                    message,
                    fix: None,
                },
            })
        }
    })
}

fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn seg(name: &str) -> String {
    enc(name).replace('/', "%2F")
}

pub(crate) fn sb_path(name: &str, rest: &str) -> String {
    let name = enc(name).replace('/', "%2F");
    format!("/v1/sandboxes/{name}{rest}")
}

async fn check(resp: Response<Incoming>) -> Result<Response<Incoming>> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let body = read_limited(resp.into_body(), MAX_JSON_RESPONSE).await?;
    match serde_json::from_slice::<capsa_api::ErrorBody>(&body) {
        Ok(b) => Err(ClientError::Api {
            status,
            detail: b.error,
        }),
        Err(_) => Err(ClientError::Decode(format!(
            "{status} with a non-JSON body: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ))),
    }
}

async fn read_limited(body: Incoming, max: usize) -> Result<Bytes> {
    let mut out = bytes::BytesMut::new();
    let mut s = BodyStream::new(body);
    while let Some(f) = s.next().await {
        if let Ok(d) = f?.into_data() {
            if out.len() + d.len() > max {
                return Err(ClientError::Decode(format!(
                    "response larger than {max} bytes"
                )));
            }
            out.extend_from_slice(&d);
        }
    }
    Ok(out.freeze())
}

fn body_reader(body: Incoming) -> impl AsyncRead + Send + Unpin {
    let s = BodyStream::new(body)
        .try_filter_map(|f| futures::future::ready(Ok(f.into_data().ok())))
        .map_err(std::io::Error::other);
    tokio_util::io::StreamReader::new(s)
}

use tokio::io::AsyncReadExt as _;
