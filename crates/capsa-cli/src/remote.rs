//! The named-sandbox commands through a capsad (`--host` / `CAPSA_HOST`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use capsad::api::{AccelChoice, CreateSandboxRequest, DiskRequest, ExecRequest, SandboxInfo};
use capsad::client::{BoxStream, Client, ExecChunk, ExecInput};
use futures::StreamExt;

use crate::exec_io::{Finished, Stdio};
use crate::named::CreateArgs;
use crate::target::View;

/// A capsad endpoint with its token.
pub struct Remote {
    client: Client,
}

/// A command running through capsad; dropping the stream ends it.
pub struct RemoteExec {
    stream: Option<BoxStream<ExecChunk>>,
    /// The WebSocket's sending half, for interactive (`-i`/`-t`) execs.
    input: Option<ExecInput>,
}

/// What the terminal sends an interactive exec besides stdin.
enum Control {
    Resize(u16, u16),
    Signal(i32),
}

impl Remote {
    /// The typed API client (snapshot and pool commands use it directly).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// `capsa create --from-snapshot` through capsad.
    pub async fn create_from_snapshot(
        &self,
        a: &CreateArgs,
        snapshot: &str,
    ) -> anyhow::Result<View> {
        let req = CreateSandboxRequest {
            name: Some(a.name.clone()),
            env: a.env.iter().cloned().collect::<BTreeMap<_, _>>(),
            workdir: a.workdir.clone(),
            from_snapshot: Some(snapshot.to_string()),
            start: true,
            ..Default::default()
        };
        Ok(view(self.client.create(&req).await?))
    }

    /// `capsa pool acquire` through capsad.
    pub async fn acquire(&self, pool: &str, name: Option<&str>) -> anyhow::Result<View> {
        Ok(view(self.client.acquire(pool, name).await?))
    }

    /// Reads the token and prepares a client (no connection yet).
    pub fn connect(host: &str, token_file: Option<&Path>) -> anyhow::Result<Self> {
        let socket = host.strip_prefix("unix://").unwrap_or(host);
        let token_file = match token_file {
            Some(p) => p.to_path_buf(),
            None if socket.starts_with('/') => {
                crate::target::default_token_file(Path::new(socket))
            }
            None => anyhow::bail!(
                "no token file for {host}: pass --token-file (or CAPSA_TOKEN_FILE) with capsad's token"
            ),
        };
        let token = std::fs::read_to_string(&token_file)
            .with_context(|| {
                format!(
                    "reading capsad's token from {} (fix: --token-file PATH, or run as the user that started capsad)",
                    token_file.display()
                )
            })?
            .trim()
            .to_string();
        Ok(Self {
            client: Client::from_host(host, token)?,
        })
    }

    pub async fn create(&self, a: &CreateArgs) -> anyhow::Result<View> {
        let mut disks = Vec::new();
        for d in &a.disks {
            let spec = capsa::DiskSpec::parse_cli(d);
            anyhow::ensure!(
                !spec.allow_device,
                "--disk {d}: capsad never attaches host block devices; fix: pass an image \
                 file below one of the daemon's --allow-disk-dir directories"
            );
            let abs = std::path::absolute(&spec.path)
                .with_context(|| format!("resolving disk path {}", spec.path.display()))?;
            disks.push(DiskRequest {
                path: abs.display().to_string(),
                read_only: spec.read_only,
            });
        }
        let req = CreateSandboxRequest {
            name: Some(a.name.clone()),
            cpus: Some(a.cpus),
            memory_mib: Some(a.memory),
            env: a.env.iter().cloned().collect::<BTreeMap<_, _>>(),
            workdir: a.workdir.clone(),
            accel: Some(match a.accel {
                capsa::Accel::Auto => AccelChoice::Auto,
                capsa::Accel::Kvm => AccelChoice::Kvm,
                capsa::Accel::Tcg => AccelChoice::Tcg,
            }),
            disks,
            start: true,
            from_snapshot: None,
            network: a.net.spec()?,
        };
        Ok(view(self.client.create(&req).await?))
    }

    pub async fn list(&self) -> anyhow::Result<Vec<View>> {
        Ok(self.client.list().await?.into_iter().map(view).collect())
    }

    pub async fn inspect(&self, name: &str) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::to_value(self.client.get(name).await?)?)
    }

    pub async fn spawn(
        &self,
        name: &str,
        cmd: &capsa::Command,
        stdio: Stdio,
    ) -> anyhow::Result<RemoteExec> {
        let r = cmd.request();
        let req = ExecRequest {
            argv: r.argv.clone(),
            env: r.env.iter().cloned().collect(),
            cwd: r.cwd.clone(),
            stdin: None,
            timeout_ms: r.timeout_ms,
            tty: stdio.tty.is_some(),
            rows: stdio.tty.map(|t| t.0),
            cols: stdio.tty.map(|t| t.1),
        };
        if stdio.interactive || stdio.tty.is_some() {
            // The WebSocket: stdin, resizes and signals go in while output comes out.
            let (input, stream) = self.client.exec_interactive(name, &req).await?;
            return Ok(RemoteExec {
                stream: Some(stream),
                input: Some(input),
            });
        }
        let stream = self.client.exec(name, &req).await?;
        Ok(RemoteExec {
            stream: Some(stream),
            input: None,
        })
    }

    /// Recursive, like the direct copy: the same walk over capsad's file endpoints.
    pub async fn copy_in(&self, name: &str, host: &Path, guest: &str) -> anyhow::Result<()> {
        Ok(capsa::copy::copy_in(&self.files(name), host, guest).await?)
    }

    /// Recursive, like the direct copy, with the same bounds and checks on
    /// what the guest (through capsad) sends.
    pub async fn copy_out(&self, name: &str, guest: &str, host: &Path) -> anyhow::Result<()> {
        let opts = capsa::CopyOutOptions::default();
        Ok(capsa::copy::copy_out(&self.files(name), guest, host, &opts).await?)
    }

    fn files(&self, name: &str) -> RemoteFs {
        RemoteFs {
            client: self.client.clone(),
            name: name.to_string(),
        }
    }

    pub async fn logs(&self, name: &str, follow: bool) -> anyhow::Result<()> {
        let mut out = std::io::stdout();
        if !follow {
            out.write_all(&self.client.console(name).await?)?;
            out.flush()?;
            return Ok(());
        }
        let mut s = self.client.console_follow(name).await?;
        loop {
            tokio::select! {
                item = s.next() => match item {
                    Some(chunk) => {
                        out.write_all(&chunk?)?;
                        out.flush()?;
                    }
                    None => return Ok(()),
                },
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
    }

    /// `capsa attach` through capsad's console WebSocket.
    pub async fn attach(&self, name: &str) -> anyhow::Result<()> {
        let (mut input, mut output) = self.client.console_interactive(name).await?;
        // The console bridge works on byte streams: pipe the WebSocket through.
        let (reader, mut to_reader) = tokio::io::duplex(64 * 1024);
        let (mut from_writer, writer) = tokio::io::duplex(64 * 1024);
        let out = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Some(Ok(b)) = output.next().await {
                if to_reader.write_all(&b).await.is_err() {
                    break;
                }
            }
        });
        let inp = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = from_writer.read(&mut buf).await {
                if n == 0 || input.send(&buf[..n]).await.is_err() {
                    break;
                }
            }
            input.close().await;
        });
        let r = crate::target::bridge_console(name, reader, writer).await;
        // The bridge dropped its writer: the input task closes the WebSocket.
        let _ = tokio::time::timeout(Duration::from_secs(2), inp).await;
        out.abort();
        r
    }

    pub async fn start(&self, name: &str) -> anyhow::Result<()> {
        self.client.start(name).await?;
        Ok(())
    }

    pub async fn stop(&self, name: &str, grace: Duration) -> anyhow::Result<()> {
        if grace != capsa::DEFAULT_STOP_TIMEOUT {
            // capsad's stop always grants the library's default grace period.
            anyhow::bail!(
                "--timeout is not supported through capsad (it grants the guest {}s); \
                 fix: drop --timeout, or run `capsa stop` without --host",
                capsa::DEFAULT_STOP_TIMEOUT.as_secs()
            );
        }
        self.client.stop(name).await?;
        Ok(())
    }

    pub async fn kill(&self, name: &str) -> anyhow::Result<()> {
        self.client.kill(name).await?;
        Ok(())
    }

    pub async fn remove(&self, name: &str, force: bool) -> anyhow::Result<()> {
        self.client.delete(name, force).await?;
        Ok(())
    }
}

impl RemoteExec {
    /// Prints the streamed output until the exit (or Ctrl-C outside raw
    /// mode, SIGHUP, SIGTERM); an interactive exec also gets this terminal's
    /// stdin and window changes.
    pub async fn drive(&mut self, stdio: Stdio) -> anyhow::Result<Finished> {
        let Some(stream) = self.stream.as_mut() else {
            anyhow::bail!("this exec has already ended");
        };
        let raw = if stdio.tty.is_some() && stdio.interactive {
            crate::term::RawMode::enter(0)
        } else {
            None
        };
        // SIGINT in raw mode too: only `kill -INT` sends it then.
        let mut signals = crate::term::Hangup::catch()?;
        let mut winch =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
        // Sends go out on their own task: a command that does not read its
        // stdin must not stop this loop from printing its output.
        let (ctl_tx, ctl_rx) = tokio::sync::mpsc::channel::<Control>(64);
        let sender = self.input.take().map(|input| {
            let stdin = stdio.interactive.then(crate::exec_io::stdin_chunks);
            tokio::spawn(send_loop(input, stdin, ctl_rx))
        });
        let ended = loop {
            let item = tokio::select! {
                i = stream.next() => i,
                sig = signals.recv() => break Err(sig),
                _ = winch.recv(), if stdio.tty.is_some() && sender.is_some() => {
                    if let Some((r, c)) = crate::exec_io::window_size() {
                        // Full only if capsad stopped reading for 64 resizes;
                        // the next window change sends the size again.
                        if ctl_tx.try_send(Control::Resize(r, c)).is_err() {
                            tracing::debug!("resize to {r}x{c} dropped: capsad is not reading");
                        }
                    }
                    continue;
                }
            };
            match item {
                Some(Ok(ExecChunk::Stdout(d))) => {
                    let mut o = std::io::stdout();
                    o.write_all(&d)?;
                    o.flush()?;
                }
                Some(Ok(ExecChunk::Stderr(d))) => {
                    let mut e = std::io::stderr();
                    e.write_all(&d)?;
                    e.flush()?;
                }
                Some(Ok(ExecChunk::Exit {
                    code,
                    signal,
                    timed_out,
                })) => {
                    break Ok(capsa::ExitStatus {
                        code,
                        signal,
                        timed_out,
                    })
                }
                Some(Err(e)) => return Err(e.into()),
                None => anyhow::bail!("capsad closed the exec stream before the command ended"),
            }
        };
        let finished = match ended {
            Ok(status) => Finished::Exited(status),
            Err(libc::SIGINT) => Finished::Interrupted,
            Err(sig) => {
                // What a closing terminal does to its session; then the
                // socket closes and capsad kills what is left.
                if sender.is_some() {
                    let _ = ctl_tx.try_send(Control::Signal(libc::SIGHUP));
                    let wait_exit = async {
                        while let Some(item) = stream.next().await {
                            if matches!(item, Ok(ExecChunk::Exit { .. }) | Err(_)) {
                                break;
                            }
                        }
                    };
                    let _ = tokio::time::timeout(crate::exec_io::HANGUP_GRACE, wait_exit).await;
                }
                Finished::Hangup(sig)
            }
        };
        drop(ctl_tx);
        if let Some(s) = sender {
            let _ = tokio::time::timeout(Duration::from_secs(2), s).await;
        }
        drop(raw);
        Ok(finished)
    }

    /// Drops the stream: capsad kills the command when its client goes away.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.stream = None;
        self.input = None;
        Ok(())
    }
}

/// Forwards stdin (until its EOF) and controls (until the session drops
/// them) to the exec's WebSocket, controls first; then closes it.
async fn send_loop(
    mut input: ExecInput,
    mut stdin: Option<tokio::sync::mpsc::Receiver<Vec<u8>>>,
    mut ctl: tokio::sync::mpsc::Receiver<Control>,
) {
    loop {
        let stdin_next = async {
            match stdin.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        let sent = tokio::select! {
            biased;
            c = ctl.recv() => match c {
                Some(Control::Resize(r, c)) => input.resize(r, c).await,
                Some(Control::Signal(n)) => input.signal(n).await,
                None => break,
            },
            chunk = stdin_next => match chunk {
                Some(b) => input.stdin(&b).await,
                None => {
                    stdin = None;
                    input.stdin_eof().await
                }
            },
        };
        if let Err(e) = sent {
            tracing::debug!("interactive exec: {e}");
            break;
        }
    }
    input.close().await;
}

fn view(i: SandboxInfo) -> View {
    let spec = i.spec.as_ref();
    View {
        name: i.name,
        state: serde_json::to_value(i.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| "unknown".into()),
        cpus: spec
            .and_then(|s| s.get("cpus"))
            .and_then(|v| v.as_u64())
            .map(|v| v as u32),
        memory_mib: spec
            .and_then(|s| s.get("memory_mib"))
            .and_then(|v| v.as_u64()),
        monitor_pid: i.monitor_pid,
        vmm_pid: i.vmm_pid,
        pool: i.pool,
        pool_state: i.pool_state,
        created_at: i.created_at.unwrap_or(0),
        exit: i.exit,
    }
}

/// A sandbox's files through capsad's file endpoints.
struct RemoteFs {
    client: Client,
    name: String,
}

fn remote(e: capsad::client::ClientError) -> capsa::Error {
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
