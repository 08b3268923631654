//! The spawner's and reattacher's side: start a monitor, or connect to one,
//! and drive it as a [`capsa_core::VmInstance`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use capsa_core::{ConsoleStreams, ExitReason, SnapshotMeta, VmInstance, VmSpec, VmStatus};
use tarpc::client::RpcError as TransportError;

use crate::service::{context_with_deadline, MonitorClient, MonitorInfo, LONG_CALL, SNAPSHOT_CALL};
use crate::state::{self, files, RestoreRequest, StateFile, StateRoot};
use crate::{Result, VmmError};

/// How long a fresh monitor gets to answer its first RPC.
const MONITOR_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of ordinary RPCs.
const RPC_TIMEOUT: Duration = Duration::from_secs(60);

/// How to spawn a monitor.
#[derive(Debug, Clone)]
pub struct SpawnOptions {
    /// Where the sandbox directory goes.
    pub state_root: StateRoot,
    /// The sandbox name (see [`crate::state::validate_name`]).
    pub name: String,
    /// Keep the VM running when the spawner goes away (a persistent sandbox).
    pub keep_alive: bool,
    /// Library-level extras written to `sandbox.json`.
    pub extra: Option<serde_json::Value>,
    /// The `capsa-vmm` binary; `None` = [`find_monitor_binary`].
    pub monitor_binary: Option<PathBuf>,
}

impl SpawnOptions {
    /// Options for `name` under the default state root, not kept alive.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            state_root: StateRoot::default_root(),
            name: name.into(),
            keep_alive: false,
            extra: None,
            monitor_binary: None,
        }
    }
}

/// Finds `capsa-vmm`: `$CAPSA_VMM`; else next to the current executable (or
/// one directory up, where test binaries in `target/*/deps` find it); else `PATH`.
pub fn find_monitor_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CAPSA_VMM").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(VmmError::MonitorNotFound {
                looked: format!("CAPSA_VMM={}", p.display()),
            })
        };
    }
    let mut looked = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        let mut dir = exe.parent().map(Path::to_path_buf);
        for _ in 0..2 {
            let Some(d) = dir else { break };
            let c = d.join("capsa-vmm");
            if c.is_file() {
                return Ok(c);
            }
            looked.push(c.display().to_string());
            dir = d.parent().map(Path::to_path_buf);
        }
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for d in std::env::split_paths(&path) {
        let c = d.join("capsa-vmm");
        if c.is_file() {
            return Ok(c);
        }
    }
    looked.push("PATH".into());
    Err(VmmError::MonitorNotFound {
        looked: looked.join(", "),
    })
}

/// A client of one monitor. Implements [`VmInstance`].
///
/// A handle from [`spawn`] without keep-alive owns the VM: dropping it closes
/// the monitor's stdin and the monitor kills the VM and removes the sandbox
/// directory. A handle from [`connect`] (or a detached one) never ends the VM.
pub struct MonitorHandle {
    client: MonitorClient,
    info: Mutex<MonitorInfo>,
    dir: PathBuf,
    /// The monitor process, when this handle spawned it.
    child: Option<tokio::process::Child>,
    /// Whether dropping this handle ends the VM (spawned, keep-alive off).
    owns_vm: bool,
    console_taken: bool,
    exit: Arc<OnceLock<ExitReason>>,
}

impl std::fmt::Debug for MonitorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MonitorHandle")
            .field("dir", &self.dir)
            .field("owns_vm", &self.owns_vm)
            .finish()
    }
}

fn rpc_err(call: &'static str, e: TransportError) -> VmmError {
    VmmError::Rpc {
        call,
        message: e.to_string(),
    }
}

/// Creates the sandbox directory, writes its spec and extras, spawns
/// `capsa-vmm serve` on it and returns once the monitor answers.
///
/// Fails with [`VmmError::AlreadyExists`] if the directory exists at all.
/// The VM may still be starting: see [`MonitorHandle::wait_started`].
pub async fn spawn(spec: VmSpec, opts: SpawnOptions) -> Result<MonitorHandle> {
    spawn_inner(spec, opts, None).await
}

/// Like [`spawn`], but the monitor restores the snapshot in `snapshot` (a
/// directory) instead of booting: `spec` is the snapshot's (from its
/// metadata); once restored, the monitor records the VM's own spec (disks on
/// its overlays) in `spec.json`. The caller checks the snapshot first (it is
/// checked again by the monitor); a failed restore is reported like a failed
/// boot, by [`MonitorHandle::wait_started`].
pub async fn spawn_restored(
    snapshot: &Path,
    spec: VmSpec,
    opts: SpawnOptions,
) -> Result<MonitorHandle> {
    // The monitor's working directory is not ours.
    let snapshot = std::path::absolute(snapshot)
        .map_err(|e| VmmError::io(format!("resolving {}", snapshot.display()), e))?;
    spawn_inner(spec, opts, Some(RestoreRequest { snapshot })).await
}

async fn spawn_inner(
    spec: VmSpec,
    opts: SpawnOptions,
    restore: Option<RestoreRequest>,
) -> Result<MonitorHandle> {
    state::validate_name(&opts.name)?;
    let dir = opts.state_root.sandbox_dir(&opts.name);
    state::check_socket_paths(&dir)?;
    let binary = match opts.monitor_binary.clone() {
        Some(b) => b,
        None => find_monitor_binary()?,
    };
    opts.state_root.check()?;
    let parent = opts.state_root.sandboxes_dir();
    create_private_dir_all(&parent)?;
    // Verified again once created: a directory raced in meanwhile is refused.
    opts.state_root.check()?;
    let mk = {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(&dir)
    };
    match mk {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(VmmError::AlreadyExists { name: opts.name });
        }
        Err(e) => return Err(VmmError::io(format!("creating {}", dir.display()), e)),
    }
    let result = async {
        write_json(&dir.join(files::SPEC), &spec)?;
        if let Some(extra) = &opts.extra {
            write_json(&dir.join(files::SANDBOX), extra)?;
        }
        if let Some(r) = &restore {
            write_json(&dir.join(files::RESTORE), r)?;
        }
        launch(&binary, &dir, &opts.name, opts.keep_alive).await
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// Boots a stopped (or dead) sandbox again from its `spec.json`, with a fresh
/// monitor, in the same directory. The old record is replaced.
pub async fn respawn(
    root: &StateRoot,
    name: &str,
    keep_alive: bool,
    monitor_binary: Option<PathBuf>,
) -> Result<MonitorHandle> {
    let rec = root.get(name)?;
    if rec.is_live() {
        return Err(VmmError::Running {
            name: name.to_string(),
        });
    }
    let binary = match monitor_binary {
        Some(b) => b,
        None => find_monitor_binary()?,
    };
    // A monitor that just recorded the stop lingers a moment (flushing
    // replies) with its sockets still bound: let it go first.
    if let Ok(Some(old)) = StateFile::read(&rec.dir) {
        for _ in 0..250 {
            if !state::process_alive(old.monitor_pid, old.monitor_starttime) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    root.kill_leftovers(name)?;
    let _ = std::fs::remove_file(rec.dir.join(files::STATE));
    launch(&binary, &rec.dir, name, keep_alive).await
}

async fn launch(binary: &Path, dir: &Path, name: &str, keep_alive: bool) -> Result<MonitorHandle> {
    let log_path = dir.join(files::MONITOR_LOG);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| VmmError::io(format!("opening {}", log_path.display()), e))?;
    let mut cmd = tokio::process::Command::new(binary);
    cmd.arg("serve").arg("--state-dir").arg(dir);
    if keep_alive {
        cmd.arg("--keep-alive");
    }
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(log);
    tracing::debug!(binary = %binary.display(), dir = %dir.display(), "spawning the monitor");
    let mut child = cmd.spawn().map_err(|e| VmmError::Monitor {
        name: name.to_string(),
        message: format!("cannot run {}: {e}", binary.display()),
        log: log_path.clone(),
    })?;
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(VmmError::Monitor {
            name: name.to_string(),
            message: "no stdio pipes".into(),
            log: log_path,
        });
    };
    let transport = crate::service::transport(tokio::io::join(stdout, stdin));
    let client = MonitorClient::new(tarpc::client::Config::default(), transport).spawn();
    let info = match client
        .describe(context_with_deadline(MONITOR_UP_TIMEOUT))
        .await
    {
        Ok(i) => i,
        Err(e) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(VmmError::Monitor {
                name: name.to_string(),
                message: format!(
                    "it did not answer ({e}); last log lines: {}",
                    log_tail(&log_path)
                ),
                log: log_path,
            });
        }
    };
    Ok(MonitorHandle {
        client,
        info: Mutex::new(info),
        dir: dir.to_path_buf(),
        child: Some(child),
        owns_vm: !keep_alive,
        console_taken: false,
        exit: Arc::new(OnceLock::new()),
    })
}

/// Attaches to the running monitor of the sandbox in `dir` over `monitor.sock`.
/// The returned handle never ends the VM when dropped.
pub async fn connect(dir: &Path) -> Result<MonitorHandle> {
    let sock = dir.join(files::MONITOR_SOCK);
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stream = tokio::net::UnixStream::connect(&sock)
        .await
        .map_err(|e| VmmError::Monitor {
            name: name.clone(),
            message: format!("cannot connect to {}: {e}", sock.display()),
            log: dir.join(files::MONITOR_LOG),
        })?;
    let client = MonitorClient::new(
        tarpc::client::Config::default(),
        crate::service::transport(stream),
    )
    .spawn();
    let info = client
        .describe(context_with_deadline(RPC_TIMEOUT))
        .await
        .map_err(|e| rpc_err("describe", e))?;
    Ok(MonitorHandle {
        client,
        info: Mutex::new(info),
        dir: dir.to_path_buf(),
        child: None,
        owns_vm: false,
        console_taken: false,
        exit: Arc::new(OnceLock::new()),
    })
}

impl MonitorHandle {
    /// Never connects `console.sock` for this handle: callers that only run
    /// commands or move files must not hold a console client (each one is a
    /// descriptor in the monitor for as long as it lives).
    pub fn skip_console(&mut self) {
        self.console_taken = true;
    }

    /// The sandbox directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What the monitor said about itself (refreshed by [`MonitorHandle::refresh`]).
    pub fn info(&self) -> MonitorInfo {
        self.info.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The monitor's pid.
    pub fn monitor_pid(&self) -> u32 {
        self.info().monitor_pid
    }

    /// The raw RPC client, for calls this type does not wrap.
    pub fn rpc(&self) -> &MonitorClient {
        &self.client
    }

    /// Re-reads [`MonitorInfo`] from the monitor (e.g. for the QEMU pid once started).
    pub async fn refresh(&self) -> Result<MonitorInfo> {
        let i = self
            .client
            .describe(context_with_deadline(RPC_TIMEOUT))
            .await
            .map_err(|e| rpc_err("describe", e))?;
        *self.info.lock().unwrap_or_else(|p| p.into_inner()) = i.clone();
        Ok(i)
    }

    /// Waits until the VM left `Starting`; a VM that failed to start is an error
    /// carrying the backend's message.
    pub async fn wait_started(&self, timeout: Duration) -> Result<VmStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let st = self
                .client
                .status(context_with_deadline(RPC_TIMEOUT))
                .await
                .map_err(|e| rpc_err("status", e))?;
            match st {
                Ok(VmStatus::Starting) => {}
                Ok(VmStatus::Stopped {
                    reason: ExitReason::Failed { message, .. },
                }) => {
                    return Err(VmmError::Core(capsa_core::Error::Backend {
                        backend: "capsa-vmm",
                        message: format!("the VM failed to start: {message}"),
                        fix: None,
                        source: None,
                    }))
                }
                Ok(s) => {
                    self.refresh().await?;
                    return Ok(s);
                }
                Err(e) => return Err(VmmError::Core(e.into())),
            }
            if tokio::time::Instant::now() > deadline {
                return Err(VmmError::Core(capsa_core::Error::Timeout {
                    what: "the VM to start".into(),
                    after: timeout,
                }));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sets whether the VM survives its spawner (see [`crate::service::Monitor::set_keep_alive`]).
    pub async fn set_keep_alive(&mut self, keep: bool) -> Result<()> {
        self.client
            .set_keep_alive(context_with_deadline(RPC_TIMEOUT), keep)
            .await
            .map_err(|e| rpc_err("set_keep_alive", e))?;
        if self.child.is_some() {
            self.owns_vm = !keep;
        }
        Ok(())
    }

    /// Saves the VM into `dir` (made absolute here: the monitor's working
    /// directory is not ours); see [`VmInstance::snapshot`].
    async fn snapshot_rpc(&self, dir: &Path) -> capsa_core::Result<SnapshotMeta> {
        let dir = std::path::absolute(dir)
            .map_err(|e| capsa_core::Error::io(format!("resolving {}", dir.display()), e))?;
        let r = self
            .client
            .snapshot(context_with_deadline(SNAPSHOT_CALL), dir)
            .await;
        Ok(r.map_err(|e| self.core_err("snapshot", e))??)
    }

    /// Lets the VM run on without this handle: keep-alive on, then the pipes close.
    pub async fn detach(mut self) -> Result<()> {
        self.set_keep_alive(true).await
    }

    /// The exit recorded in `state.json`, once the monitor is gone or unreachable.
    fn recorded_exit(&self) -> Option<ExitReason> {
        if let Some(r) = self.exit.get() {
            return Some(r.clone());
        }
        let r = match StateFile::read(&self.dir) {
            Ok(Some(s)) if s.exit.is_some() => s.exit,
            Ok(Some(s)) if !state::process_alive(s.monitor_pid, s.monitor_starttime) => {
                Some(ExitReason::Failed {
                    code: -1,
                    message: "the monitor died without recording how the VM ended".into(),
                })
            }
            Ok(None) | Err(_) if !self.dir.exists() => Some(ExitReason::Failed {
                code: -1,
                message: "the sandbox was removed".into(),
            }),
            _ => None,
        }?;
        let _ = self.exit.set(r.clone());
        Some(r)
    }

    fn core_err(&self, call: &'static str, e: TransportError) -> capsa_core::Error {
        capsa_core::Error::Backend {
            backend: "capsa-vmm",
            message: format!("monitor RPC {call} failed: {e}"),
            fix: Some(format!(
                "see {} for the monitor's log",
                self.dir.join(files::MONITOR_LOG).display()
            )),
            source: None,
        }
    }
}

/// Deadline of share attach/detach calls (virtiofsd start, hot-plug, the guest's unplug).
const SHARE_CALL: std::time::Duration = std::time::Duration::from_secs(60);

#[async_trait::async_trait]
impl VmInstance for MonitorHandle {
    fn pid(&self) -> Option<u32> {
        self.info().vmm_pid
    }

    fn take_console(&mut self) -> Option<ConsoleStreams> {
        if self.console_taken {
            return None;
        }
        let path = self.info().console_socket?;
        // Needs a runtime to register the socket; without one there is no console.
        tokio::runtime::Handle::try_current().ok()?;
        let s = std::os::unix::net::UnixStream::connect(&path)
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .and_then(tokio::net::UnixStream::from_std);
        match s {
            Ok(s) => {
                self.console_taken = true;
                let (r, w) = s.into_split();
                Some(ConsoleStreams {
                    input: Box::new(w),
                    output: Box::new(r),
                })
            }
            Err(e) => {
                tracing::warn!("cannot connect to {}: {e}", path.display());
                None
            }
        }
    }

    fn vsock_socket(&self) -> Option<PathBuf> {
        self.info().vsock_socket
    }

    async fn status(&self) -> capsa_core::Result<VmStatus> {
        if let Some(reason) = self.exit.get() {
            return Ok(VmStatus::Stopped {
                reason: reason.clone(),
            });
        }
        match self.client.status(context_with_deadline(RPC_TIMEOUT)).await {
            Ok(r) => Ok(r?),
            Err(e) => match self.recorded_exit() {
                Some(reason) => Ok(VmStatus::Stopped { reason }),
                None => Err(self.core_err("status", e)),
            },
        }
    }

    async fn pause(&self) -> capsa_core::Result<()> {
        let r = self.client.pause(context_with_deadline(RPC_TIMEOUT)).await;
        Ok(r.map_err(|e| self.core_err("pause", e))??)
    }

    async fn resume(&self) -> capsa_core::Result<()> {
        let r = self.client.resume(context_with_deadline(RPC_TIMEOUT)).await;
        Ok(r.map_err(|e| self.core_err("resume", e))??)
    }

    async fn request_shutdown(&self) -> capsa_core::Result<()> {
        let r = self
            .client
            .request_shutdown(context_with_deadline(RPC_TIMEOUT))
            .await;
        Ok(r.map_err(|e| self.core_err("request_shutdown", e))??)
    }

    async fn kill(&self) -> capsa_core::Result<()> {
        if self.exit.get().is_some() {
            return Ok(());
        }
        match self.client.kill(context_with_deadline(RPC_TIMEOUT)).await {
            Ok(r) => Ok(r?),
            // The monitor exits right after the VM: a lost reply is fine if the exit is recorded.
            Err(e) => match self.recorded_exit() {
                Some(_) => Ok(()),
                None => Err(self.core_err("kill", e)),
            },
        }
    }

    async fn snapshot(&self, dir: &Path) -> capsa_core::Result<SnapshotMeta> {
        self.snapshot_rpc(dir).await
    }

    async fn attach_share(&self, share: &capsa_core::ShareSpec) -> capsa_core::Result<()> {
        // Validated here too, so a bad host path is named before any RPC.
        let mut share = share.clone();
        share.validate()?;
        let r = self
            .client
            .attach_share(context_with_deadline(SHARE_CALL), share)
            .await;
        Ok(r.map_err(|e| self.core_err("attach_share", e))??)
    }

    async fn detach_share(&self, guest: &str) -> capsa_core::Result<capsa_core::ShareSpec> {
        let r = self
            .client
            .detach_share(context_with_deadline(SHARE_CALL), guest.to_string())
            .await;
        Ok(r.map_err(|e| self.core_err("detach_share", e))??)
    }

    async fn shares(&self) -> capsa_core::Result<Vec<capsa_core::ShareSpec>> {
        let r = self.client.shares(tarpc::context::current()).await;
        Ok(r.map_err(|e| self.core_err("shares", e))??)
    }

    async fn set_network_policy(
        &self,
        policy: capsa_core::NetworkPolicy,
    ) -> capsa_core::Result<()> {
        let r = self
            .client
            .set_network_policy(context_with_deadline(RPC_TIMEOUT), policy)
            .await;
        Ok(r.map_err(|e| self.core_err("set_network_policy", e))??)
    }

    async fn network_policy(&self) -> capsa_core::Result<capsa_core::NetworkPolicy> {
        let r = self
            .client
            .network_policy(context_with_deadline(RPC_TIMEOUT))
            .await;
        Ok(r.map_err(|e| self.core_err("network_policy", e))??)
    }

    async fn screendump(&self, out: &Path) -> capsa_core::Result<()> {
        let r = self
            .client
            .screendump(context_with_deadline(RPC_TIMEOUT))
            .await;
        let dumped = r.map_err(|e| self.core_err("screendump", e))??;
        // The monitor names a file it made in this sandbox's directory;
        // anything else is refused rather than moved.
        let screens = self.dir.join(crate::service::SCREENS_DIR);
        if dumped.parent() != Some(screens.as_path()) {
            return Err(capsa_core::Error::Backend {
                backend: "capsa-vmm",
                message: format!("the monitor dumped the screen to {}", dumped.display()),
                fix: Some("upgrade capsa-vmm to match this capsa".into()),
                source: None,
            });
        }
        let moved = match std::fs::rename(&dumped, out) {
            Ok(()) => Ok(()),
            Err(_) => std::fs::copy(&dumped, out).map(|_| ()),
        };
        let _ = std::fs::remove_file(&dumped);
        moved.map_err(|e| capsa_core::Error::Backend {
            backend: "capsa-vmm",
            message: format!("cannot move the screen dump to {}: {e}", out.display()),
            fix: None,
            source: None,
        })
    }

    async fn send_input(&self, events: Vec<capsa_core::InputEvent>) -> capsa_core::Result<()> {
        capsa_core::check_input(&events)?;
        let r = self
            .client
            .send_input(context_with_deadline(RPC_TIMEOUT), events)
            .await;
        Ok(r.map_err(|e| self.core_err("send_input", e))??)
    }

    async fn network_log(&self) -> capsa_core::Result<Vec<capsa_core::NetDecision>> {
        let r = self
            .client
            .network_log(context_with_deadline(RPC_TIMEOUT))
            .await;
        Ok(r.map_err(|e| self.core_err("network_log", e))??)
    }

    async fn add_port_forward(&self, forward: capsa_core::PortForward) -> capsa_core::Result<()> {
        let r = self
            .client
            .add_port_forward(context_with_deadline(RPC_TIMEOUT), forward)
            .await;
        Ok(r.map_err(|e| self.core_err("add_port_forward", e))??)
    }

    async fn remove_port_forward(
        &self,
        host_ip: std::net::Ipv4Addr,
        host_port: u16,
    ) -> capsa_core::Result<capsa_core::PortForward> {
        let r = self
            .client
            .remove_port_forward(context_with_deadline(RPC_TIMEOUT), host_ip, host_port)
            .await;
        Ok(r.map_err(|e| self.core_err("remove_port_forward", e))??)
    }

    async fn port_forwards(&self) -> capsa_core::Result<Vec<capsa_core::PortForward>> {
        let r = self
            .client
            .port_forwards(context_with_deadline(RPC_TIMEOUT))
            .await;
        Ok(r.map_err(|e| self.core_err("port_forwards", e))??)
    }

    async fn wait(&self) -> capsa_core::Result<ExitReason> {
        loop {
            if let Some(r) = self.exit.get() {
                return Ok(r.clone());
            }
            match self.client.wait(context_with_deadline(LONG_CALL)).await {
                Ok(Ok(r)) => {
                    let _ = self.exit.set(r.clone());
                    return Ok(r);
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(TransportError::DeadlineExceeded) => continue,
                Err(e) => {
                    // The monitor may be gone a moment before state.json shows it.
                    for _ in 0..50 {
                        if let Some(r) = self.recorded_exit() {
                            return Ok(r);
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    return Err(self.core_err("wait", e));
                }
            }
        }
    }
}

impl Drop for MonitorHandle {
    fn drop(&mut self) {
        // The RPC client's pipes close with it; the monitor sees stdin EOF and,
        // without keep-alive, kills the VM and removes the directory itself.
        // If the monitor already exited (the VM ended), nobody else will clean up.
        if !self.owns_vm {
            return;
        }
        let Some(child) = self.child.as_mut() else {
            return;
        };
        let pid = child.id();
        let dir = self.dir.clone();
        let finished = matches!(child.try_wait(), Ok(Some(_)))
            || matches!(
                StateFile::read(&dir),
                Ok(Some(StateFile {
                    state: state::RecordedState::Stopped,
                    ..
                }))
            );
        if finished {
            // The VM ended before the handle: the monitor will not clean up.
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
        // The monitor is up: it sees stdin EOF, kills the VM and removes the
        // directory itself. Make sure of it in case it was exiting anyway.
        let _ = std::thread::Builder::new()
            .name("capsa-vmm-reap".into())
            .spawn(move || {
                for _ in 0..250 {
                    if pid.is_none_or(|p| !state::process_alive(p, None)) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = std::fs::remove_dir_all(&dir);
            });
    }
}

fn create_private_dir_all(path: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| VmmError::io(format!("creating {}", path.display()), e))
}

fn write_json<T: serde::Serialize>(path: &Path, v: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(v).map_err(|e| VmmError::BadState {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    std::fs::write(path, bytes).map_err(|e| VmmError::io(format!("writing {}", path.display()), e))
}

/// The last lines of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(2000);
    String::from_utf8_lossy(&text[start..]).trim().to_string()
}
