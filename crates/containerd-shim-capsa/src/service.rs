//! The task service: containerd's task API v2 over one capsa sandbox.
//!
//! One shim serves one container (grouping = container id); its VM is a
//! keep-running capsa sandbox under its own `capsa-vmm` monitor, named from
//! the namespace and id (see [`sandbox_name`]) and labelled as owned by the
//! shim, so `capsa ps` lists it and the `delete` subcommand finds it after
//! the shim died. The init process and every exec are agent execs in the
//! container's root.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::api;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::ttrpc::context::Context;
use containerd_shim::protos::ttrpc::r#async::TtrpcContext;
use containerd_shim::protos::types::task::{ProcessInfo, Status};
use containerd_shim::TtrpcResult;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch, Notify};

use crate::bundle::{clamp16, Process, Spec};
use crate::error::{unimplemented, Result, ShimError};

/// Label marking a sandbox as owned by this shim (`capsa ps` shows it).
pub const LABEL_OWNER: &str = capsa::LABEL_OWNER;
/// The owner label's value.
pub const OWNER: &str = "containerd-shim";
/// Label with the containerd namespace.
pub const LABEL_NAMESPACE: &str = "containerd.namespace";
/// Label with the container id.
pub const LABEL_ID: &str = "containerd.id";
/// Exit status reported when the process's end could not be observed.
const LOST_EXIT: u32 = 255;
/// Most execs in one container.
const MAX_EXECS: usize = 1024;
/// How long output copying may go on after a process ended.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The capsa sandbox name of container `id` in `namespace`: a hash, since
/// containerd ids may hold characters sandbox names cannot.
pub fn sandbox_name(namespace: &str, id: &str) -> String {
    let h = Sha256::digest(format!("{namespace}/{id}").as_bytes());
    let hex: String = h.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("ctrd-{hex}")
}

/// The registry the shim's sandboxes live in (`$CAPSA_STATE_DIR` or capsa's
/// default state root, as `capsa ps` reads).
pub fn registry() -> capsa::Sandboxes {
    capsa::Sandboxes::new(None)
}

/// How long after Create the pool refill starts, unless the task's init
/// process ended (or the shim shuts down) before.
const REFILL_DELAY: Duration = Duration::from_secs(2);

/// This shim's part in refilling the warm pool.
enum Refill {
    /// Nothing to do.
    Idle,
    /// To start once the task is under way.
    Pending(crate::pool::Upkeep),
    /// Started.
    Running(tokio::task::JoinHandle<()>),
}

#[derive(Debug)]
enum Ctl {
    Signal(i32),
    Resize(u16, u16),
}

#[derive(Debug, Clone, Copy)]
struct Exited {
    status: u32,
    at: (i64, i32),
}

#[derive(Debug, Default)]
struct ProcState {
    pid: u32,
    started: bool,
    exited: Option<Exited>,
}

/// One process: the init (exec id "") or an exec.
struct Proc {
    exec_id: String,
    process: Process,
    stdin: String,
    stdout: String,
    stderr: String,
    state: Mutex<ProcState>,
    ctl: Mutex<Option<mpsc::Sender<Ctl>>>,
    close_stdin: Arc<Notify>,
    exit_tx: watch::Sender<Option<Exited>>,
}

impl Proc {
    fn new(exec_id: String, process: Process, io: [String; 3]) -> Arc<Self> {
        let [stdin, stdout, stderr] = io;
        Arc::new(Proc {
            exec_id,
            process,
            stdin,
            stdout,
            stderr,
            state: Mutex::new(ProcState::default()),
            ctl: Mutex::new(None),
            close_stdin: Arc::new(Notify::new()),
            exit_tx: watch::channel(None).0,
        })
    }

    fn snapshot(&self) -> ProcState {
        let s = lock(&self.state);
        ProcState {
            pid: s.pid,
            started: s.started,
            exited: s.exited,
        }
    }

    fn status(&self) -> Status {
        let s = lock(&self.state);
        match (s.started, s.exited) {
            (_, Some(_)) => Status::STOPPED,
            (true, None) => Status::RUNNING,
            (false, None) => Status::CREATED,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now() -> (i64, i32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos() as i32)
}

fn ts((seconds, nanos): (i64, i32)) -> MessageField<Timestamp> {
    MessageField::some(Timestamp {
        seconds,
        nanos,
        ..Default::default()
    })
}

struct Container {
    id: String,
    bundle: String,
    sandbox_name: String,
    /// The VM; `None` for a pod's sandbox (pause) container, which gets
    /// none (see [`is_pod_sandbox`]).
    sandbox: Option<Arc<capsa::Sandbox>>,
    procs: HashMap<String, Arc<Proc>>,
}

/// The task service of one shim.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    container: tokio::sync::Mutex<Option<Container>>,
    /// The warm pool's refill of this shim (Shutdown waits for it).
    refill: Mutex<Refill>,
}

impl Service {
    /// A service publishing to containerd through `publisher`.
    pub fn new(namespace: String, publisher: RemotePublisher, exit: Arc<ExitSignal>) -> Self {
        Service {
            inner: Arc::new(Inner {
                namespace,
                publisher,
                exit,
                container: tokio::sync::Mutex::new(None),
                refill: Mutex::new(Refill::Idle),
            }),
        }
    }

    /// Starts the pending pool refill, if any (once).
    fn kick_refill(&self) {
        let mut r = lock(&self.inner.refill);
        *r = match std::mem::replace(&mut *r, Refill::Idle) {
            Refill::Pending(upkeep) => Refill::Running(tokio::spawn(upkeep.run())),
            other => other,
        };
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .inner
            .publisher
            .publish(Context::default(), topic, &self.inner.namespace, event)
            .await
        {
            tracing::warn!(topic, "publishing the event: {e}");
        }
    }

    async fn proc_of(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<(Arc<Proc>, Option<Arc<capsa::Sandbox>>)> {
        let guard = self.inner.container.lock().await;
        let c = guard
            .as_ref()
            .filter(|c| c.id == id)
            .ok_or_else(|| ShimError::NotFound(format!("container {id:?} is not in this shim")))?;
        let p = c.procs.get(exec_id).cloned().ok_or_else(|| {
            ShimError::NotFound(format!(
                "process {exec_id:?} of container {id:?} does not exist"
            ))
        })?;
        Ok((p, c.sandbox.clone()))
    }

    async fn do_create(&self, req: api::CreateTaskRequest) -> Result<api::CreateTaskResponse> {
        if !req.checkpoint.is_empty() || !req.parent_checkpoint.is_empty() {
            return Err(ShimError::InvalidArgument(
                "restoring from a checkpoint is not implemented by the capsa shim; fix: create without --checkpoint".into(),
            ));
        }
        let guard = self.inner.container.lock().await;
        if guard.is_some() {
            return Err(ShimError::AlreadyExists(format!(
                "this shim already runs a container; {:?} needs its own shim",
                req.id
            )));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = Spec::read(&bundle)?;
        if is_pod_sandbox(&spec) {
            return self.create_placeholder(req, guard).await;
        }
        let hostname = spec.vm_hostname().map_err(|m| ShimError::Bundle {
            path: bundle.join("config.json").display().to_string(),
            message: m,
            fix: "give the container a valid hostname, or none",
        })?;
        let settings = crate::config::Settings::from_options(req.options.as_ref())?;
        if let Some(f) = &settings.file {
            tracing::info!(file = %f.display(), ?settings, "settings from the runtime's ConfigPath");
        }
        let (memory_mib, cpus) = spec
            .vm_size(settings.default_memory_mib, settings.default_cpus)
            .map_err(|m| ShimError::Bundle {
                path: bundle.join("config.json").display().to_string(),
                message: m,
                fix: "a capsa VM has 128 MiB to 64 GiB of memory and 1 to 64 vCPUs",
            })?;
        for m in spec.mounts.iter().filter(|m| m.is_host_bind()).take(64) {
            tracing::warn!(
                source = m.source,
                destination = m.destination,
                "a host bind mount is not passed into the VM (capsa shim v1); the container sees the image's own path"
            );
        }
        let mut process = spec.process.clone().unwrap_or_default();
        // containerd's request decides the terminal (ctr -t), as for runc.
        process.terminal = req.terminal;
        let name = sandbox_name(&self.inner.namespace, &req.id);
        let (b, mounts, n) = (bundle.clone(), req.rootfs.clone(), name.clone());
        let (rootfs, shared) = tokio::task::spawn_blocking(move || {
            crate::rootfs::prepare(&b, &mounts, &n, memory_mib)
        })
        .await
        .map_err(|e| ShimError::io("preparing the rootfs", std::io::Error::other(e)))??;
        let sandboxes = registry();
        // A record left by a shim that died before its delete ran.
        if sandboxes.get(&name).is_ok() {
            tracing::warn!(
                sandbox = name,
                "removing a leftover sandbox of the same container"
            );
            let _ = sandboxes.remove(&name, true).await;
        }
        let labels = [
            (LABEL_OWNER, OWNER.to_string()),
            (LABEL_NAMESPACE, self.inner.namespace.clone()),
            (LABEL_ID, req.id.clone()),
        ];
        let mut builder = capsa::Capsa::sandbox()
            .name(name.clone())
            .memory_mb(memory_mib)
            .cpus(cpus)
            .rootfs_spec(rootfs);
        for (k, v) in &labels {
            builder = builder.label(*k, v.clone());
        }
        let started = std::time::Instant::now();
        let Started {
            sandbox,
            name,
            how,
            pool,
        } = start_sandbox(&sandboxes, builder, &name, &labels, shared, &settings).await?;
        tracing::info!(sandbox = name, how, elapsed = ?started.elapsed(), "sandbox ready");
        if let Some(h) = &hostname {
            if let Err(e) = sandbox.set_hostname(h).await {
                if let Err(r) = sandboxes.remove(&name, true).await {
                    tracing::warn!(
                        sandbox = name,
                        "removing the sandbox after a failed hostname: {r}"
                    );
                }
                return Err(e.into());
            }
        }
        // Every VM task sweeps the pools' idle members (cheap: one registry
        // listing), so pools of images no longer used do not keep VMs forever.
        let sweep = settings.pool_max_idle;
        if pool.is_some() || sweep.is_some() {
            *lock(&self.inner.refill) = Refill::Pending(crate::pool::Upkeep {
                reg: sandboxes.clone(),
                key: pool,
                size: settings.pool_size,
                max_idle: sweep,
            });
            // Not at once: a restore now would compete with the task's own
            // start for the cores; a short task's end starts it sooner.
            let this = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(REFILL_DELAY).await;
                this.kick_refill();
            });
        }
        self.install(&req, guard, process, name, Some(Arc::new(sandbox)))
            .await
    }

    /// Records the created container (its init process not yet started)
    /// and tells containerd: the common end of a VM task and a placeholder.
    async fn install(
        &self,
        req: &api::CreateTaskRequest,
        mut guard: tokio::sync::MutexGuard<'_, Option<Container>>,
        process: Process,
        sandbox_name: String,
        sandbox: Option<Arc<capsa::Sandbox>>,
    ) -> Result<api::CreateTaskResponse> {
        let init = Proc::new(
            String::new(),
            process,
            [req.stdin.clone(), req.stdout.clone(), req.stderr.clone()],
        );
        let mut procs = HashMap::new();
        procs.insert(String::new(), init);
        *guard = Some(Container {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            sandbox_name,
            sandbox,
            procs,
        });
        drop(guard);
        self.publish(
            containerd_shim::protos::topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid: 0,
                ..Default::default()
            }),
        )
        .await;
        Ok(api::CreateTaskResponse {
            pid: 0,
            ..Default::default()
        })
    }

    /// Creates the pod's sandbox (pause) container without a VM: nothing of
    /// it runs in a guest (each container of the pod has its own VM), so a
    /// VM for `pause` would only cost memory and a boot.
    async fn create_placeholder(
        &self,
        req: api::CreateTaskRequest,
        guard: tokio::sync::MutexGuard<'_, Option<Container>>,
    ) -> Result<api::CreateTaskResponse> {
        tracing::info!(
            id = req.id,
            "a pod's sandbox container: no VM (placeholder task)"
        );
        self.install(&req, guard, Process::default(), String::new(), None)
            .await
    }

    /// "Runs" the placeholder: its pid is the shim's own (the process that
    /// stands for it); it ends on SIGKILL, SIGTERM, SIGINT, SIGHUP or
    /// SIGQUIT, as `pause` does, with 128 + the signal.
    fn start_placeholder(&self, container_id: String, p: Arc<Proc>) -> u32 {
        let pid = std::process::id();
        let (tx, mut rx) = mpsc::channel(16);
        *lock(&p.ctl) = Some(tx);
        {
            let mut st = lock(&p.state);
            st.pid = pid;
            st.started = true;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let sig = loop {
                match rx.recv().await {
                    Some(Ctl::Signal(s)) if matches!(s, 1 | 2 | 3 | 9 | 15) => break s,
                    Some(_) => {}
                    None => break 9,
                }
            };
            this.exited(&container_id, &p, 128 + sig as u32).await;
        });
        pid
    }

    async fn do_start(&self, req: api::StartRequest) -> Result<api::StartResponse> {
        let (p, sandbox) = self.proc_of(&req.id, &req.exec_id).await?;
        {
            let st = lock(&p.state);
            if st.started || st.exited.is_some() {
                return Err(ShimError::FailedPrecondition(format!(
                    "process {:?} was already started",
                    req.exec_id
                )));
            }
        }
        let pid = match sandbox {
            Some(sb) => self.spawn(req.id.clone(), p.clone(), sb).await?,
            None if req.exec_id.is_empty() => self.start_placeholder(req.id.clone(), p.clone()),
            None => {
                return Err(ShimError::FailedPrecondition(format!(
                    "{:?} is a pod's sandbox container, which has no VM in the capsa shim; fix: exec into one of the pod's containers",
                    req.id
                )))
            }
        };
        if req.exec_id.is_empty() {
            self.publish(
                containerd_shim::protos::topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
        } else {
            self.publish(
                containerd_shim::protos::topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    /// Starts `p` in the sandbox, wires its stdio to containerd's FIFOs and
    /// watches it until it ends (then publishes `/tasks/exit`).
    async fn spawn(
        &self,
        container_id: String,
        p: Arc<Proc>,
        sandbox: Arc<capsa::Sandbox>,
    ) -> Result<u32> {
        let mut cmd = p.process.command();
        if !p.stdin.is_empty() {
            cmd = cmd.stdin_piped();
        }
        let mut child = sandbox.spawn(&cmd).await?;
        let pid = child.pid();
        let mut copies = Vec::new();
        if let Some(stdin) = child.stdin() {
            if !p.stdin.is_empty() {
                let fifo = open_reader(&p.stdin)?;
                tokio::spawn(copy_stdin(fifo, stdin, p.close_stdin.clone()));
            }
        }
        for (out, path) in [(child.stdout(), &p.stdout), (child.stderr(), &p.stderr)] {
            if let Some(out) = out {
                let sink = if path.is_empty() {
                    None
                } else {
                    Some(open_writer(path)?)
                };
                copies.push(tokio::spawn(copy_out(out, sink)));
            }
        }
        let (tx, mut rx) = mpsc::channel(16);
        *lock(&p.ctl) = Some(tx);
        {
            let mut st = lock(&p.state);
            st.pid = pid;
            st.started = true;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let status = loop {
                tokio::select! {
                    st = child.wait() => break st,
                    c = rx.recv() => match c {
                        Some(Ctl::Signal(s)) => { let _ = child.signal(s).await; }
                        Some(Ctl::Resize(r, c)) => { let _ = child.resize(r, c).await; }
                        None => {}
                    }
                }
            };
            let code = match status {
                Ok(s) => match (s.code, s.signal) {
                    (Some(c), _) => c as u32 & 0xff,
                    (None, Some(sig)) => 128 + sig as u32,
                    _ => LOST_EXIT,
                },
                Err(e) => {
                    tracing::warn!(exec = p.exec_id, "lost the process: {e}");
                    LOST_EXIT
                }
            };
            // Output first, then the exit: `ctr run` prints everything before it returns.
            for c in copies {
                let _ = tokio::time::timeout(DRAIN_TIMEOUT, c).await;
            }
            this.exited(&container_id, &p, code).await;
        });
        Ok(pid)
    }

    async fn exited(&self, container_id: &str, p: &Arc<Proc>, status: u32) {
        let ex = Exited { status, at: now() };
        let pid = {
            let mut st = lock(&p.state);
            if st.exited.is_some() {
                return;
            }
            st.exited = Some(ex);
            st.pid
        };
        *lock(&p.ctl) = None;
        tracing::info!(exec = p.exec_id, status, "process exited");
        if p.exec_id.is_empty() {
            self.kick_refill();
        }
        // As with runc, the container's execs end with its init.
        if p.exec_id.is_empty() {
            let others: Vec<Arc<Proc>> = self
                .inner
                .container
                .lock()
                .await
                .as_ref()
                .map(|c| {
                    c.procs
                        .values()
                        .filter(|q| !q.exec_id.is_empty())
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            for q in others {
                let tx = lock(&q.ctl).clone();
                if let Some(tx) = tx {
                    let _ = tx.send(Ctl::Signal(9)).await;
                }
            }
        }
        self.publish(
            containerd_shim::protos::topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: container_id.to_string(),
                id: if p.exec_id.is_empty() {
                    container_id.to_string()
                } else {
                    p.exec_id.clone()
                },
                pid,
                exit_status: status,
                exited_at: ts(ex.at),
                ..Default::default()
            }),
        )
        .await;
        p.exit_tx.send_replace(Some(ex));
    }

    async fn do_delete(&self, req: api::DeleteRequest) -> Result<api::DeleteResponse> {
        let (p, _) = self.proc_of(&req.id, &req.exec_id).await?;
        let st = p.snapshot();
        if st.started && st.exited.is_none() {
            return Err(ShimError::FailedPrecondition(format!(
                "process {:?} of {:?} is still running; fix: kill it first",
                req.exec_id, req.id
            )));
        }
        let ex = st.exited.unwrap_or(Exited {
            status: 0,
            at: now(),
        });
        let resp = api::DeleteResponse {
            pid: st.pid,
            exit_status: ex.status,
            exited_at: ts(ex.at),
            ..Default::default()
        };
        let mut guard = self.inner.container.lock().await;
        if !req.exec_id.is_empty() {
            if let Some(c) = guard.as_mut() {
                c.procs.remove(&req.exec_id);
            }
            return Ok(resp);
        }
        let Some(c) = guard.take() else {
            return Ok(resp);
        };
        drop(guard);
        cleanup(&c.sandbox_name, &PathBuf::from(&c.bundle)).await;
        self.publish(
            containerd_shim::protos::topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: c.id.clone(),
                id: c.id.clone(),
                pid: st.pid,
                exit_status: ex.status,
                exited_at: ts(ex.at),
                ..Default::default()
            }),
        )
        .await;
        Ok(resp)
    }

    async fn do_kill(&self, req: api::KillRequest) -> Result<()> {
        let sig = i32::try_from(req.signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| {
                ShimError::InvalidArgument(format!(
                    "signal {} is out of range; fix: give 1 to 64",
                    req.signal
                ))
            })?;
        let (p, _) = self.proc_of(&req.id, &req.exec_id).await?;
        let targets = if req.all && req.exec_id.is_empty() {
            let guard = self.inner.container.lock().await;
            guard
                .as_ref()
                .map(|c| c.procs.values().cloned().collect())
                .unwrap_or_default()
        } else {
            vec![p.clone()]
        };
        let st = p.snapshot();
        if st.exited.is_some() && !req.all {
            return Err(ShimError::NotFound(format!(
                "process {:?} already finished",
                req.exec_id
            )));
        }
        if !st.started && st.exited.is_none() {
            // Never started: it ends here, as a created runc container does.
            self.exited(&req.id, &p, 128 + sig as u32).await;
            return Ok(());
        }
        for q in targets {
            let tx = lock(&q.ctl).clone();
            if let Some(tx) = tx {
                let _ = tx.send(Ctl::Signal(sig)).await;
            }
        }
        Ok(())
    }

    async fn do_exec(&self, req: api::ExecProcessRequest) -> Result<()> {
        let spec = req.spec.as_ref().map(|a| a.value.as_slice()).unwrap_or(&[]);
        let mut process = Process::parse(spec).map_err(|m| {
            ShimError::InvalidArgument(format!(
                "exec {:?}: {m}; fix: give an OCI process spec",
                req.exec_id
            ))
        })?;
        process.terminal = req.terminal;
        if req.exec_id.is_empty() || req.exec_id.len() > 256 {
            return Err(ShimError::InvalidArgument(
                "an exec id must have 1 to 256 bytes".into(),
            ));
        }
        {
            let mut guard = self.inner.container.lock().await;
            let c = guard.as_mut().filter(|c| c.id == req.id).ok_or_else(|| {
                ShimError::NotFound(format!("container {:?} is not in this shim", req.id))
            })?;
            if c.procs.contains_key(&req.exec_id) {
                return Err(ShimError::AlreadyExists(format!(
                    "exec {:?} already exists",
                    req.exec_id
                )));
            }
            if c.procs.len() > MAX_EXECS {
                return Err(ShimError::FailedPrecondition(format!(
                    "more than {MAX_EXECS} execs; fix: delete finished execs"
                )));
            }
            let init_done = c
                .procs
                .get("")
                .is_some_and(|p| p.status() == Status::STOPPED);
            if init_done {
                return Err(ShimError::FailedPrecondition(format!(
                    "container {:?} has stopped; fix: start a new one",
                    req.id
                )));
            }
            let p = Proc::new(
                req.exec_id.clone(),
                process,
                [req.stdin.clone(), req.stdout.clone(), req.stderr.clone()],
            );
            c.procs.insert(req.exec_id.clone(), p);
        }
        self.publish(
            containerd_shim::protos::topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(())
    }
}

/// Whether `spec` is a Kubernetes pod's sandbox (pause) container, as
/// containerd's CRI plugin (and CRI-O) annotate it.
pub fn is_pod_sandbox(spec: &Spec) -> bool {
    [
        "io.kubernetes.cri.container-type",
        "io.kubernetes.cri-o.ContainerType",
    ]
    .iter()
    .any(|k| spec.annotations.get(*k).map(String::as_str) == Some("sandbox"))
}

/// How a task's sandbox started, for the log and the pool.
struct Started {
    sandbox: capsa::Sandbox,
    /// Its registry name (a pool member keeps its own).
    name: String,
    how: &'static str,
    /// The pool to refill afterwards, when one is configured.
    pool: Option<crate::pool::Key>,
}

/// Starts the task's sandbox: a ready member of the warm pool when one is
/// configured and has one ([`crate::pool`]), else restored from the base
/// snapshot of its spec (one per root filesystem image and VM size, keyed as
/// capsa keys its base snapshots, under the shim's cache) when there is one,
/// else booted cold and, the first time, saved as that base right after its
/// agent answered (before any container process ran).
async fn start_sandbox(
    sandboxes: &capsa::Sandboxes,
    builder: capsa::SandboxBuilder,
    name: &str,
    labels: &[(&str, String)],
    shared_image: bool,
    settings: &crate::config::Settings,
) -> Result<Started> {
    let done = |sandbox, how, pool| Started {
        sandbox,
        name: name.to_string(),
        how,
        pool,
    };
    // A per-container image would make a base snapshot nobody restores.
    let fast = shared_image && settings.fast_start;
    // capsa's key for this spec, kept beside the shim's root filesystem
    // images (so they share one lifetime and one cache directory).
    let base = if fast {
        capsa::base_snapshot::dir_for(&builder)
            .await
            .ok()
            .flatten()
            .and_then(|d| {
                d.file_name()
                    .map(|n| crate::rootfs::cache_dir().join("base").join(n))
            })
    } else {
        None
    };
    let Some(base) = base else {
        return Ok(done(sandboxes.create(builder).await?, "cold boot", None));
    };
    let pool = (settings.pool_size > 0)
        .then(|| crate::pool::Key::of(&base))
        .flatten();
    if base.join(capsa_core::SNAPSHOT_META_FILE).is_file() {
        if let Some(key) = &pool {
            let label = |k: &str| {
                labels
                    .iter()
                    .find(|(l, _)| *l == k)
                    .map(|(_, v)| v.as_str())
                    .unwrap_or_default()
            };
            let claimed =
                crate::pool::claim(sandboxes, key, label(LABEL_NAMESPACE), label(LABEL_ID)).await;
            if let Some((member, sb)) = claimed {
                return Ok(Started {
                    sandbox: sb,
                    name: member,
                    how: "pooled",
                    pool,
                });
            }
        }
        let mut r = capsa::Capsa::restore(&base).name(name);
        for (k, v) in labels {
            r = r.label(*k, v.clone());
        }
        match sandboxes.create_restored(r).await {
            Ok(sb) => return Ok(done(sb, "restored", pool)),
            Err(e) => {
                tracing::warn!(base = %base.display(), "the base snapshot did not restore ({e}); booting cold");
                let _ = sandboxes.remove(name, true).await;
            }
        }
        return Ok(done(sandboxes.create(builder).await?, "cold boot", None));
    }
    let sb = sandboxes.create(builder).await?;
    if let Err(e) = save_base(&sb, &base).await {
        tracing::warn!(base = %base.display(), "could not save a base snapshot: {e}");
        return Ok(done(sb, "cold boot", None));
    }
    Ok(done(sb, "cold boot (base snapshot saved)", pool))
}

/// Snapshots `sb` into a temp sibling of `dir`, then renames it into place
/// (a concurrent shim never sees half a snapshot; the first one wins).
async fn save_base(sb: &capsa::Sandbox, dir: &std::path::Path) -> Result<()> {
    let parent = dir.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(parent)
        .map_err(|e| ShimError::io(format!("creating {}", parent.display()), e))?;
    let tmp = parent.join(format!(".tmp-base-shim-{}", std::process::id()));
    sb.vm().snapshot(&tmp).await?;
    if std::fs::rename(&tmp, dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(())
}

/// Kills and removes the sandbox `name`, unmounts `<bundle>/rootfs` and
/// removes a per-container image: what both Delete and the `delete`
/// subcommand (after a dead shim) do. Best effort, logged.
pub async fn cleanup(name: &str, bundle: &std::path::Path) {
    let sandboxes = registry();
    if sandboxes.get(name).is_ok() {
        if let Err(e) = sandboxes.remove(name, true).await {
            tracing::warn!(sandbox = name, "removing the sandbox: {e}");
        }
    }
    crate::rootfs::unmount(&bundle.join("rootfs"));
    let private = crate::rootfs::private_image(name);
    match std::fs::remove_file(&private) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %private.display(), "removing the image: {e}"),
    }
}

/// What the `delete` subcommand does after a dead shim: [`cleanup`] of the
/// container's own sandbox name, and of any sandbox labelled as this
/// container's (a claimed pool member keeps its member name).
pub async fn cleanup_container(namespace: &str, id: &str, bundle: &std::path::Path) {
    cleanup(&sandbox_name(namespace, id), bundle).await;
    let labelled: Vec<String> = registry()
        .list()
        .unwrap_or_default()
        .into_iter()
        .filter(|r| {
            capsa::Sandboxes::label(r, LABEL_OWNER) == Some(OWNER)
                && capsa::Sandboxes::label(r, LABEL_NAMESPACE) == Some(namespace)
                && capsa::Sandboxes::label(r, LABEL_ID) == Some(id)
        })
        .map(|r| r.name)
        .collect();
    for name in labelled {
        tracing::info!(sandbox = name, "removing the dead shim's pool member");
        cleanup(&name, bundle).await;
    }
}

/// The reading end of a containerd FIFO, opened read-write: never blocks on
/// a missing peer, and our own writer end means stdin sees no EOF until
/// CloseIO says so.
fn open_reader(path: &str) -> Result<pipe::Receiver> {
    pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(path)
        .map_err(|e| ShimError::io(format!("opening the FIFO {path}"), e))
}

/// The writing end of a containerd FIFO (read-write too, so a reader that
/// is not there yet or has gone never makes the open fail).
fn open_writer(path: &str) -> Result<pipe::Sender> {
    pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(path)
        .map_err(|e| ShimError::io(format!("opening the FIFO {path}"), e))
}

async fn copy_stdin(mut fifo: pipe::Receiver, mut stdin: capsa::ExecStdin, close: Arc<Notify>) {
    let mut buf = vec![0u8; 32 << 10];
    loop {
        tokio::select! {
            n = fifo.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => if stdin.write_all(&buf[..n]).await.is_err() { return },
            },
            () = close.notified() => break,
        }
    }
    // CloseIO after containerd's writer is done: take what it left in the pipe.
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(20), fifo.read(&mut buf)).await
    {
        if n == 0 || stdin.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = stdin.shutdown().await;
}

async fn copy_out(mut out: capsa::ExecOutput, mut sink: Option<pipe::Sender>) {
    let mut buf = vec![0u8; 32 << 10];
    loop {
        match out.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Some(s) = sink.as_mut() {
                    if s.write_all(&buf[..n]).await.is_err() {
                        sink = None;
                    }
                }
            }
        }
    }
    if let Some(mut s) = sink {
        let _ = s.flush().await;
    }
}

#[async_trait]
impl Task for Service {
    async fn state(
        &self,
        _: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let guard = self.inner.container.lock().await;
        let c = guard.as_ref().filter(|c| c.id == req.id).ok_or_else(|| {
            ShimError::NotFound(format!("container {:?} is not in this shim", req.id))
        })?;
        let p = c.procs.get(&req.exec_id).cloned().ok_or_else(|| {
            ShimError::NotFound(format!("process {:?} does not exist", req.exec_id))
        })?;
        let st = p.snapshot();
        Ok(api::StateResponse {
            id: if req.exec_id.is_empty() {
                c.id.clone()
            } else {
                req.exec_id.clone()
            },
            bundle: c.bundle.clone(),
            pid: st.pid,
            status: p.status().into(),
            stdin: p.stdin.clone(),
            stdout: p.stdout.clone(),
            stderr: p.stderr.clone(),
            terminal: p.process.terminal,
            exit_status: st.exited.map_or(0, |e| e.status),
            exited_at: st.exited.map_or(MessageField::none(), |e| ts(e.at)),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn create(
        &self,
        _: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        tracing::info!(id = req.id, bundle = req.bundle, "create");
        Ok(self.do_create(req).await?)
    }

    async fn start(
        &self,
        _: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        tracing::info!(id = req.id, exec = req.exec_id, "start");
        Ok(self.do_start(req).await?)
    }

    async fn delete(
        &self,
        _: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        tracing::info!(id = req.id, exec = req.exec_id, "delete");
        Ok(self.do_delete(req).await?)
    }

    async fn pids(
        &self,
        _: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let guard = self.inner.container.lock().await;
        let c = guard.as_ref().filter(|c| c.id == req.id).ok_or_else(|| {
            ShimError::NotFound(format!("container {:?} is not in this shim", req.id))
        })?;
        let processes = c
            .procs
            .values()
            .filter(|p| p.status() == Status::RUNNING)
            .map(|p| ProcessInfo {
                pid: p.snapshot().pid,
                ..Default::default()
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn pause(&self, _: &TtrpcContext, _: api::PauseRequest) -> TtrpcResult<api::Empty> {
        Err(unimplemented("Pause"))
    }

    async fn resume(&self, _: &TtrpcContext, _: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        Err(unimplemented("Resume"))
    }

    async fn checkpoint(
        &self,
        _: &TtrpcContext,
        _: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(unimplemented("Checkpoint"))
    }

    async fn kill(&self, _: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        tracing::info!(
            id = req.id,
            exec = req.exec_id,
            signal = req.signal,
            all = req.all,
            "kill"
        );
        self.do_kill(req).await?;
        Ok(api::Empty::default())
    }

    async fn exec(
        &self,
        _: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        tracing::info!(id = req.id, exec = req.exec_id, "exec");
        self.do_exec(req).await?;
        Ok(api::Empty::default())
    }

    async fn resize_pty(
        &self,
        _: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let (p, _) = self.proc_of(&req.id, &req.exec_id).await?;
        let tx = lock(&p.ctl).clone();
        if let Some(tx) = tx {
            let _ = tx
                .send(Ctl::Resize(clamp16(req.height), clamp16(req.width)))
                .await;
        }
        Ok(api::Empty::default())
    }

    async fn close_io(
        &self,
        _: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let (p, _) = self.proc_of(&req.id, &req.exec_id).await?;
        if req.stdin {
            // notify_one keeps a permit if the copier is not waiting yet.
            p.close_stdin.notify_one();
        }
        Ok(api::Empty::default())
    }

    async fn update(&self, _: &TtrpcContext, _: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        Err(unimplemented("Update"))
    }

    async fn wait(
        &self,
        _: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let (p, _) = self.proc_of(&req.id, &req.exec_id).await?;
        let mut rx = p.exit_tx.subscribe();
        let ex = loop {
            if let Some(ex) = *rx.borrow_and_update() {
                break ex;
            }
            if rx.changed().await.is_err() {
                break Exited {
                    status: LOST_EXIT,
                    at: now(),
                };
            }
        };
        Ok(api::WaitResponse {
            exit_status: ex.status,
            exited_at: ts(ex.at),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _: &TtrpcContext,
        _: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        Err(unimplemented("Stats"))
    }

    async fn connect(
        &self,
        _: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = match self.proc_of(&req.id, "").await {
            Ok((p, _)) => p.snapshot().pid,
            Err(_) => 0,
        };
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _: &TtrpcContext, _: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        let empty = self.inner.container.lock().await.is_none();
        if empty {
            tracing::info!("shutdown");
            // A refill cut short would leave a half-restored member: the
            // shim exits once it is done (containerd does not wait for that).
            self.kick_refill();
            let refill = match std::mem::replace(&mut *lock(&self.inner.refill), Refill::Idle) {
                Refill::Running(h) => Some(h),
                _ => None,
            };
            let exit = self.inner.exit.clone();
            tokio::spawn(async move {
                if let Some(r) = refill {
                    match tokio::time::timeout(crate::pool::REFILL_WAIT, r).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::warn!("the pool refill failed: {e}"),
                        Err(_) => tracing::warn!("the pool refill did not finish in time; exiting"),
                    }
                }
                exit.signal();
            });
        }
        Ok(api::Empty::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_sandbox_containers_are_recognised() {
        let spec = |a: &str| serde_json::from_str::<Spec>(a).unwrap();
        assert!(is_pod_sandbox(&spec(
            r#"{"annotations":{"io.kubernetes.cri.container-type":"sandbox"}}"#
        )));
        assert!(is_pod_sandbox(&spec(
            r#"{"annotations":{"io.kubernetes.cri-o.ContainerType":"sandbox"}}"#
        )));
        assert!(!is_pod_sandbox(&spec(
            r#"{"annotations":{"io.kubernetes.cri.container-type":"container"}}"#
        )));
        assert!(!is_pod_sandbox(&spec("{}")));
    }
}
