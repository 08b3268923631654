//! Snapshots of running sandboxes and VMs, and restoring them.
//!
//! ```no_run
//! # async fn demo() -> capsa::Result<()> {
//! use capsa::{Capsa, Command};
//! let sb = Capsa::sandbox().memory_mb(256).build().await?;
//! sb.write_file("/work/state", b"warm").await?;
//! let snap = sb.snapshot("/tmp/snap").await?;          // sb keeps running
//! let clone = Capsa::restore(snap.path()).build().await?; // ~0.2 s instead of a boot
//! let out = clone.exec(&Command::new("cat").arg("/work/state")).await?;
//! # Ok(()) }
//! ```
//!
//! A restored sandbox gets a fresh identity before it is handed out (new
//! hostname, machine id, RNG reseeded with host randomness, wall clock set),
//! so clones of one snapshot are not twins; see [`RestoreBuilder`].

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capsa_core::{Hypervisor, SnapshotMeta, StartOptions, VmSpec};
use capsa_proto::IdentityRequest;
use serde::{Deserialize, Serialize};

use crate::sandbox::{agent_client, SandboxExtra, DEFAULT_OP_TIMEOUT, DEFAULT_READY_TIMEOUT};
use crate::{Capsa, Error, Result, Sandbox, SandboxBuilder, Strategy, VmConsole, VmHandle};

/// The library's own file in a snapshot directory: host-side sandbox
/// settings that are not part of the VM (environment, working directory).
const SANDBOX_FILE: &str = "sandbox.json";
/// Largest [`SANDBOX_FILE`] read.
const MAX_SANDBOX_FILE: u64 = 4 << 20;
/// Bytes of host randomness sent to each restored guest.
const ENTROPY_BYTES: usize = 64;

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A snapshot directory on disk.
#[derive(Debug, Clone)]
pub struct Snapshot {
    dir: PathBuf,
    meta: SnapshotMeta,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct SandboxSettings {
    env: Vec<(String, String)>,
    workdir: Option<String>,
}

impl Snapshot {
    /// Opens the snapshot in `dir` (reads its metadata; checks nothing else).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let meta = SnapshotMeta::read(&dir)?;
        Ok(Self { dir, meta })
    }

    /// The snapshot's directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Its metadata (capsa version, spec, kernel, disks).
    pub fn meta(&self) -> &SnapshotMeta {
        &self.meta
    }

    /// Bytes the snapshot takes on disk (guest RAM is stored sparse, so this
    /// is usually well below the guest's memory size).
    pub fn size_on_disk(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.blocks() * 512)
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Checks that this host can restore it (capsa version, kernel,
    /// initramfs, read-only disks, files present).
    pub fn check(&self) -> Result<()> {
        Ok(self.meta.check_host(&self.dir)?)
    }
}

/// Makes `path` an empty directory (creating it), refusing a non-empty one.
fn prepare_dir(path: &Path) -> Result<()> {
    match std::fs::read_dir(path) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return Err(Error::InvalidArgument(format!(
                    "{} is not empty; pass a new or empty directory for the snapshot",
                    path.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e)),
        Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
    }
}

impl VmHandle {
    /// Saves the VM (memory, devices, disks, from one instant) into `path`,
    /// a new or empty directory; the VM goes on running afterwards.
    ///
    /// Open vsock streams to the VM are reset (the device is detached around
    /// the save); guest processes keep running.
    pub async fn snapshot(&self, path: impl AsRef<Path>) -> Result<Snapshot> {
        let dir = path.as_ref();
        self.check_no_shares().await?;
        prepare_dir(dir)?;
        let meta = self.instance().snapshot(dir).await?;
        Ok(Snapshot {
            dir: dir.to_path_buf(),
            meta,
        })
    }
}

impl Sandbox {
    /// Saves the sandbox into `path` (see [`VmHandle::snapshot`]), including
    /// its environment and working directory. The sandbox keeps running;
    /// commands streaming at that moment lose their connection (and, as
    /// always when their connection closes, are killed).
    pub async fn snapshot(&self, path: impl AsRef<Path>) -> Result<Snapshot> {
        let snap = self.vm.snapshot(path).await?;
        let settings = SandboxSettings {
            env: self.env.as_ref().clone(),
            workdir: self.workdir.clone(),
        };
        let f = snap.dir.join(SANDBOX_FILE);
        let text = serde_json::to_vec(&settings)
            .map_err(|e| Error::io("encoding sandbox settings", std::io::Error::other(e)))?;
        std::fs::write(&f, text).map_err(|e| Error::io(format!("writing {}", f.display()), e))?;
        Ok(snap)
    }
}

impl Capsa {
    /// Starts describing a sandbox restored from the snapshot in `path`.
    pub fn restore(path: impl Into<PathBuf>) -> RestoreBuilder {
        RestoreBuilder {
            dir: path.into(),
            name: None,
            hostname: None,
            fresh_identity: true,
            expect: None,
            env: Vec::new(),
            workdir: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            op_timeout: DEFAULT_OP_TIMEOUT,
            backend: None,
            strategy: Strategy::InProcess,
            state_root: None,
            keep_running: false,
            labels: Default::default(),
        }
    }
}

/// Describes a restore; [`RestoreBuilder::build`] performs it.
#[derive(Clone)]
pub struct RestoreBuilder {
    dir: PathBuf,
    name: Option<String>,
    hostname: Option<String>,
    fresh_identity: bool,
    expect: Option<VmSpec>,
    env: Vec<(String, String)>,
    workdir: Option<String>,
    ready_timeout: Duration,
    op_timeout: Duration,
    backend: Option<Arc<dyn Hypervisor>>,
    strategy: Strategy,
    state_root: Option<PathBuf>,
    keep_running: bool,
    labels: std::collections::BTreeMap<String, String>,
}

impl std::fmt::Debug for RestoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreBuilder")
            .field("dir", &self.dir)
            .field("name", &self.name)
            .field("strategy", &self.strategy)
            .field("keep_running", &self.keep_running)
            .finish()
    }
}

impl RestoreBuilder {
    /// Monitor only: a label recorded in the sandbox's `sandbox.json` from
    /// the moment its directory exists (see [`crate::Sandboxes::label`]), so
    /// a manager that crashes mid-restore can still tell its sandboxes apart.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Names the restored VM (default: generated).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The guest's new hostname (default: `capsa-` and 8 random hex digits).
    pub fn hostname(mut self, h: impl Into<String>) -> Self {
        self.hostname = Some(h.into());
        self
    }

    /// Keeps the snapshot's identity (hostname, machine id, RNG state): the
    /// clone is a twin of the snapshotted guest. Only for debugging.
    pub fn keep_identity(mut self) -> Self {
        self.fresh_identity = false;
        self
    }

    /// Refuses the snapshot unless it was taken from a VM described by
    /// `spec` (boot files, command line, vCPUs, memory, disks).
    pub fn expect_spec(mut self, spec: VmSpec) -> Self {
        self.expect = Some(spec);
        self
    }

    /// An environment variable for every command, over the snapshot's.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Working directory for commands that do not set their own.
    pub fn workdir(mut self, dir: impl Into<String>) -> Self {
        self.workdir = Some(dir.into());
        self
    }

    /// How long the agent may take to answer after the restore.
    pub fn ready_timeout(mut self, t: Duration) -> Self {
        self.ready_timeout = t;
        self
    }

    /// Deadline for file operations and command starts (see [`SandboxBuilder::op_timeout`]).
    pub fn op_timeout(mut self, t: Duration) -> Self {
        self.op_timeout = t;
        self
    }

    /// Uses a specific backend instead of QEMU from `PATH`.
    pub fn backend(mut self, backend: Arc<dyn Hypervisor>) -> Self {
        self.backend = Some(backend);
        self
    }

    pub(crate) fn ready_timeout_value(&self) -> Duration {
        self.ready_timeout
    }

    /// Chooses where the restored VM runs (default [`Strategy::InProcess`]);
    /// under [`Strategy::Monitor`] a `capsa-vmm` process restores and owns it.
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// The state root for monitor-run sandboxes (default [`crate::StateRoot::default_root`]).
    pub fn state_root(mut self, path: impl Into<PathBuf>) -> Self {
        self.state_root = Some(path.into());
        self
    }

    /// Keeps the restored sandbox running after this process lets go of it,
    /// as [`SandboxBuilder::keep_running`] does: implies [`Strategy::Monitor`]
    /// and needs a [`RestoreBuilder::name`].
    pub fn keep_running(mut self, keep: bool) -> Self {
        self.keep_running = keep;
        if keep {
            self.strategy = Strategy::Monitor;
        }
        self
    }

    /// Restores the sandbox: checks the snapshot against this host, starts
    /// the VM from it (in this process or under a monitor), waits for the
    /// agent and gives the guest a fresh identity.
    pub async fn build(self) -> Result<Sandbox> {
        crate::sandbox::check_keep_running_name(self.keep_running, self.name.as_deref())?;
        let meta = SnapshotMeta::read(&self.dir)?;
        let dir = self.dir.clone();
        let m = meta.clone();
        tokio::task::spawn_blocking(move || m.check_host(&dir))
            .await
            .map_err(|e| Error::io("checking the snapshot", std::io::Error::other(e)))??;
        if let Some(want) = &self.expect {
            meta.check_spec(&self.dir, want)?;
        }
        if meta.spec.vsock.is_none() {
            return Err(Error::InvalidArgument(format!(
                "{} is a snapshot of a plain VM (no vsock device), not of a sandbox",
                self.dir.display()
            )));
        }
        let settings = read_settings(&self.dir);
        let mut env = settings.env;
        env.extend(self.env.iter().cloned());
        let workdir = self.workdir.clone().or(settings.workdir);
        let start = tokio::time::Instant::now();
        let vm = match self.strategy {
            Strategy::InProcess => self.start_in_process(&meta).await?,
            Strategy::Monitor => self.start_monitor(&meta, &env, &workdir).await?,
        };
        let vm_up = start.elapsed();
        let identity = match self.fresh_identity {
            true => Some(fresh_identity(self.hostname.clone())?),
            false => None,
        };
        let within = self.ready_timeout.saturating_sub(start.elapsed());
        let sb = match finish_restore(vm, identity, within, env, workdir, self.op_timeout).await {
            Ok(sb) => sb,
            Err((vm, e)) => {
                // A half-restored sandbox is of no use: do not leave it registered.
                let _ = vm.kill().await;
                if let Some(d) = vm.state_dir() {
                    let _ = std::fs::remove_dir_all(d);
                }
                return Err(e);
            }
        };
        tracing::debug!(?vm_up, total = ?start.elapsed(), "sandbox restored");
        Ok(sb)
    }

    fn name_or_generated(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            format!(
                "restored-{}-{}",
                std::process::id(),
                NEXT_ID.fetch_add(1, Ordering::Relaxed)
            )
        })
    }

    /// The in-process strategy: this process runs QEMU (and the vsock device).
    async fn start_in_process(&self, meta: &SnapshotMeta) -> Result<VmHandle> {
        let backend: Arc<dyn Hypervisor> = match &self.backend {
            Some(b) => b.clone(),
            None => Arc::new(capsa_qemu::QemuBackend::new().map_err(capsa_core::Error::from)?),
        };
        let name = self.name_or_generated();
        let run_dir = crate::builder::make_run_dir()?;
        let restored = backend
            .restore(
                &self.dir,
                meta,
                StartOptions {
                    run_dir: run_dir.path().to_path_buf(),
                    name: name.clone(),
                },
            )
            .await?;
        let mut instance = restored.instance;
        let console = match instance.take_console() {
            Some(streams) => Some(
                VmConsole::start(
                    streams.output,
                    streams.input,
                    Some(run_dir.path().join("console.log")),
                )
                .map_err(|e| Error::io("opening the console log", e))?,
            ),
            None => None,
        };
        Ok(VmHandle::new(
            name,
            restored.spec,
            crate::handle::Instance::InProcess(instance),
            console,
            crate::handle::RunDir::Temp(run_dir),
        ))
    }

    /// The monitor strategy: a `capsa-vmm` process restores the VM into a
    /// sandbox directory under the state root (`restore.json`) and owns it.
    async fn start_monitor(
        &self,
        meta: &SnapshotMeta,
        env: &[(String, String)],
        workdir: &Option<String>,
    ) -> Result<VmHandle> {
        if self.backend.is_some() {
            return Err(Error::InvalidArgument(
                "a custom backend runs in this process; it cannot be combined with Strategy::Monitor"
                    .into(),
            ));
        }
        let name = self.name_or_generated();
        if let Err(e) = capsa_vmm::validate_name(&name) {
            return Err(capsa_core::Error::invalid(
                "name",
                format!("{name:?} is not a valid sandbox name"),
                e.to_string(),
            )
            .into());
        }
        // The monitor runs QEMU: refuse what it cannot do now, with the typed error.
        let qemu = capsa_qemu::QemuBackend::new().map_err(capsa_core::Error::from)?;
        qemu.capabilities().check(&meta.spec)?;
        let root = self
            .state_root
            .clone()
            .map(capsa_vmm::StateRoot::new)
            .unwrap_or_else(capsa_vmm::StateRoot::default_root);
        let extra = SandboxExtra {
            kind: "sandbox".into(),
            env: env.to_vec(),
            workdir: workdir.clone(),
            op_timeout_ms: Some(self.op_timeout.as_millis().min(u128::from(u64::MAX)) as u64),
            labels: self.labels.clone(),
        };
        let handle = capsa_vmm::spawn_restored(
            &self.dir,
            meta.spec.clone(),
            capsa_vmm::SpawnOptions {
                state_root: root,
                name: name.clone(),
                keep_alive: self.keep_running,
                extra: serde_json::to_value(&extra).ok(),
                monitor_binary: None,
            },
        )
        .await?;
        if let Err(e) = handle
            .wait_started(crate::builder::MONITOR_START_TIMEOUT)
            .await
        {
            use capsa_core::VmInstance;
            let _ = handle.kill().await;
            let dir = handle.dir().to_path_buf();
            drop(handle);
            // A failed restore leaves nothing worth keeping under the name.
            let _ = std::fs::remove_dir_all(dir);
            return Err(e.into());
        }
        // The monitor recorded the restored spec (disks on its own overlays).
        let spec = handle.info().spec;
        crate::builder::attach_monitor(name, spec, handle)
    }
}

/// The part of a restore both strategies share: wait for the agent of the
/// restored VM while handing it its fresh identity, then wrap the sandbox.
/// On failure the VM is handed back so the caller can dispose of it.
async fn finish_restore(
    vm: VmHandle,
    identity: Option<IdentityRequest>,
    within: Duration,
    env: Vec<(String, String)>,
    workdir: Option<String>,
    op_timeout: Duration,
) -> std::result::Result<Sandbox, (VmHandle, Error)> {
    let socket = match vm.vsock_socket() {
        Ok(s) => s,
        Err(e) => return Err((vm, e)),
    };
    let client = agent_client(socket);
    // The first call that gets through doubles as the readiness probe.
    if let Err(e) = wait_for_agent(&client, identity, within).await {
        return Err((vm, e));
    }
    Ok(Sandbox {
        vm,
        client,
        env: Arc::new(env),
        workdir,
        op_timeout,
        restored: true,
        image_user: Default::default(),
    })
}

fn read_settings(dir: &Path) -> SandboxSettings {
    let mut text = String::new();
    match std::fs::File::open(dir.join(SANDBOX_FILE)) {
        Ok(f) => {
            if f.take(MAX_SANDBOX_FILE).read_to_string(&mut text).is_err() {
                return SandboxSettings::default();
            }
            serde_json::from_str(&text).unwrap_or_else(|e| {
                tracing::warn!(dir = %dir.display(), "ignoring unreadable {SANDBOX_FILE}: {e}");
                SandboxSettings::default()
            })
        }
        Err(_) => SandboxSettings::default(),
    }
}

/// Polls the agent until it answers (right after a restore the guest is
/// still probing its freshly plugged vsock device), with `SetIdentity` when
/// there is one (it is idempotent), else `Info`.
async fn wait_for_agent(
    client: &capsa_agent_client::AgentClient,
    identity: Option<IdentityRequest>,
    within: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + within.max(Duration::from_secs(1));
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let per_try = left.min(Duration::from_secs(2));
        let r = match &identity {
            Some(id) => client.set_identity(id.clone(), per_try).await,
            None => client.info(per_try).await.map(|_| ()),
        };
        match r {
            Ok(()) => return Ok(()),
            // The agent answered and refused: retrying will not help.
            Err(e) if e.remote_kind().is_some() => return Err(e.into()),
            Err(e) if left.is_zero() => return Err(e.into()),
            Err(e) => {
                tracing::trace!("agent not reachable yet: {e}");
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }
    }
}

/// Reads `n` bytes from the host's RNG.
pub(crate) fn host_random(n: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| Error::io("reading /dev/urandom", e))?;
    Ok(buf)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn fresh_identity(hostname: Option<String>) -> Result<IdentityRequest> {
    let r = host_random(ENTROPY_BYTES + 16 + 4)?;
    let mut machine_id = hex(&r[..16]);
    if machine_id.bytes().all(|b| b == b'0') {
        machine_id.replace_range(31..32, "1");
    }
    let hostname = hostname.unwrap_or_else(|| format!("capsa-{}", hex(&r[16..20])));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Ok(IdentityRequest {
        hostname: Some(hostname),
        machine_id: Some(machine_id),
        entropy: r[20..].to_vec(),
        realtime: Some((now.as_secs() as i64, now.subsec_nanos())),
    })
}

impl SandboxBuilder {
    /// The VM spec this builder boots (validated; the bundle is built or found
    /// in the cache). Snapshots record it; pools and base snapshots compare it.
    pub async fn vm_spec(&self) -> Result<VmSpec> {
        let mut spec = self.vm_builder().await?.spec().clone();
        spec.validate(&capsa_core::HostLimits::detect())?;
        Ok(spec)
    }

    /// The VM builder [`SandboxBuilder::build`] uses (kept in step with it).
    pub(crate) async fn vm_builder(&self) -> Result<crate::VmBuilder> {
        let bundle = match &self.bundle {
            Some(b) => b.clone(),
            None => crate::default_bundle().await?,
        };
        let mut vm = Capsa::vm(crate::LinuxDirectBoot::from_bundle(&bundle))
            .cpus(self.cpus)
            .memory_mb(self.memory_mib)
            .accel(self.accel)
            .console()
            .vsock()
            .network(self.network.clone())
            .cmdline_arg("capsa.mode=agent");
        if let Some(d) = self.display {
            vm = vm.display(d.width, d.height);
        }
        for d in &self.disks {
            vm = vm.disk_spec(d.clone());
        }
        for a in &self.cmdline {
            vm = vm.cmdline_arg(a);
        }
        if let Some(rootfs) = &self.rootfs {
            if self.image.is_some() || self.upper.is_some() {
                return Err(Error::InvalidArgument(
                    "both a root filesystem spec and an image/upper; fix: set only one of rootfs_spec() and image()/upper()"
                        .into(),
                ));
            }
            vm = vm.rootfs(rootfs.clone());
        } else if let Some(reference) = &self.image {
            let rootfs =
                crate::rootfs::resolve(reference, self.memory_mib, self.upper.as_ref()).await?;
            vm = vm.rootfs(rootfs);
        } else if self.upper.is_some() {
            return Err(Error::InvalidArgument(
                "an upper layer without an image; fix: add .image(REF) (--image) or drop the upper"
                    .into(),
            ));
        }
        Ok(vm)
    }

    /// A restore builder carrying this builder's host-side settings
    /// (environment, working directory, timeouts, name).
    pub(crate) fn restore_from(&self, dir: &Path) -> RestoreBuilder {
        let mut r = Capsa::restore(dir)
            .ready_timeout(self.ready_timeout)
            .op_timeout(self.op_timeout);
        for (k, v) in &self.env {
            r = r.env(k.clone(), v.clone());
        }
        if let Some(w) = &self.workdir {
            r = r.workdir(w.clone());
        }
        if let Some(n) = &self.name {
            r = r.name(n.clone());
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_differ_and_validate() {
        let a = fresh_identity(None).unwrap();
        let b = fresh_identity(None).unwrap();
        a.validate().unwrap();
        b.validate().unwrap();
        assert_ne!(a.machine_id, b.machine_id);
        assert_ne!(a.hostname, b.hostname);
        assert_ne!(a.entropy, b.entropy);
    }

    #[test]
    fn snapshot_dir_must_be_empty() {
        let d = tempfile::tempdir().unwrap();
        prepare_dir(&d.path().join("new/deeper")).unwrap();
        std::fs::write(d.path().join("x"), b"").unwrap();
        assert!(prepare_dir(d.path()).is_err());
    }
}
