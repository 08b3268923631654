//! A sandbox: a fresh VM running capsa's guest agent, ready for exec and files.
//!
//! The VM boots the default guest with `capsa.mode=agent`; the agent listens on
//! vsock port [`capsa_proto::AGENT_PORT`] and every operation opens its own
//! vsock stream through the VM's hybrid-vsock socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capsa_agent_client::{AgentClient, BoxedStream, ExecChild, Output};
use capsa_core::{
    Accel, Action, DiskSpec, NetDecision, NetRule, NetworkMode, NetworkPolicy, NetworkSpec,
    PortForward,
};
use capsa_proto::{AgentInfo, ExecRequest, FileMeta, PtySize, WriteFileRequest, AGENT_PORT};

use crate::{Capsa, Error, Result, Strategy, VmHandle};

/// Default for [`SandboxBuilder::ready_timeout`]: a TCG boot takes ~2.5 s; CI machines are slower.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Default for [`SandboxBuilder::op_timeout`].
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(600);

/// Describes a sandbox; [`SandboxBuilder::build`] boots it.
#[derive(Debug, Clone)]
pub struct SandboxBuilder {
    pub(crate) cpus: u32,
    pub(crate) memory_mib: u64,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) workdir: Option<String>,
    pub(crate) disks: Vec<DiskSpec>,
    pub(crate) accel: Accel,
    pub(crate) name: Option<String>,
    pub(crate) cmdline: Vec<String>,
    pub(crate) bundle: Option<capsa_image::Bundle>,
    pub(crate) ready_timeout: Duration,
    pub(crate) op_timeout: Duration,
    pub(crate) strategy: Strategy,
    pub(crate) state_root: Option<PathBuf>,
    pub(crate) keep_running: bool,
    pub(crate) fast_start: bool,
    pub(crate) shares: Vec<capsa_core::ShareSpec>,
    /// An OCI image (name or digest) to run commands in.
    pub(crate) image: Option<String>,
    pub(crate) upper: Option<crate::rootfs::Upper>,
    /// A root filesystem built by the caller (e.g. the containerd shim from a snapshot).
    pub(crate) rootfs: Option<capsa_core::RootfsSpec>,
    /// Labels written into `sandbox.json` (who manages the sandbox).
    pub(crate) labels: std::collections::BTreeMap<String, String>,
    /// The network (`None`: no NIC, the default).
    pub(crate) network: Option<NetworkSpec>,
    /// A framebuffer display (`None`: headless, the default).
    pub(crate) display: Option<capsa_core::DisplaySpec>,
}

/// What `sandbox.json` holds for a sandbox, so a reattach restores the
/// sandbox-level options the creator chose.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct SandboxExtra {
    /// `sandbox` (or `vm` for plain monitor VMs).
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub op_timeout_ms: Option<u64>,
    /// Free-form labels of whoever manages the sandbox (e.g. capsad's pool
    /// membership), read back by listings such as `capsa ps`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

impl Capsa {
    /// Starts describing a sandbox on capsa's default guest.
    pub fn sandbox() -> SandboxBuilder {
        SandboxBuilder {
            cpus: 1,
            memory_mib: 512,
            env: Vec::new(),
            workdir: None,
            disks: Vec::new(),
            accel: Accel::Auto,
            name: None,
            cmdline: Vec::new(),
            bundle: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            op_timeout: DEFAULT_OP_TIMEOUT,
            strategy: Strategy::InProcess,
            state_root: None,
            keep_running: false,
            fast_start: true,
            shares: Vec::new(),
            image: None,
            upper: None,
            rootfs: None,
            labels: Default::default(),
            network: None,
            display: None,
        }
    }
}

impl SandboxBuilder {
    /// Number of vCPUs (default 1).
    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }

    /// Guest RAM in MiB (default 512).
    pub fn memory_mb(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// An environment variable for every command run in the sandbox.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Working directory for commands that do not set their own (default `/`).
    pub fn workdir(mut self, dir: impl Into<String>) -> Self {
        self.workdir = Some(dir.into());
        self
    }

    /// Attaches a disk (see [`crate::VmBuilder::disk_spec`]).
    pub fn disk(mut self, disk: DiskSpec) -> Self {
        self.disks.push(disk);
        self
    }

    /// Chooses the accelerator (default: probe).
    pub fn accel(mut self, accel: Accel) -> Self {
        self.accel = accel;
        self
    }

    /// Names the sandbox's VM.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Extra kernel arguments.
    pub fn cmdline_arg(mut self, args: impl Into<String>) -> Self {
        self.cmdline.push(args.into());
        self
    }

    /// Boots this bundle instead of the default one.
    pub fn bundle(mut self, bundle: capsa_image::Bundle) -> Self {
        self.bundle = Some(bundle);
        self
    }

    /// How long the guest may take to boot and answer (default [`DEFAULT_READY_TIMEOUT`]).
    pub fn ready_timeout(mut self, t: Duration) -> Self {
        self.ready_timeout = t;
        self
    }

    /// Deadline for file operations and for starting commands (default
    /// [`DEFAULT_OP_TIMEOUT`]); a command's own run time is bounded only by
    /// [`Command::timeout`].
    pub fn op_timeout(mut self, t: Duration) -> Self {
        self.op_timeout = t;
        self
    }

    /// Chooses where the VMM runs (default [`Strategy::InProcess`]).
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// The state root for monitor-run sandboxes (default [`crate::StateRoot::default_root`]).
    pub fn state_root(mut self, path: impl Into<PathBuf>) -> Self {
        self.state_root = Some(path.into());
        self
    }

    /// Keeps the sandbox running after this process lets go of it (drop,
    /// exit, crash): it runs under a monitor ([`Strategy::Monitor`] is
    /// implied), is found again by name with [`crate::Sandboxes`], and ends
    /// only by `stop`/`kill`/[`crate::Sandboxes::remove`]. Needs a [`SandboxBuilder::name`].
    pub fn keep_running(mut self, keep: bool) -> Self {
        self.keep_running = keep;
        if keep {
            self.strategy = Strategy::Monitor;
        }
        self
    }

    /// Runs commands inside this OCI image (a name such as `alpine:3.20`,
    /// a digest, or a unique digest prefix from `capsa image ls`), found in
    /// the image store (`$CAPSA_IMAGE_STORE`, default `~/.cache/capsa/images`)
    /// and converted to a read-only EROFS image on first use. Its `Env`,
    /// `WorkingDir` and `User` apply to every command (under the sandbox's
    /// and the command's own settings); [`Sandbox::image_command`] gives its
    /// `Entrypoint`/`Cmd`. Writes go to a per-sandbox upper layer
    /// ([`SandboxBuilder::upper`], default a tmpfs of half the RAM).
    pub fn image(mut self, reference: impl Into<String>) -> Self {
        self.image = Some(reference.into());
        self
    }

    /// Runs commands inside a root filesystem image the caller built (a
    /// read-only filesystem file plus the upper layer choice), instead of an
    /// image from the store ([`SandboxBuilder::image`]; setting both is
    /// refused). The containerd shim uses it for snapshot chains.
    pub fn rootfs_spec(mut self, rootfs: capsa_core::RootfsSpec) -> Self {
        self.rootfs = Some(rootfs);
        self
    }

    /// Adds a label to the sandbox's record (read back with
    /// [`crate::Sandboxes::label`]; `capsa ps` shows who owns the sandbox).
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// The writable layer over the image (see [`SandboxBuilder::image`]).
    pub fn upper(mut self, upper: crate::rootfs::Upper) -> Self {
        self.upper = Some(upper);
        self
    }

    /// Starts from this spec's base snapshot (default on): the first build of
    /// a spec boots cold and saves a snapshot of the VM right after its agent
    /// answers (in [`crate::base_snapshot::cache_dir`]); later builds restore
    /// it with a fresh identity, in a fraction of a boot, as `capsa run`
    /// does. Off, or for sandboxes that boot cold anyway (with writable
    /// disks, or kept running under a name, whose console history users
    /// read), every build boots.
    pub fn fast_start(mut self, on: bool) -> Self {
        self.fast_start = on;
        self
    }

    /// Sets the network mode: `none` (no NIC, the default), `public`
    /// (everything but the private floor) or `deny` (only what rules allow).
    pub fn network_mode(mut self, mode: NetworkMode) -> Self {
        if mode == NetworkMode::None {
            self.network = None;
        } else {
            self.network
                .get_or_insert_with(Default::default)
                .policy
                .mode = mode;
        }
        self
    }

    /// Adds a policy rule (first match wins); gives the sandbox a network
    /// (public) if it had none. See [`NetRule::parse`] for the syntax.
    pub fn net_rule(mut self, rule: NetRule) -> Self {
        self.network
            .get_or_insert_with(Default::default)
            .policy
            .rules
            .push(rule);
        self
    }

    /// Adds `--allow RULE`.
    pub fn allow(self, rule: &str) -> Result<Self> {
        Ok(self.net_rule(NetRule::parse(Action::Allow, rule)?))
    }

    /// Adds `--deny RULE`.
    pub fn deny(self, rule: &str) -> Result<Self> {
        Ok(self.net_rule(NetRule::parse(Action::Deny, rule)?))
    }

    /// Forwards a host port into the guest (gives the sandbox a network,
    /// public, if it had none). See [`PortForward::parse`] for the CLI form.
    pub fn forward(mut self, f: PortForward) -> Self {
        self.network
            .get_or_insert_with(Default::default)
            .forwards
            .push(f);
        self
    }

    /// The whole network spec at once (`None`: no NIC).
    pub fn network(mut self, network: Option<NetworkSpec>) -> Self {
        self.network = network;
        self
    }

    /// Gives the sandbox a `width` x `height` screen with a tablet and a
    /// keyboard, driven from the host through [`Sandbox::screen`].
    pub fn display(mut self, width: u32, height: u32) -> Self {
        self.display = Some(capsa_core::DisplaySpec::new(width, height));
        self
    }

    /// [`SandboxBuilder::display`] from an optional spec (`None`: headless).
    pub fn display_spec(mut self, display: Option<capsa_core::DisplaySpec>) -> Self {
        self.display = display;
        self
    }

    /// Returns once the sandbox's agent answers: restored from the spec's
    /// base snapshot, or booted (see [`SandboxBuilder::fast_start`]).
    pub async fn build(self) -> Result<Sandbox> {
        if self.fast_start && !self.keep_running {
            return crate::base_snapshot::build(self).await;
        }
        self.boot().await
    }

    /// Boots the VM and returns once its agent answers.
    pub(crate) async fn boot(self) -> Result<Sandbox> {
        check_keep_running_name(self.keep_running, self.name.as_deref())?;
        let mut vm = self.vm_builder().await?;
        // Shares are no part of the spec snapshots and pools compare: a boot
        // plugs them in; a restore hot-plugs them (see `base_snapshot`).
        for s in self.shares {
            vm = vm.share(s);
        }
        if let Some(n) = self.name {
            vm = vm.name(n);
        }
        vm = vm.strategy(self.strategy);
        if let Some(r) = &self.state_root {
            vm = vm.state_root(r);
        }
        let extra = SandboxExtra {
            kind: "sandbox".into(),
            env: self.env.clone(),
            workdir: self.workdir.clone(),
            op_timeout_ms: Some(self.op_timeout.as_millis().min(u128::from(u64::MAX)) as u64),
            labels: self.labels.clone(),
        };
        vm.keep_alive = self.keep_running;
        vm.extra = serde_json::to_value(&extra).ok();
        let vm = vm.build().await?;
        Sandbox::ready(vm, extra, self.ready_timeout, true)
            .await?
            .mount_boot_shares()
            .await
    }
}

/// A client whose every operation opens a fresh vsock stream to the agent.
pub(crate) fn agent_client(uds: PathBuf) -> AgentClient {
    let uds = Arc::new(uds);
    AgentClient::new(move || {
        let uds = uds.clone();
        async move {
            let s = crate::vsock::connect(&uds, AGENT_PORT, Duration::from_secs(30))
                .await
                .map_err(std::io::Error::other)?;
            Ok(Box::new(s) as BoxedStream)
        }
    })
}

/// A command to run in a sandbox, built like `std::process::Command`.
#[derive(Debug, Clone)]
pub struct Command {
    req: ExecRequest,
    stdin: Option<Vec<u8>>,
}

impl Command {
    /// The agent request this command becomes (for front ends that forward it, like the CLI to capsad).
    pub fn request(&self) -> &ExecRequest {
        &self.req
    }

    /// Runs `program` (looked up in the guest's `PATH` unless it contains `/`).
    pub fn new(program: impl Into<String>) -> Self {
        Self {
            req: ExecRequest {
                argv: vec![program.into()],
                ..Default::default()
            },
            stdin: None,
        }
    }

    /// Adds an argument.
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.req.argv.push(a.into());
        self
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.req.argv.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable (over the sandbox's).
    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.req.env.push((k.into(), v.into()));
        self
    }

    /// Working directory.
    pub fn current_dir(mut self, dir: impl Into<String>) -> Self {
        self.req.cwd = Some(dir.into());
        self
    }

    /// Runs as `uid`/`gid` instead of root.
    pub fn user(mut self, uid: u32, gid: u32) -> Self {
        self.req.uid = Some(uid);
        self.req.gid = Some(gid);
        self
    }

    /// Supplementary groups (at most 64); by default a command has none.
    pub fn groups(mut self, groups: impl IntoIterator<Item = u32>) -> Self {
        self.req.groups = groups.into_iter().collect();
        self
    }

    /// Feeds these bytes to stdin (for [`Sandbox::exec`]); then stdin closes.
    pub fn stdin_bytes(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(data.into());
        self.req.stdin = true;
        self
    }

    /// Keeps stdin open for streaming (for [`Sandbox::spawn`]).
    pub fn stdin_piped(mut self) -> Self {
        self.req.stdin = true;
        self
    }

    /// Runs on a pseudo-terminal of this size (stderr merges into stdout).
    pub fn pty(mut self, rows: u16, cols: u16) -> Self {
        self.req.pty = Some(PtySize { rows, cols });
        self
    }

    /// Kills the command (its whole process group) after `t`; reported as timed out.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.req.timeout_ms = Some(t.as_millis().min(u128::from(u64::MAX)) as u64);
        self
    }
}

/// A running sandbox. Dropping it kills its VM.
pub struct Sandbox {
    pub(crate) vm: VmHandle,
    pub(crate) client: AgentClient,
    pub(crate) env: Arc<Vec<(String, String)>>,
    pub(crate) workdir: Option<String>,
    pub(crate) op_timeout: Duration,
    /// Started from a snapshot (a base snapshot, a named one, a pool's).
    pub(crate) restored: bool,
    /// The image's `User`, resolved in the image once (uid, gid).
    pub(crate) image_user: Arc<tokio::sync::OnceCell<crate::rootfs::ResolvedUser>>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox").field("vm", &self.vm).finish()
    }
}

impl Sandbox {
    /// Waits for the agent of a freshly started (or attached) VM and wraps it.
    /// A VM whose agent never answers is killed (and a kept one removed).
    pub(crate) async fn ready(
        vm: VmHandle,
        extra: SandboxExtra,
        ready_timeout: Duration,
        wait_marker: bool,
    ) -> Result<Sandbox> {
        let start = tokio::time::Instant::now();
        let ready = async {
            if wait_marker {
                vm.console()?
                    .wait_for(capsa_proto::AGENT_LISTENING_MARKER, ready_timeout)
                    .await?;
            }
            let client = agent_client(vm.vsock_socket()?);
            let left = ready_timeout.saturating_sub(start.elapsed());
            client.info(left.max(Duration::from_secs(1))).await?;
            Ok::<_, Error>(client)
        }
        .await;
        let client = match ready {
            Ok(c) => c,
            Err(e) => {
                if wait_marker {
                    let _ = vm.kill().await;
                    if let Some(dir) = vm.state_dir() {
                        let _ = std::fs::remove_dir_all(dir);
                    }
                }
                return Err(e);
            }
        };
        Ok(Sandbox {
            vm,
            client,
            env: Arc::new(extra.env),
            workdir: extra.workdir,
            op_timeout: extra
                .op_timeout_ms
                .map_or(DEFAULT_OP_TIMEOUT, Duration::from_millis),
            restored: false,
            image_user: Default::default(),
        })
    }

    /// Runs `true` once (right after a restore under TCG the first fork+exec
    /// pays for translating the code; pools pay it before handing out). An
    /// image need not have a `true`: there, "not found" (nothing forked)
    /// still proves the agent answers and is not an error.
    pub async fn warm_up(&self) -> Result<()> {
        match self.exec(&Command::new("true")).await {
            Ok(_) => Ok(()),
            Err(e) if self.rootfs().is_some() && e.spawn_exit_code().is_some() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The image root filesystem this sandbox runs commands in, if any.
    pub fn rootfs(&self) -> Option<&capsa_core::RootfsSpec> {
        self.vm.spec().rootfs.as_ref()
    }

    /// What runs for `args` in an image sandbox, with Docker's rules: the
    /// image's `Entrypoint`, then `args`, or the image's `Cmd` when `args` is
    /// empty. Without an image, `args` itself. Empty: nothing to run.
    pub fn image_command(&self, args: &[String]) -> Vec<String> {
        match self.rootfs() {
            Some(r) => r.config.command(args),
            None => args.to_vec(),
        }
    }

    /// The sandbox's (VM's) name.
    pub fn name(&self) -> &str {
        self.vm.name()
    }

    /// The sandbox's registry record (state, pids, spec), for a monitor-run sandbox.
    pub fn record(&self) -> Result<crate::SandboxRecord> {
        let dir = self.vm.state_dir().ok_or(Error::NeedsMonitor {
            what: "a sandbox record",
        })?;
        let root = dir
            .parent()
            .and_then(Path::parent)
            .ok_or(Error::NeedsMonitor {
                what: "a sandbox record",
            })?;
        Ok(capsa_vmm::StateRoot::new(root).get(self.name())?)
    }

    /// Leaves the sandbox running after this handle is gone and returns its
    /// record; [`crate::Sandboxes::open`] finds it again. Monitor-run only.
    pub async fn detach(self) -> Result<crate::SandboxRecord> {
        let record = self.record()?;
        self.vm.detach().await?;
        Ok(record)
    }

    /// The underlying VM.
    pub fn vm(&self) -> &VmHandle {
        &self.vm
    }

    /// Whether it started from a snapshot (a base snapshot, a named one, a
    /// pool's) rather than a boot.
    pub fn restored(&self) -> bool {
        self.restored
    }

    /// The sandbox's files as a [`crate::copy::GuestFs`] (what the copies walk).
    pub fn files(&self) -> crate::copy::AgentFs {
        crate::copy::AgentFs {
            client: self.client.clone(),
            timeout: self.op_timeout,
        }
    }

    /// The deadline of each agent call this handle makes.
    pub fn op_timeout(&self) -> Duration {
        self.op_timeout
    }

    /// The agent client (for calls this type does not wrap).
    pub fn agent(&self) -> &AgentClient {
        &self.client
    }

    /// Agent and guest facts.
    pub async fn info(&self) -> Result<AgentInfo> {
        Ok(self.client.info(self.op_timeout).await?)
    }

    /// Sets the guest's hostname (and, in an image sandbox, the image's
    /// `/etc/hostname` and `/etc/hosts`), as `docker run --hostname` does.
    /// 1 to 64 letters, digits, `-` or `.`, not starting with `-` or `.`.
    pub async fn set_hostname(&self, hostname: &str) -> Result<()> {
        let req = capsa_proto::IdentityRequest {
            hostname: Some(hostname.to_string()),
            ..Default::default()
        };
        req.validate()
            .map_err(|e| Error::InvalidArgument(format!("hostname: {e}")))?;
        Ok(self.client.set_identity(req, self.op_timeout).await?)
    }

    async fn request(&self, cmd: &Command) -> Result<ExecRequest> {
        let mut req = cmd.req.clone();
        let image = self.rootfs().map(|r| &r.config);
        // The image's Env under the sandbox's under the command's.
        let mut env: Vec<(String, String)> =
            image.map(crate::rootfs::image_env).unwrap_or_default();
        env.extend(self.env.as_ref().iter().cloned());
        env.extend(req.env);
        req.env = env;
        if req.cwd.is_none() {
            req.cwd = self
                .workdir
                .clone()
                .or_else(|| image.and_then(|c| c.working_dir.clone()));
        }
        if req.uid.is_none() {
            if let Some(user) = image.and_then(|c| c.user.as_deref()) {
                let u = self
                    .image_user
                    .get_or_try_init(|| self.lookup_user(user))
                    .await?;
                req.uid = Some(u.uid);
                req.gid = Some(u.gid);
                req.groups = u.groups.clone();
            }
        }
        Ok(req)
    }

    /// Resolves the image's `User` in the image's own account files.
    async fn lookup_user(&self, user: &str) -> Result<crate::rootfs::ResolvedUser> {
        // Numeric ids need no files (distroless images have none), and
        // Docker gives `uid:gid` no supplementary groups.
        if let Some((u, g)) = user.split_once(':') {
            if let (Ok(uid), Ok(gid)) = (u.parse::<u32>(), g.parse::<u32>()) {
                return Ok(crate::rootfs::ResolvedUser {
                    uid,
                    gid,
                    groups: Vec::new(),
                });
            }
        }
        let passwd = self.read_account_file("/etc/passwd").await?;
        let group = self.read_account_file("/etc/group").await?;
        crate::rootfs::resolve_user(user, &passwd, &group)
    }

    /// An account file of the image, bounded; missing means empty.
    async fn read_account_file(&self, path: &str) -> Result<Vec<u8>> {
        use crate::copy::GuestFs;
        let fs = self.files();
        match fs.stat(path).await {
            Ok(m) if m.size as usize > crate::rootfs::MAX_ACCOUNT_FILE => {
                Err(Error::GuestInput(format!(
                    "{path} of the image is {} bytes (at most {})",
                    m.size,
                    crate::rootfs::MAX_ACCOUNT_FILE
                )))
            }
            Ok(_) => {
                let mut out = Vec::new();
                let w = BoundedWriter {
                    buf: &mut out,
                    left: crate::rootfs::MAX_ACCOUNT_FILE,
                };
                self.client.read_file(path, w, self.op_timeout).await?;
                Ok(out)
            }
            Err(_) => Ok(Vec::new()),
        }
    }

    /// Replaces the sandbox's network policy; new flows follow it at once
    /// (e.g. a pooled sandbox is acquired, then given its policy).
    pub async fn set_network_policy(&self, policy: NetworkPolicy) -> Result<()> {
        Ok(self.vm.instance().set_network_policy(policy).await?)
    }

    /// The network policy in force.
    pub async fn network_policy(&self) -> Result<NetworkPolicy> {
        Ok(self.vm.instance().network_policy().await?)
    }

    /// Forwards a host port into this sandbox from now on (`capsa port add`);
    /// a pooled sandbox gets its ports this way after `acquire`.
    pub async fn port_add(&self, forward: capsa_core::PortForward) -> Result<()> {
        Ok(self.vm.instance().add_port_forward(forward).await?)
    }

    /// Stops forwarding `host_ip:host_port`; returns the forward removed.
    pub async fn port_remove(
        &self,
        host_ip: std::net::Ipv4Addr,
        host_port: u16,
    ) -> Result<capsa_core::PortForward> {
        Ok(self
            .vm
            .instance()
            .remove_port_forward(host_ip, host_port)
            .await?)
    }

    /// The host ports forwarded into this sandbox now.
    pub async fn ports(&self) -> Result<Vec<capsa_core::PortForward>> {
        Ok(self.vm.instance().port_forwards().await?)
    }

    /// The latest network decisions (bounded), oldest first.
    pub async fn network_log(&self) -> Result<Vec<NetDecision>> {
        Ok(self.vm.instance().network_log().await?)
    }

    /// Runs a command to completion and collects its output.
    pub async fn exec(&self, cmd: &Command) -> Result<Output> {
        let req = self.request(cmd).await?;
        match &cmd.stdin {
            None => {
                // The command's own timeout (enforced in the guest) bounds the run;
                // without one the caller chose no deadline.
                let deadline = cmd
                    .req
                    .timeout_ms
                    .map(|ms| Duration::from_millis(ms) + self.op_timeout)
                    .unwrap_or(Duration::MAX);
                Ok(self.client.exec_output(req, deadline).await?)
            }
            Some(data) => {
                let mut child = self.client.exec(req, self.op_timeout).await?;
                let stdin = child.stdin();
                let out = child.stdout();
                let err = child.stderr();
                let feed = async move {
                    if let Some(mut s) = stdin {
                        use tokio::io::AsyncWriteExt;
                        s.write_all(data).await?;
                        s.shutdown().await?;
                    }
                    Ok::<(), std::io::Error>(())
                };
                let (fed, stdout, stderr) = tokio::join!(feed, read_all(out), read_all(err));
                let status = child.wait().await?;
                // A process may exit without reading all of stdin; that is not an error.
                if let Err(e) = fed {
                    tracing::debug!("stdin not fully consumed: {e}");
                }
                Ok(Output {
                    status,
                    stdout: stdout.map_err(|e| Error::io("reading stdout", e))?,
                    stderr: stderr.map_err(|e| Error::io("reading stderr", e))?,
                })
            }
        }
    }

    /// Starts a command and returns a streaming child (`stdin()`, `stdout()`,
    /// `stderr()`, `wait()`, `kill()`, `signal()`, `resize()`).
    pub async fn spawn(&self, cmd: &Command) -> Result<ExecChild> {
        Ok(self
            .client
            .exec(self.request(cmd).await?, self.op_timeout)
            .await?)
    }

    /// Writes `data` to `path` (mode 0644, parents created).
    pub async fn write_file(&self, path: &str, data: impl AsRef<[u8]>) -> Result<FileMeta> {
        self.write_file_from(path, data.as_ref(), 0o644, None).await
    }

    /// Streams `reader` into `path` with `mode` and, if given, `mtime`.
    pub async fn write_file_from<R: tokio::io::AsyncRead + Unpin>(
        &self,
        path: &str,
        reader: R,
        mode: u32,
        mtime: Option<SystemTime>,
    ) -> Result<FileMeta> {
        let req = WriteFileRequest {
            path: path.to_string(),
            mode,
            mtime: mtime.map(to_epoch),
            create_parents: true,
        };
        Ok(self.client.write_file(req, reader, self.op_timeout).await?)
    }

    /// Reads the whole file at `path`.
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.client
            .read_file(path, &mut out, self.op_timeout)
            .await?;
        Ok(out)
    }

    /// Streams the file at `path` into `writer`; returns its metadata.
    pub async fn read_file_to<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        path: &str,
        writer: W,
    ) -> Result<FileMeta> {
        Ok(self.client.read_file(path, writer, self.op_timeout).await?)
    }

    /// Copies a host file or directory (recursively) to `guest` path, keeping modes and mtimes.
    pub async fn copy_in(&self, host: &Path, guest: &str) -> Result<()> {
        crate::copy::copy_in(&self.files(), host, guest).await
    }

    /// Copies a guest file or directory (recursively) to `host`, keeping
    /// modes (without setuid, setgid and sticky bits) and mtimes. The guest is
    /// untrusted: nothing is written outside `host`; see [`crate::copy`].
    pub async fn copy_out(&self, guest: &str, host: &Path) -> Result<()> {
        self.copy_out_with(guest, host, &crate::CopyOutOptions::default())
            .await
    }

    /// [`Sandbox::copy_out`] with explicit bounds and choices.
    pub async fn copy_out_with(
        &self,
        guest: &str,
        host: &Path,
        opts: &crate::CopyOutOptions,
    ) -> Result<()> {
        crate::copy::copy_out(&self.files(), guest, host, opts).await
    }

    /// Opens a stream to a guest service on vsock `port`.
    pub async fn vsock_connect(&self, port: u32) -> Result<tokio::net::UnixStream> {
        self.vm.vsock_connect(port, self.op_timeout).await
    }

    /// Accepts guest connections to host vsock `port`.
    pub fn vsock_listen(&self, port: u32) -> Result<tokio::net::UnixListener> {
        self.vm.vsock_listen(port)
    }

    /// Shuts the sandbox down (graceful, then kill).
    pub async fn stop(&self) -> Result<capsa_core::ExitReason> {
        self.vm.stop().await
    }

    /// Kills the sandbox at once.
    pub async fn kill(&self) -> Result<capsa_core::ExitReason> {
        self.vm.kill().await
    }
}

/// Collects at most `left` bytes; more is an error (a file grown past its stat).
struct BoundedWriter<'a> {
    buf: &'a mut Vec<u8>,
    left: usize,
}

impl tokio::io::AsyncWrite for BoundedWriter<'_> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if data.len() > self.left {
            return std::task::Poll::Ready(Err(std::io::Error::other("file too large")));
        }
        self.left -= data.len();
        self.buf.extend_from_slice(data);
        std::task::Poll::Ready(Ok(data.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

async fn read_all(out: Option<capsa_agent_client::ExecOutput>) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    if let Some(mut o) = out {
        use tokio::io::AsyncReadExt;
        o.read_to_end(&mut v).await?;
    }
    Ok(v)
}

pub(crate) fn to_epoch(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            (
                -(d.as_secs() as i64) - 1,
                1_000_000_000 - d.subsec_nanos().max(1),
            )
        }
    }
}

/// A keep-running sandbox is found again by name only: refuse one without.
pub(crate) fn check_keep_running_name(keep_running: bool, name: Option<&str>) -> Result<()> {
    if keep_running && name.is_none() {
        return Err(Error::InvalidArgument(
            "a keep-running sandbox needs a name to be found again; fix: call .name(\"my-box\")"
                .into(),
        ));
    }
    Ok(())
}
