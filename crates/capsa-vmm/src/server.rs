//! The monitor process: owns one VM for its whole life.
//!
//! `capsa-vmm serve --state-dir DIR` boots `DIR/spec.json` with the QEMU
//! backend (sockets in `DIR`) — or, when `DIR/restore.json` names a snapshot,
//! restores that snapshot instead (see [`crate::state::RestoreRequest`]) — records every transition in `DIR/state.json`,
//! serves the [`crate::service::Monitor`] RPC on stdin/stdout and on
//! `DIR/monitor.sock`, and multiplexes the serial console to `console.log` and
//! `console.sock` clients. It exits when the VM ends.
//!
//! Its spawner holds the other end of stdin: when that closes (the spawner
//! exited, crashed or dropped its handle) and keep-alive is off, the VM is
//! killed, so a library user's VM never outlives its program by accident.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capsa_core::{
    ConsoleStreams, ExitReason, Hypervisor, SnapshotMeta, StartOptions, VmInstance, VmSpec,
    VmStatus,
};
use futures::StreamExt;
use tarpc::server::{BaseChannel, Channel};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, watch, OnceCell};

use std::os::unix::fs::DirBuilderExt;

use crate::service::{Monitor, MonitorInfo, RpcError};
use crate::state::{self, files, RecordedState, RestoreRequest, StateFile};
use crate::{Result, VmmError};

/// Console history replayed to each new console client.
pub const CONSOLE_HISTORY: usize = 1 << 20;
/// `console.log` is truncated when it would grow past this.
pub const CONSOLE_LOG_CAP: u64 = 16 << 20;
/// How long a SIGTERM'd guest gets to power off before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long the monitor lingers after the VM ended, so in-flight replies flush.
const EXIT_LINGER: Duration = Duration::from_millis(300);

/// Options of `capsa-vmm serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The sandbox directory (holds `spec.json`).
    pub state_dir: PathBuf,
    /// Keep the VM when stdin closes.
    pub keep_alive: bool,
}

struct Inner {
    dir: PathBuf,
    info: Mutex<MonitorInfo>,
    record: Mutex<StateFile>,
    instance: OnceCell<Arc<dyn VmInstance>>,
    start_error: Mutex<Option<RpcError>>,
    exit: watch::Sender<Option<ExitReason>>,
    keep_alive: AtomicBool,
}

impl Inner {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a transition in `state.json`; a failed write is logged, not fatal
    /// (the VM matters more than its record).
    fn set_state(&self, state: RecordedState, exit: Option<ExitReason>) {
        let mut r = Self::lock(&self.record);
        if r.state == RecordedState::Stopped {
            return;
        }
        r.state = state;
        if exit.is_some() {
            r.exit = exit;
        }
        r.updated_at = state::now_secs();
        if let Err(e) = r.write(&self.dir) {
            tracing::warn!("cannot record state {state:?}: {e}");
        }
    }

    fn instance(&self) -> std::result::Result<&Arc<dyn VmInstance>, RpcError> {
        if let Some(i) = self.instance.get() {
            return Ok(i);
        }
        if let Some(e) = Self::lock(&self.start_error).clone() {
            return Err(e);
        }
        Err(RpcError {
            code: "starting".into(),
            message: "the VM is still starting".into(),
            fix: Some("retry once status() reports running".into()),
        })
    }
}

/// The RPC face of the monitor; cheap to clone per connection.
#[derive(Clone)]
struct Server(Arc<Inner>);

impl Monitor for Server {
    async fn describe(self, _: tarpc::context::Context) -> MonitorInfo {
        Inner::lock(&self.0.info).clone()
    }

    async fn status(self, _: tarpc::context::Context) -> std::result::Result<VmStatus, RpcError> {
        if let Some(reason) = self.0.exit.borrow().clone() {
            return Ok(VmStatus::Stopped { reason });
        }
        match self.0.instance() {
            Ok(i) => Ok(i.status().await?),
            Err(e) if e.code == "starting" => Ok(VmStatus::Starting),
            Err(e) => Err(e),
        }
    }

    async fn pause(self, _: tarpc::context::Context) -> std::result::Result<(), RpcError> {
        self.0.instance()?.pause().await?;
        self.0.set_state(RecordedState::Paused, None);
        Ok(())
    }

    async fn resume(self, _: tarpc::context::Context) -> std::result::Result<(), RpcError> {
        self.0.instance()?.resume().await?;
        self.0.set_state(RecordedState::Running, None);
        Ok(())
    }

    async fn request_shutdown(
        self,
        _: tarpc::context::Context,
    ) -> std::result::Result<(), RpcError> {
        Ok(self.0.instance()?.request_shutdown().await?)
    }

    async fn kill(self, _: tarpc::context::Context) -> std::result::Result<(), RpcError> {
        if self.0.exit.borrow().is_some() {
            return Ok(());
        }
        Ok(self.0.instance()?.kill().await?)
    }

    async fn wait(self, _: tarpc::context::Context) -> std::result::Result<ExitReason, RpcError> {
        let mut rx = self.0.exit.subscribe();
        let r = rx
            .wait_for(|r| r.is_some())
            .await
            .map_err(|_| RpcError::new("gone", "the monitor is shutting down"))?
            .clone();
        r.ok_or_else(|| RpcError::new("gone", "no exit recorded"))
    }

    async fn set_keep_alive(self, _: tarpc::context::Context, keep: bool) {
        tracing::info!(keep, "keep-alive set");
        self.0.keep_alive.store(keep, Ordering::SeqCst);
    }

    async fn snapshot(
        self,
        _: tarpc::context::Context,
        dir: PathBuf,
    ) -> std::result::Result<SnapshotMeta, RpcError> {
        // The monitor's working directory is not the caller's.
        if !dir.is_absolute() {
            return Err(RpcError {
                code: "invalid_argument".into(),
                message: format!("snapshot directory {} is not absolute", dir.display()),
                fix: Some("pass an absolute path".into()),
            });
        }
        let instance = self.0.instance()?.clone();
        tracing::info!(dir = %dir.display(), "taking a snapshot");
        let t = std::time::Instant::now();
        let meta = instance.snapshot(&dir).await.map_err(|e| {
            tracing::warn!("snapshot failed: {e}");
            RpcError::from(e)
        })?;
        tracing::info!(took = ?t.elapsed(), "snapshot taken");
        Ok(meta)
    }

    async fn attach_share(
        self,
        _: tarpc::context::Context,
        share: capsa_core::ShareSpec,
    ) -> std::result::Result<(), RpcError> {
        let instance = self.0.instance()?.clone();
        tracing::info!(host = %share.host.display(), guest = %share.guest, "attaching a share");
        instance.attach_share(&share).await.map_err(RpcError::from)
    }

    async fn detach_share(
        self,
        _: tarpc::context::Context,
        guest: String,
    ) -> std::result::Result<capsa_core::ShareSpec, RpcError> {
        let instance = self.0.instance()?.clone();
        tracing::info!(%guest, "detaching a share");
        instance.detach_share(&guest).await.map_err(RpcError::from)
    }

    async fn shares(
        self,
        _: tarpc::context::Context,
    ) -> std::result::Result<Vec<capsa_core::ShareSpec>, RpcError> {
        let instance = self.0.instance()?.clone();
        instance.shares().await.map_err(RpcError::from)
    }

    async fn set_network_policy(
        self,
        _: tarpc::context::Context,
        policy: capsa_core::NetworkPolicy,
    ) -> std::result::Result<(), RpcError> {
        tracing::info!(mode = %policy.mode, rules = policy.rules.len(), "network policy replaced");
        Ok(self.0.instance()?.set_network_policy(policy).await?)
    }

    async fn network_policy(
        self,
        _: tarpc::context::Context,
    ) -> std::result::Result<capsa_core::NetworkPolicy, RpcError> {
        Ok(self.0.instance()?.network_policy().await?)
    }

    async fn network_log(
        self,
        _: tarpc::context::Context,
    ) -> std::result::Result<Vec<capsa_core::NetDecision>, RpcError> {
        Ok(self.0.instance()?.network_log().await?)
    }

    async fn add_port_forward(
        self,
        _: tarpc::context::Context,
        forward: capsa_core::PortForward,
    ) -> std::result::Result<(), RpcError> {
        tracing::info!(host_ip = %forward.host_ip, host_port = forward.host_port,
            guest_port = forward.guest_port, "port forward added");
        Ok(self.0.instance()?.add_port_forward(forward).await?)
    }

    async fn remove_port_forward(
        self,
        _: tarpc::context::Context,
        host_ip: std::net::Ipv4Addr,
        host_port: u16,
    ) -> std::result::Result<capsa_core::PortForward, RpcError> {
        tracing::info!(%host_ip, host_port, "port forward removed");
        Ok(self
            .0
            .instance()?
            .remove_port_forward(host_ip, host_port)
            .await?)
    }

    async fn port_forwards(
        self,
        _: tarpc::context::Context,
    ) -> std::result::Result<Vec<capsa_core::PortForward>, RpcError> {
        Ok(self.0.instance()?.port_forwards().await?)
    }

    async fn screendump(
        self,
        _: tarpc::context::Context,
    ) -> std::result::Result<PathBuf, RpcError> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let instance = self.0.instance()?.clone();
        let dir = self.0.dir.join(crate::service::SCREENS_DIR);
        if let Err(e) = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
        {
            return Err(RpcError::new(
                "backend",
                format!("cannot create {}: {e}", dir.display()),
            ));
        }
        // Dumps a crashed caller never moved away would pile up: drop old ones.
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten().take(1024) {
                let stale = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > Duration::from_secs(60));
                if stale {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let out = dir.join(format!("shot-{n}.ppm"));
        instance.screendump(&out).await?;
        Ok(out)
    }

    async fn send_input(
        self,
        _: tarpc::context::Context,
        events: Vec<capsa_core::InputEvent>,
    ) -> std::result::Result<(), RpcError> {
        Ok(self.0.instance()?.send_input(events).await?)
    }
}

/// Starts the VM from the snapshot `req` names: checks it against this host
/// (kernel, versions, files) and restores it with run files in `run_dir`.
async fn restore_vm(
    backend: &capsa_qemu::QemuBackend,
    req: &RestoreRequest,
    opts: StartOptions,
) -> capsa_core::Result<capsa_core::RestoredVm> {
    let meta = SnapshotMeta::read(&req.snapshot)?;
    meta.check_host(&req.snapshot)?;
    backend.restore(&req.snapshot, &meta, opts).await
}

/// Serves the monitor RPC on one byte stream until it closes.
async fn serve_conn<S>(server: Server, io: S)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let transport = crate::service::transport(io);
    BaseChannel::with_defaults(transport)
        .execute(server.serve())
        .for_each(|f| async {
            tokio::spawn(f);
        })
        .await;
}

/// Runs the monitor to completion on the calling thread (it must live as long
/// as the monitor: QEMU's parent-death signal fires when its forking thread exits).
pub fn run(opts: ServeOptions) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| VmmError::io("creating the runtime", e))?;
    rt.block_on(serve(opts))
}

/// Takes fds 0 and 1 for the RPC channel and points the process's own stdin
/// at /dev/null and stdout at stderr, so no child can write into the channel.
fn take_stdio() -> Result<(std::fs::File, std::fs::File)> {
    use std::os::fd::FromRawFd;
    // SAFETY: dup/dup2/open on fds this process owns; results are checked.
    unsafe {
        let rin = libc::dup(0);
        let rout = libc::dup(1);
        if rin < 0 || rout < 0 {
            return Err(VmmError::io(
                "duplicating stdio",
                std::io::Error::last_os_error(),
            ));
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::close(null);
        }
        libc::dup2(2, 1);
        libc::fcntl(rin, libc::F_SETFD, libc::FD_CLOEXEC);
        libc::fcntl(rout, libc::F_SETFD, libc::FD_CLOEXEC);
        Ok((
            std::fs::File::from_raw_fd(rin),
            std::fs::File::from_raw_fd(rout),
        ))
    }
}

/// An async byte stream over the spawner's pipes (falls back to blocking-pool
/// file I/O when stdio is not a pipe, e.g. a terminal when run by hand).
fn stdio_stream(rin: std::fs::File, rout: std::fs::File) -> Result<Box<dyn AsyncReadWrite>> {
    use std::os::unix::fs::FileTypeExt;
    use tokio::net::unix::pipe;
    let is_fifo = |f: &std::fs::File| f.metadata().is_ok_and(|m| m.file_type().is_fifo());
    let err = |e| VmmError::io("registering the stdio pipes", e);
    let r: Box<dyn AsyncRead + Send + Unpin> = if is_fifo(&rin) {
        Box::new(pipe::Receiver::from_file(rin).map_err(err)?)
    } else {
        Box::new(tokio::fs::File::from_std(rin))
    };
    let w: Box<dyn AsyncWrite + Send + Unpin> = if is_fifo(&rout) {
        Box::new(pipe::Sender::from_file(rout).map_err(err)?)
    } else {
        Box::new(tokio::fs::File::from_std(rout))
    };
    Ok(Box::new(tokio::io::join(r, w)))
}

trait AsyncReadWrite: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncReadWrite for T {}

fn bind_private(path: &Path) -> Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)
        .map_err(|e| VmmError::io(format!("binding {}", path.display()), e))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| VmmError::io(format!("chmod {}", path.display()), e))?;
    Ok(l)
}

async fn serve(opts: ServeOptions) -> Result<()> {
    // Own session: a Ctrl-C (SIGINT/SIGHUP) meant for the spawner's terminal
    // must not kill the VM of a keep-alive sandbox.
    // SAFETY: setsid has no memory effects; failure (already a leader) is harmless.
    unsafe {
        libc::setsid();
    }
    let dir = opts.state_dir.clone();
    let spec: VmSpec =
        state::read_json_opt(&dir.join(files::SPEC))?.ok_or_else(|| VmmError::BadState {
            path: dir.join(files::SPEC),
            message: "missing".into(),
        })?;
    let restore: Option<RestoreRequest> = state::read_json_opt(&dir.join(files::RESTORE))?;
    state::check_socket_paths(&dir)?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "vm".into());
    let me = std::process::id();
    std::fs::write(dir.join(files::PID), format!("{me}\n"))
        .map_err(|e| VmmError::io("writing monitor.pid", e))?;
    let created_at = StateFile::read(&dir)
        .ok()
        .flatten()
        .map_or_else(state::now_secs, |s| s.created_at);
    let record = StateFile {
        state: RecordedState::Starting,
        exit: None,
        monitor_pid: me,
        monitor_starttime: state::process_starttime(me),
        vmm_pid: None,
        vmm_starttime: None,
        created_at,
        updated_at: state::now_secs(),
    };
    record.write(&dir)?;
    let console_enabled = spec.console.enabled;
    let info = MonitorInfo {
        name: name.clone(),
        monitor_pid: me,
        vmm_pid: None,
        state_dir: dir.clone(),
        vsock_socket: spec.vsock.map(|_| dir.join(files::VSOCK_SOCK)),
        console_socket: console_enabled.then(|| dir.join(files::CONSOLE_SOCK)),
        console_log: console_enabled.then(|| dir.join(files::CONSOLE_LOG)),
        spec: spec.clone(),
        created_at,
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let (exit_tx, _) = watch::channel(None);
    let inner = Arc::new(Inner {
        dir: dir.clone(),
        info: Mutex::new(info),
        record: Mutex::new(record),
        instance: OnceCell::new(),
        start_error: Mutex::new(None),
        exit: exit_tx,
        keep_alive: AtomicBool::new(opts.keep_alive),
    });
    let server = Server(inner.clone());

    // Sockets first, then the stdio channel: once the spawner's first RPC
    // answers, every socket exists.
    let listener = bind_private(&dir.join(files::MONITOR_SOCK))?;
    let hub = if console_enabled {
        let l = bind_private(&dir.join(files::CONSOLE_SOCK))?;
        let hub = ConsoleHub::new(&dir.join(files::CONSOLE_LOG))?;
        tokio::spawn(hub.clone().accept(l));
        Some(hub)
    } else {
        None
    };
    {
        let server = server.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, _)) => {
                        tokio::spawn(serve_conn(server.clone(), s));
                    }
                    Err(e) => {
                        tracing::warn!("monitor.sock accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
    let (stdin_closed_tx, mut stdin_closed) = watch::channel(false);
    let (rin, rout) = take_stdio()?;
    {
        let server = server.clone();
        tokio::spawn(async move {
            match stdio_stream(rin, rout) {
                Ok(io) => serve_conn(server, io).await,
                Err(e) => tracing::error!("no RPC on stdio: {e}"),
            }
            tracing::info!("stdin closed");
            let _ = stdin_closed_tx.send(true);
        });
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| VmmError::io("installing the SIGTERM handler", e))?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| VmmError::io("installing the SIGINT handler", e))?;

    // Start the VM here, on the main thread (see `run`).
    tracing::info!(name = %name, dir = %dir.display(), restore = ?restore, "starting the VM");
    let opts = StartOptions {
        run_dir: dir.clone(),
        name: name.clone(),
    };
    let started = match capsa_qemu::QemuBackend::new() {
        Ok(b) => match &restore {
            None => b.start(spec, opts).await.map(|i| (i, None)),
            Some(req) => restore_vm(&b, req, opts)
                .await
                .map(|r| (r.instance, Some(r.spec))),
        },
        Err(e) => Err(e.into()),
    };
    let started = match started {
        Ok((instance, Some(restored_spec))) => {
            record_restore(&inner, &restored_spec);
            Ok(instance)
        }
        Ok((instance, None)) => Ok(instance),
        Err(e) => Err(e),
    };
    let mut instance = match started {
        Ok(i) => i,
        Err(e) => {
            tracing::error!("the VM failed to start: {e}");
            let fix = e.fix().map(str::to_string);
            let message = e.to_string();
            *Inner::lock(&inner.start_error) = Some(RpcError {
                code: "start_failed".into(),
                message: message.clone(),
                fix,
            });
            let reason = ExitReason::Failed { code: -1, message };
            release_sockets(&dir);
            inner.set_state(RecordedState::Stopped, Some(reason.clone()));
            let _ = inner.exit.send(Some(reason));
            finish(&inner, false).await;
            return Ok(());
        }
    };
    if let (Some(hub), Some(streams)) = (&hub, instance.take_console()) {
        hub.attach(streams);
    }
    let instance: Arc<dyn VmInstance> = Arc::from(instance);
    let vmm_pid = instance.pid();
    {
        let mut r = Inner::lock(&inner.record);
        r.vmm_pid = vmm_pid;
        r.vmm_starttime = vmm_pid.and_then(state::process_starttime);
    }
    Inner::lock(&inner.info).vmm_pid = vmm_pid;
    let _ = inner.instance.set(instance.clone());
    if Inner::lock(&inner.info).spec.display.is_some() {
        serve_vnc(&dir, instance.clone());
    }
    inner.set_state(RecordedState::Running, None);
    tracing::info!(?vmm_pid, "the VM runs");
    // The VM's end goes to the main loop first, not straight to `wait()`
    // callers: the sockets are released and the stop recorded before anyone
    // learns the VM ended (see `release_sockets`).
    let (ended_tx, mut exit_rx) = watch::channel(None);
    {
        let instance = instance.clone();
        tokio::spawn(async move {
            let r = instance
                .wait()
                .await
                .unwrap_or_else(|e| ExitReason::Failed {
                    code: -1,
                    message: e.to_string(),
                });
            let _ = ended_tx.send(Some(r));
        });
    }

    let mut ephemeral = false;
    let mut stopping = false;
    loop {
        if exit_rx.borrow().is_some() {
            break;
        }
        let closed = *stdin_closed.borrow();
        if closed && !inner.keep_alive.load(Ordering::SeqCst) && !ephemeral {
            tracing::info!("spawner gone and keep-alive off: killing the VM");
            ephemeral = true;
            let _ = instance.kill().await;
            continue;
        }
        tokio::select! {
            _ = exit_rx.changed() => {}
            _ = stdin_closed.changed(), if !closed => {}
            // Re-check keep-alive now and then after stdin closed (it may be switched off).
            _ = tokio::time::sleep(Duration::from_millis(500)), if closed => {}
            s = term.recv(), if !stopping => {
                if s.is_some() {
                    stopping = true;
                    spawn_graceful_stop(instance.clone());
                }
            }
            s = int.recv(), if !stopping => {
                if s.is_some() {
                    stopping = true;
                    spawn_graceful_stop(instance.clone());
                }
            }
        }
    }
    let reason = exit_rx.borrow().clone();
    tracing::info!(?reason, "the VM ended");
    release_sockets(&dir);
    inner.set_state(RecordedState::Stopped, reason.clone());
    let _ = inner.exit.send(reason);
    // Spawner gone and nobody asked to keep the VM: nobody else will clean up.
    let orphaned = *stdin_closed.borrow() && !inner.keep_alive.load(Ordering::SeqCst);
    finish(&inner, ephemeral || orphaned).await;
    Ok(())
}

/// After a restore: `spec.json` becomes the restored VM's spec (its disks are
/// its own overlays in the sandbox directory, so a later `start` boots from
/// them), and `restore.json` is renamed so it is not acted on again.
/// Failures are logged: the running VM matters more than its record.
fn record_restore(inner: &Inner, spec: &VmSpec) {
    let dir = &inner.dir;
    if let Err(e) = state::write_json_atomic(&dir.join(files::SPEC), spec) {
        tracing::warn!("cannot record the restored spec: {e}");
    }
    if let Err(e) = std::fs::rename(dir.join(files::RESTORE), dir.join(files::RESTORED_FROM)) {
        tracing::warn!("cannot retire {}: {e}", files::RESTORE);
    }
    Inner::lock(&inner.info).spec = spec.clone();
}

/// A graceful stop as a task: ask the guest, then kill after the grace period.
fn spawn_graceful_stop(i: Arc<dyn VmInstance>) {
    tokio::spawn(async move {
        tracing::info!("SIGTERM: asking the guest to shut down");
        if i.request_shutdown().await.is_err()
            || tokio::time::timeout(STOP_GRACE, i.wait()).await.is_err()
        {
            tracing::warn!("the guest did not shut down in time: killing it");
            let _ = i.kill().await;
        }
    });
}

/// Unlinks the sandbox's socket paths (and the pid file) once its VM ended,
/// before the stop is recorded: a `stopped` record then means the paths are
/// free, so an immediate restart's new monitor can bind them. The open
/// listeners stay usable for connections already made (in-flight replies);
/// nothing of this monitor touches the paths afterwards (the vsock device
/// removes only the socket files it bound itself).
/// Most VNC viewers handed to QEMU per second (a local, owner-only
/// socket, but each viewer costs QEMU a client).
const VNC_ACCEPTS_PER_SEC: u32 = 20;

/// Listens on `<dir>/vnc.sock` (owner only) and hands each connection to
/// QEMU's VNC server, which has no listening socket of its own.
fn serve_vnc(dir: &Path, instance: Arc<dyn VmInstance>) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(files::VNC_SOCK);
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("cannot listen on {}: {e}; no VNC viewers", path.display());
            return;
        }
    };
    if let Err(e) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)) {
        tracing::warn!("cannot restrict {}: {e}; no VNC viewers", path.display());
        let _ = std::fs::remove_file(&path);
        return;
    }
    tokio::spawn(async move {
        let mut window = std::time::Instant::now();
        let mut in_window = 0u32;
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("vnc.sock accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if window.elapsed() >= Duration::from_secs(1) {
                window = std::time::Instant::now();
                in_window = 0;
            }
            in_window += 1;
            if in_window > VNC_ACCEPTS_PER_SEC {
                tracing::warn!("too many VNC viewers at once; refusing one");
                continue;
            }
            let fd = match stream.into_std() {
                Ok(s) => std::os::fd::OwnedFd::from(s),
                Err(e) => {
                    tracing::warn!("vnc.sock: {e}");
                    continue;
                }
            };
            // QEMU drives the socket itself; it must block like any it accepts.
            let _ = set_blocking(&fd);
            match instance.vnc_add_client(fd, false).await {
                Ok(()) => tracing::info!("VNC viewer added"),
                Err(e) => tracing::warn!("cannot add a VNC viewer: {e}"),
            }
        }
    });
}

fn set_blocking(fd: &std::os::fd::OwnedFd) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a valid fd.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn release_sockets(dir: &Path) {
    for f in [
        files::VSOCK_SOCK,
        files::VHOST_VSOCK_SOCK,
        files::QMP_SOCK,
        files::CONSOLE_SOCK,
        files::VNC_SOCK,
        files::MONITOR_SOCK,
        files::PID,
    ] {
        let _ = std::fs::remove_file(dir.join(f));
    }
}

/// Lets in-flight replies flush, then (for an ephemeral VM) removes the
/// whole directory.
async fn finish(inner: &Inner, ephemeral: bool) {
    tokio::time::sleep(EXIT_LINGER).await;
    let dir = &inner.dir;
    if ephemeral {
        tracing::info!("removing the ephemeral state directory");
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The console multiplexer: one reader of the guest's serial output, many clients.
#[derive(Clone)]
struct ConsoleHub(Arc<HubInner>);

struct HubInner {
    state: Mutex<HubState>,
    input_tx: mpsc::Sender<Vec<u8>>,
    input_rx: Mutex<Option<mpsc::Receiver<Vec<u8>>>>,
    log: Mutex<Option<(std::fs::File, u64)>>,
}

struct HubState {
    history: VecDeque<u8>,
    /// `None` once the guest's output ended.
    live: Option<broadcast::Sender<Arc<[u8]>>>,
}

impl ConsoleHub {
    fn new(log: &Path) -> Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| VmmError::io(format!("opening {}", log.display()), e))?;
        let size = f.metadata().map_or(0, |m| m.len());
        let (input_tx, input_rx) = mpsc::channel(64);
        let (live, _) = broadcast::channel(1024);
        Ok(Self(Arc::new(HubInner {
            state: Mutex::new(HubState {
                history: VecDeque::new(),
                live: Some(live),
            }),
            input_tx,
            input_rx: Mutex::new(Some(input_rx)),
            log: Mutex::new(Some((f, size))),
        })))
    }

    /// Starts pumping the VM's console through the hub.
    fn attach(&self, streams: ConsoleStreams) {
        let ConsoleStreams {
            mut input,
            mut output,
        } = streams;
        let hub = self.clone();
        tokio::spawn(async move {
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                let n = match output.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                hub.push(&chunk[..n]);
            }
            let mut st = Inner::lock(&hub.0.state);
            st.live = None;
        });
        let rx = Inner::lock(&self.0.input_rx).take();
        if let Some(mut rx) = rx {
            tokio::spawn(async move {
                while let Some(bytes) = rx.recv().await {
                    if input.write_all(&bytes).await.is_err() || input.flush().await.is_err() {
                        break;
                    }
                }
            });
        }
    }

    fn push(&self, bytes: &[u8]) {
        {
            use std::io::Write;
            let mut log = Inner::lock(&self.0.log);
            if let Some((f, size)) = log.as_mut() {
                if *size + bytes.len() as u64 > CONSOLE_LOG_CAP {
                    // Keep the newest output; the log is for humans, not an archive.
                    let _ = f.set_len(0);
                    *size = 0;
                    let _ = f.write_all(b"[capsa: console log truncated at 16 MiB]\n");
                }
                match f.write_all(bytes) {
                    Ok(()) => *size += bytes.len() as u64,
                    Err(e) => {
                        tracing::warn!("console log write failed, logging stops: {e}");
                        *log = None;
                    }
                }
            }
        }
        let mut st = Inner::lock(&self.0.state);
        st.history.extend(bytes);
        if st.history.len() > CONSOLE_HISTORY {
            let excess = st.history.len() - CONSOLE_HISTORY;
            st.history.drain(..excess);
        }
        if let Some(live) = &st.live {
            let _ = live.send(Arc::from(bytes));
        }
    }

    async fn accept(self, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(self.clone().client(s));
                }
                Err(e) => {
                    tracing::warn!("console.sock accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// One console client: the retained history, then live output; its bytes go to the guest.
    async fn client(self, s: UnixStream) {
        let (history, rx) = {
            let st = Inner::lock(&self.0.state);
            let h: Vec<u8> = st.history.iter().copied().collect();
            (h, st.live.as_ref().map(|l| l.subscribe()))
        };
        let (mut r, mut w) = s.into_split();
        let input = self.0.input_tx.clone();
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if input.send(buf[..n].to_vec()).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let out = async {
            w.write_all(&history).await?;
            if let Some(mut rx) = rx {
                loop {
                    match rx.recv().await {
                        Ok(b) => w.write_all(&b).await?,
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            tracing::debug!("a slow console client skipped {n} chunks");
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    }
                }
            }
            w.shutdown().await
        };
        // A client that has gone (its end closed) must not keep a
        // descriptor here until the guest next prints: end on either side.
        tokio::pin!(out);
        let mut reader = reader;
        tokio::select! {
            _ = &mut out => reader.abort(),
            _ = &mut reader => {}
        }
    }
}
