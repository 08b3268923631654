//! [`Service`] over capsad's HTTP API: every call is one request (or one
//! stream) to the daemon, whose handlers call the local service.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::mpsc;

use capsa_api::types::*;
use capsa_api::{
    ApiError, ApiResult, ConsoleSession, ErrorCode, ExecChunk, ExecControl, ExecSession, Files,
    Service, StatusCode,
};

use crate::http::{Client, ClientError, ExecChunk as WireChunk};

/// The capsa service of a capsad.
#[derive(Debug, Clone)]
pub struct RemoteService {
    client: Client,
}

/// The default token file of a capsad socket: `capsad.token` beside it.
pub fn default_token_file(socket: &Path) -> std::path::PathBuf {
    socket.parent().map_or_else(
        || std::path::PathBuf::from("capsad.token"),
        |d| d.join("capsad.token"),
    )
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Api { status, detail } => ApiError { status, detail },
            ClientError::Connect { .. } | ClientError::BadHost(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                e.to_string(),
            ),
            other => ApiError::new(
                StatusCode::BAD_GATEWAY,
                ErrorCode::Internal,
                other.to_string(),
            ),
        }
    }
}

impl RemoteService {
    /// The service of the capsad at `host` (`unix:///path`, a bare socket
    /// path, or `http://127.0.0.1:PORT`), with its token read from
    /// `token_file` (default: `capsad.token` beside the socket).
    pub fn connect(host: &str, token_file: Option<&Path>) -> ApiResult<Self> {
        let socket = host.strip_prefix("unix://").unwrap_or(host);
        let token_file = match token_file {
            Some(p) => p.to_path_buf(),
            None if socket.starts_with('/') => default_token_file(Path::new(socket)),
            None => {
                return Err(ApiError::bad_request(format!("no token file for {host}"))
                    .fix("pass --token-file (or CAPSA_TOKEN_FILE) with capsad's token"))
            }
        };
        let token = std::fs::read_to_string(&token_file)
            .map_err(|e| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    ErrorCode::Unauthorized,
                    format!("reading capsad's token from {}: {e}", token_file.display()),
                )
                .fix("pass --token-file PATH, or run as the user that started capsad")
            })?
            .trim()
            .to_string();
        Ok(Self {
            client: Client::from_host(host, token)?,
        })
    }

    /// The service over an existing client.
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// The typed HTTP client underneath.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

fn chunk_of(c: Result<WireChunk, ClientError>) -> ExecChunk {
    match c {
        Ok(WireChunk::Stdout(d)) => ExecChunk::Stdout(Bytes::from(d)),
        Ok(WireChunk::Stderr(d)) => ExecChunk::Stderr(Bytes::from(d)),
        Ok(WireChunk::Exit {
            code,
            signal,
            timed_out,
        }) => ExecChunk::Exit(capsa::ExitStatus {
            code,
            signal,
            timed_out,
        }),
        Err(e) => ExecChunk::Error(e.into()),
    }
}

#[async_trait]
impl Service for RemoteService {
    async fn health(&self) -> ApiResult<Health> {
        Ok(self.client.health().await?)
    }

    async fn list(&self) -> ApiResult<Vec<SandboxInfo>> {
        Ok(self.client.list().await?)
    }

    async fn get(&self, name: &str) -> ApiResult<SandboxInfo> {
        Ok(self.client.get(name).await?)
    }

    async fn create(&self, req: CreateSandboxRequest) -> ApiResult<SandboxInfo> {
        Ok(self.client.create(&req).await?)
    }

    async fn start(&self, name: &str) -> ApiResult<SandboxInfo> {
        Ok(self.client.start(name).await?)
    }

    async fn stop(&self, name: &str, grace: Option<Duration>) -> ApiResult<SandboxInfo> {
        Ok(self.client.stop(name, grace).await?)
    }

    async fn kill(&self, name: &str) -> ApiResult<SandboxInfo> {
        Ok(self.client.kill(name).await?)
    }

    async fn remove(&self, name: &str, force: bool) -> ApiResult<()> {
        Ok(self.client.delete(name, force).await?)
    }

    async fn exec(&self, name: &str, req: ExecRequest) -> ApiResult<ExecSession> {
        let (out_tx, out_rx) = mpsc::channel::<ExecChunk>(16);
        if !req.interactive {
            // NDJSON: one request, output streamed back.
            let mut stream = self.client.exec(name, &req).await?;
            let task = tokio::spawn(async move {
                while let Some(c) = stream.next().await {
                    let end = !matches!(c, Ok(WireChunk::Stdout(_)) | Ok(WireChunk::Stderr(_)));
                    if out_tx.send(chunk_of(c)).await.is_err() || end {
                        return;
                    }
                }
                let _ = out_tx
                    .send(ExecChunk::Error(ApiError::internal(
                        "capsad closed the exec stream before the command ended",
                    )))
                    .await;
            });
            return Ok(ExecSession {
                output: out_rx,
                control: None,
                _keep: Box::new(AbortOnDrop(task)),
            });
        }
        // The WebSocket: stdin, resizes and signals go in while output comes out.
        let (mut input, mut stream) = self.client.exec_interactive(name, &req).await?;
        let (ctl_tx, mut ctl_rx) = mpsc::channel::<ExecControl>(64);
        let task = tokio::spawn(async move {
            let mut controls_open = true;
            loop {
                tokio::select! {
                    c = stream.next() => {
                        let Some(c) = c else {
                            let _ = out_tx.send(ExecChunk::Error(ApiError::internal(
                                "capsad closed the exec stream before the command ended",
                            ))).await;
                            break;
                        };
                        let end = !matches!(c, Ok(WireChunk::Stdout(_)) | Ok(WireChunk::Stderr(_)));
                        if out_tx.send(chunk_of(c)).await.is_err() || end {
                            break;
                        }
                    }
                    c = ctl_rx.recv(), if controls_open => {
                        let sent = match c {
                            Some(ExecControl::Stdin(b)) => input.stdin(&b).await,
                            Some(ExecControl::StdinEof) => input.stdin_eof().await,
                            Some(ExecControl::Resize { rows, cols }) => input.resize(rows, cols).await,
                            Some(ExecControl::Signal(n)) => input.signal(n).await,
                            None => { controls_open = false; Ok(()) }
                        };
                        if let Err(e) = sent {
                            tracing::debug!("interactive exec: {e}");
                        }
                    }
                    _ = out_tx.closed() => break,
                }
            }
            // Closing the WebSocket makes capsad kill what is left.
            input.close().await;
        });
        Ok(ExecSession {
            output: out_rx,
            control: Some(ctl_tx),
            _keep: Box::new(AbortOnDrop(task)),
        })
    }

    async fn files(&self, name: &str) -> ApiResult<Files> {
        Ok(Box::new(RemoteFs {
            client: self.client.clone(),
            name: name.to_string(),
        }))
    }

    async fn console_log(
        &self,
        name: &str,
        follow: bool,
    ) -> ApiResult<BoxStream<'static, ApiResult<Bytes>>> {
        if !follow {
            let all = self.client.console(name).await?;
            return Ok(Box::pin(futures::stream::once(async move {
                Ok(Bytes::from(all))
            })));
        }
        let s = self.client.console_follow(name).await?;
        Ok(Box::pin(s.map(|r| r.map_err(ApiError::from))))
    }

    async fn console_attach(&self, name: &str) -> ApiResult<ConsoleSession> {
        let (input, output) = self.client.console_interactive(name).await?;
        Ok(pipe_session(input, output))
    }

    async fn screen_vnc(&self, name: &str, input: bool) -> ApiResult<ConsoleSession> {
        let (input, output) = self.client.screen_vnc(name, input).await?;
        Ok(pipe_session(input, output))
    }

    async fn snapshot_create(&self, name: &str, snapshot: &str) -> ApiResult<SnapshotInfo> {
        Ok(self.client.snapshot(name, snapshot).await?)
    }

    async fn snapshot_list(&self) -> ApiResult<Vec<SnapshotInfo>> {
        Ok(self.client.snapshots().await?)
    }

    async fn snapshot_remove(&self, snapshot: &str) -> ApiResult<()> {
        Ok(self.client.delete_snapshot(snapshot).await?)
    }

    async fn pool_create(&self, req: CreatePoolRequest) -> ApiResult<PoolInfo> {
        Ok(self.client.create_pool(&req).await?)
    }

    async fn pool_list(&self) -> ApiResult<Vec<PoolInfo>> {
        Ok(self.client.pools().await?)
    }

    async fn pool_get(&self, name: &str) -> ApiResult<PoolInfo> {
        Ok(self.client.pool(name).await?)
    }

    async fn pool_remove(&self, name: &str) -> ApiResult<()> {
        Ok(self.client.delete_pool(name).await?)
    }

    async fn pool_acquire(&self, pool: &str, req: AcquireRequest) -> ApiResult<SandboxInfo> {
        Ok(self.client.acquire(pool, req.name.as_deref()).await?)
    }

    async fn share_add(&self, name: &str, share: ShareRequest) -> ApiResult<Vec<ShareRequest>> {
        Ok(self.client.share_add(name, &share).await?)
    }

    async fn share_remove(&self, name: &str, guest: &str) -> ApiResult<()> {
        Ok(self.client.share_remove(name, guest).await?)
    }

    async fn share_list(&self, name: &str) -> ApiResult<Vec<ShareRequest>> {
        Ok(self.client.shares(name).await?)
    }

    async fn network_policy(&self, name: &str) -> ApiResult<NetworkPolicyBody> {
        Ok(self.client.network_policy(name).await?)
    }

    async fn set_network_policy(&self, name: &str, body: NetworkPolicyBody) -> ApiResult<()> {
        Ok(self.client.set_network_policy(name, &body).await?)
    }

    async fn network_log(&self, name: &str) -> ApiResult<NetworkLog> {
        Ok(self.client.network_log(name).await?)
    }

    async fn port_add(&self, name: &str, port: PortForwardBody) -> ApiResult<Vec<PortForwardBody>> {
        Ok(self.client.port_add(name, &port).await?)
    }

    async fn port_remove(&self, name: &str, port: PortQuery) -> ApiResult<()> {
        Ok(self.client.port_remove(name, &port).await?)
    }

    async fn port_list(&self, name: &str) -> ApiResult<Vec<PortForwardBody>> {
        Ok(self.client.ports(name).await?)
    }

    async fn screen_info(&self, name: &str) -> ApiResult<ScreenInfo> {
        Ok(self.client.screen_info(name).await?)
    }

    async fn screenshot(&self, name: &str, req: ScreenshotRequest) -> ApiResult<ScreenshotBody> {
        Ok(self.client.screenshot(name, &req).await?)
    }

    async fn screen_actions(
        &self,
        name: &str,
        req: ScreenActionsRequest,
    ) -> ApiResult<ScreenActionsResponse> {
        Ok(self.client.screen_actions(name, &req).await?)
    }

    async fn image_pull(&self, req: PullRequest) -> ApiResult<mpsc::Receiver<PullEvent>> {
        let mut stream = self.client.pull(&req).await?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Some(ev) = stream.next().await {
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => {
                        let e = ApiError::from(e);
                        PullEvent::Error {
                            code: e.detail.code,
                            message: e.detail.message,
                            fix: e.detail.fix,
                        }
                    }
                };
                let end = matches!(ev, PullEvent::Done(_) | PullEvent::Error { .. });
                if tx.send(ev).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(rx)
    }

    async fn image_list(&self) -> ApiResult<Vec<ImageInfo>> {
        Ok(self.client.images().await?)
    }

    async fn image_get(&self, image: &str) -> ApiResult<ImageInfo> {
        Ok(self.client.image(image).await?)
    }

    async fn image_remove(&self, image: &str) -> ApiResult<ImageInfo> {
        Ok(self.client.delete_image(image).await?)
    }
}

/// Ends a session's task when the session is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A sandbox's files through capsad's file endpoints.
struct RemoteFs {
    client: Client,
    name: String,
}

fn remote(e: ClientError) -> capsa::Error {
    capsa::Error::Remote(e.to_string())
}

#[async_trait::async_trait]
impl capsa::copy::GuestFs for RemoteFs {
    async fn stat(&self, path: &str) -> capsa::Result<capsa::FileMeta> {
        Ok(self
            .client
            .stat(&self.name, path)
            .await
            .map_err(remote)?
            .meta())
    }

    async fn list_page(
        &self,
        path: &str,
        after: Option<&str>,
    ) -> capsa::Result<(Vec<capsa::DirEntry>, bool)> {
        let page = self
            .client
            .list_dir(&self.name, path, after)
            .await
            .map_err(remote)?;
        let entries = page
            .entries
            .into_iter()
            .map(|e| capsa::DirEntry {
                meta: e.stat.meta(),
                name: e.name,
            })
            .collect();
        Ok((entries, page.more))
    }

    async fn read_file(
        &self,
        path: &str,
        w: &mut (dyn tokio::io::AsyncWrite + Unpin + Send),
    ) -> capsa::Result<capsa::FileMeta> {
        // The download carries no metadata: take it first, and keep no more
        // than the size it announced (as the agent client does).
        let meta = self.stat(path).await?;
        let mut capped = Capped {
            inner: w,
            left: meta.size,
        };
        self.client
            .download(&self.name, path, &mut capped)
            .await
            .map_err(remote)?;
        Ok(meta)
    }

    async fn mkdir(&self, path: &str, mode: u32) -> capsa::Result<()> {
        self.client
            .mkdir(&self.name, path, mode)
            .await
            .map_err(remote)
    }

    async fn write_file(
        &self,
        path: &str,
        r: &mut (dyn tokio::io::AsyncRead + Unpin + Send),
        mode: u32,
        mtime: Option<std::time::SystemTime>,
    ) -> capsa::Result<()> {
        let mtime = mtime
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs().min(253_402_300_799) as i64);
        // The upload body must own its reader: stream through a pipe.
        let (mut tx, rx) = tokio::io::duplex(64 * 1024);
        let up = self
            .client
            .upload_with_mtime(&self.name, path, mode, mtime, rx);
        let feed = async move {
            let r = tokio::io::copy(r, &mut tx).await;
            drop(tx);
            r
        };
        let (up, fed) = tokio::join!(up, feed);
        up.map_err(remote)?;
        fed.map_err(|source| capsa::Error::Io {
            context: format!("reading the source of {path}"),
            source,
        })?;
        Ok(())
    }
}

/// Passes on at most `left` bytes and quietly drops the rest.
struct Capped<'a> {
    inner: &'a mut (dyn tokio::io::AsyncWrite + Unpin + Send),
    left: u64,
}

impl tokio::io::AsyncWrite for Capped<'_> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let n = (buf.len() as u64).min(self.left) as usize;
        if n == 0 {
            return std::task::Poll::Ready(Ok(buf.len()));
        }
        let me = &mut *self;
        match std::pin::Pin::new(&mut *me.inner).poll_write(cx, &buf[..n]) {
            std::task::Poll::Ready(Ok(k)) => {
                me.left -= k as u64;
                std::task::Poll::Ready(Ok(k))
            }
            other => other,
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// A byte session over a WebSocket pipe (console attach, VNC), as the
/// service's channel pair.
fn pipe_session(
    mut input: crate::ws::ConsoleInput,
    mut output: BoxStream<'static, crate::Result<Bytes>>,
) -> ConsoleSession {
    let (out_tx, out_rx) = mpsc::channel::<Bytes>(16);
    let (in_tx, mut in_rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                b = output.next() => match b {
                    Some(Ok(b)) => if out_tx.send(b).await.is_err() { break },
                    _ => break,
                },
                b = in_rx.recv() => match b {
                    Some(b) => if input.send(&b).await.is_err() { break },
                    None => break,
                },
            }
        }
        input.close().await;
    });
    ConsoleSession {
        output: out_rx,
        input: in_tx,
    }
}
