//! The fluent builder: collects options into a [`VmSpec`], validates it, and
//! hands it to a backend.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use capsa_core::{
    Accel, BootSource, DiskSpec, HostLimits, Hypervisor, KernelCmdline, StartOptions, VmSpec,
};

use crate::handle::{Instance, RunDir};
use crate::{Error, Result, VmConsole, VmHandle};

/// How long a monitor gets to bring QEMU up (boot itself is not included).
pub(crate) const MONITOR_START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Where the VMM runs.
///
/// `InProcess` keeps QEMU as a child of this process (its vsock device and
/// console pump are tasks here); the VM ends with the handle or the process.
/// `Monitor` runs it under a `capsa-vmm` process of its own, registered by
/// name under a state root, so it can be found again ([`crate::Sandboxes`]),
/// survive this process (keep-running sandboxes), and be driven by several
/// processes at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Strategy {
    /// QEMU is a child of this process.
    #[default]
    InProcess,
    /// QEMU runs under a per-VM `capsa-vmm` monitor process.
    Monitor,
}

/// Entry point of the library.
#[derive(Debug, Clone, Copy)]
pub struct Capsa;

impl Capsa {
    /// Starts describing a VM that boots `boot`.
    pub fn vm(boot: LinuxDirectBoot) -> VmBuilder {
        VmBuilder::new(boot)
    }
}

/// Direct Linux boot: a kernel, an optional initramfs, and a command line.
#[derive(Debug, Clone)]
pub struct LinuxDirectBoot {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: KernelCmdline,
}

impl LinuxDirectBoot {
    /// Boots `kernel` with `initrd`.
    pub fn new(kernel: impl AsRef<Path>, initrd: Option<impl AsRef<Path>>) -> Self {
        Self {
            kernel: kernel.as_ref().to_path_buf(),
            initrd: initrd.map(|p| p.as_ref().to_path_buf()),
            cmdline: KernelCmdline::parse("quiet").unwrap_or_default(),
        }
    }

    /// Replaces the kernel command line (capsa's console and panic defaults stay underneath).
    pub fn cmdline(mut self, cmdline: KernelCmdline) -> Self {
        self.cmdline = cmdline;
        self
    }
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Describes a VM; [`VmBuilder::build`] starts it.
pub struct VmBuilder {
    spec: VmSpec,
    name: Option<String>,
    backend: Option<Arc<dyn Hypervisor>>,
    deferred: Option<Error>,
    strategy: Strategy,
    state_root: Option<PathBuf>,
    /// Monitor only: the VM outlives this handle and process.
    pub(crate) keep_alive: bool,
    /// Monitor only: library extras for `sandbox.json`.
    pub(crate) extra: Option<serde_json::Value>,
}

impl std::fmt::Debug for VmBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmBuilder")
            .field("spec", &self.spec)
            .field("name", &self.name)
            .field("strategy", &self.strategy)
            .finish()
    }
}

impl VmBuilder {
    fn new(boot: LinuxDirectBoot) -> Self {
        let mut spec = VmSpec::linux(boot.kernel, boot.initrd);
        spec.console.enabled = false;
        let BootSource::LinuxDirect { cmdline, .. } = &mut spec.boot;
        *cmdline = boot.cmdline;
        Self {
            spec,
            name: None,
            backend: None,
            deferred: None,
            strategy: Strategy::InProcess,
            state_root: None,
            keep_alive: false,
            extra: None,
        }
    }

    /// Builds from an existing spec (as the CLI, monitor and daemon do).
    pub fn from_spec(spec: VmSpec) -> Self {
        Self {
            spec,
            name: None,
            backend: None,
            deferred: None,
            strategy: Strategy::InProcess,
            state_root: None,
            keep_alive: false,
            extra: None,
        }
    }

    /// Number of vCPUs (default 1).
    pub fn cpus(mut self, n: u32) -> Self {
        self.spec.cpus = n;
        self
    }

    /// Guest RAM in MiB (default 512).
    pub fn memory_mb(mut self, mib: u64) -> Self {
        self.spec.memory_mib = mib;
        self
    }

    /// Attaches a writable disk; the format (raw or qcow2) is read from the file.
    pub fn disk(self, path: impl Into<PathBuf>) -> Self {
        self.disk_spec(DiskSpec::new(path))
    }

    /// Attaches a read-only disk.
    pub fn disk_ro(self, path: impl Into<PathBuf>) -> Self {
        self.disk_spec(DiskSpec {
            read_only: true,
            ..DiskSpec::new(path)
        })
    }

    /// Attaches a disk described in full.
    pub fn disk_spec(mut self, disk: DiskSpec) -> Self {
        self.spec.disks.push(disk);
        self
    }

    /// Shares a host directory (virtio-fs, plugged in at boot; the guest mounts it by its tag).
    pub fn share(mut self, share: capsa_core::ShareSpec) -> Self {
        self.spec.shares.push(share);
        self
    }

    /// Boots with a root filesystem image (see [`capsa_core::RootfsSpec`]):
    /// attaches it read-only (and a disk upper) and tells the guest init.
    pub fn rootfs(mut self, rootfs: capsa_core::RootfsSpec) -> Self {
        if let Err(e) = self.spec.set_rootfs(rootfs) {
            self.deferred.get_or_insert(e.into());
        }
        self
    }

    /// Adds kernel arguments (`key=value` or flags); later values of a key win.
    pub fn cmdline_arg(mut self, args: &str) -> Self {
        let BootSource::LinuxDirect { cmdline, .. } = &mut self.spec.boot;
        if let Err(e) = cmdline.extend_from_str(args) {
            self.deferred
                .get_or_insert(capsa_core::Error::from(e).into());
        }
        self
    }

    /// Captures the serial console (see [`VmHandle::console`]).
    pub fn console(mut self) -> Self {
        self.spec.console.enabled = true;
        self
    }

    /// Captures the console and also appends it to `path`.
    pub fn console_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.spec.console.enabled = true;
        self.spec.console.log = Some(path.into());
        self
    }

    /// Adds a virtio-vsock device (see [`VmHandle::vsock_connect`]).
    pub fn vsock(mut self) -> Self {
        self.spec.vsock = Some(capsa_core::VsockSpec::default());
        self
    }

    /// Gives the VM a NIC behind capsa's network stack (`None`: no NIC).
    pub fn network(mut self, network: Option<capsa_core::NetworkSpec>) -> Self {
        self.spec.network = network;
        self
    }

    /// Chooses the accelerator (default: probe).
    pub fn accel(mut self, accel: Accel) -> Self {
        self.spec.accel = accel;
        self
    }

    /// Gives the VM a `width` x `height` framebuffer display, a tablet and a
    /// keyboard (see [`crate::Screen`]); checked at build time. Also tells
    /// capsa's guest init to load the display and input drivers
    /// (`capsa.display=1`), which headless VMs skip.
    pub fn display(mut self, width: u32, height: u32) -> Self {
        self.spec.display = Some(capsa_core::DisplaySpec::new(width, height));
        self.cmdline_arg("capsa.display=1")
    }

    /// Names the VM (for logs and process titles).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Uses a specific backend instead of QEMU from `PATH`.
    pub fn backend(mut self, backend: Arc<dyn Hypervisor>) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Chooses where the VMM runs (default [`Strategy::InProcess`]).
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// The state root for [`Strategy::Monitor`] (default: [`crate::StateRoot::default_root`]).
    pub fn state_root(mut self, path: impl Into<PathBuf>) -> Self {
        self.state_root = Some(path.into());
        self
    }

    /// The spec as built so far.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// Validates the spec and starts the VM. Nothing is started if validation fails.
    pub async fn build(self) -> Result<VmHandle> {
        if let Some(e) = self.deferred {
            return Err(e);
        }
        let mut spec = self.spec;
        spec.validate(&HostLimits::detect())?;
        let name = self.name.unwrap_or_else(|| {
            format!(
                "vm-{}-{}",
                std::process::id(),
                NEXT_ID.fetch_add(1, Ordering::Relaxed)
            )
        });
        if self.strategy == Strategy::Monitor {
            return build_monitor(
                spec,
                name,
                self.backend,
                self.state_root,
                self.keep_alive,
                self.extra,
            )
            .await;
        }
        validate_name(&name)?;
        let backend: Arc<dyn Hypervisor> = match self.backend {
            Some(b) => b,
            None => Arc::new(capsa_qemu::QemuBackend::new().map_err(capsa_core::Error::from)?),
        };
        let run_dir = make_run_dir()?;
        let console_log = spec
            .console
            .log
            .clone()
            .unwrap_or_else(|| run_dir.path().join("console.log"));
        let mut instance = backend
            .start(
                spec.clone(),
                StartOptions {
                    run_dir: run_dir.path().to_path_buf(),
                    name: name.clone(),
                },
            )
            .await?;
        let console = match instance.take_console() {
            Some(streams) => Some(
                VmConsole::start(streams.output, streams.input, Some(console_log))
                    .map_err(|e| Error::io("opening the console log", e))?,
            ),
            None => None,
        };
        Ok(VmHandle::new(
            name,
            spec,
            Instance::InProcess(instance),
            console,
            RunDir::Temp(run_dir),
        ))
    }
}

/// The monitor path of [`VmBuilder::build`]: pre-flight checks here (so bad
/// input fails before any process exists), then a `capsa-vmm` process boots it.
async fn build_monitor(
    spec: VmSpec,
    name: String,
    backend: Option<Arc<dyn Hypervisor>>,
    state_root: Option<PathBuf>,
    keep_alive: bool,
    extra: Option<serde_json::Value>,
) -> Result<VmHandle> {
    if let Err(e) = capsa_vmm::validate_name(&name) {
        return Err(capsa_core::Error::invalid(
            "name",
            format!("{name:?} is not a valid sandbox name"),
            e.to_string(),
        )
        .into());
    }
    if backend.is_some() {
        return Err(Error::InvalidArgument(
            "a custom backend runs in this process; it cannot be combined with Strategy::Monitor"
                .into(),
        ));
    }
    // The monitor runs QEMU: refuse what it cannot do now, with the typed error.
    let qemu = capsa_qemu::QemuBackend::new().map_err(capsa_core::Error::from)?;
    qemu.capabilities().check(&spec)?;
    if spec.accel == capsa_core::Accel::Kvm {
        // A forced KVM that cannot run guests here is the caller's error, not
        // a monitor failure: check it (cached probe) before any process starts.
        let BootSource::LinuxDirect { kernel, initrd, .. } = &spec.boot;
        qemu.resolve_accel(spec.accel, kernel, initrd.as_deref())
            .await?;
    }
    let root = state_root
        .map(capsa_vmm::StateRoot::new)
        .unwrap_or_else(capsa_vmm::StateRoot::default_root);
    let handle = capsa_vmm::spawn(
        spec.clone(),
        capsa_vmm::SpawnOptions {
            state_root: root,
            name: name.clone(),
            keep_alive,
            extra,
            monitor_binary: None,
        },
    )
    .await?;
    if let Err(e) = handle.wait_started(MONITOR_START_TIMEOUT).await {
        use capsa_core::VmInstance;
        let _ = handle.kill().await;
        return Err(e.into());
    }
    attach_monitor(name, spec, handle)
}

/// Wraps a monitor handle (spawned or connected) into a [`VmHandle`],
/// connecting to its console socket.
pub(crate) fn attach_monitor(
    name: String,
    spec: VmSpec,
    mut handle: capsa_vmm::MonitorHandle,
) -> Result<VmHandle> {
    use capsa_core::VmInstance;
    let dir = handle.dir().to_path_buf();
    let info = handle.info();
    let console = match handle.take_console() {
        Some(streams) => Some(
            // The monitor keeps console.log; a user-chosen log is also written here.
            VmConsole::start_with_log(
                streams.output,
                streams.input,
                spec.console.log.clone(),
                spec.console.log.clone().or(info.console_log),
            )
            .map_err(|e| Error::io("opening the console log", e))?,
        ),
        None => None,
    };
    Ok(VmHandle::new(
        name,
        spec,
        Instance::Monitor(Box::new(handle)),
        console,
        RunDir::State(dir),
    ))
}

fn validate_name(name: &str) -> Result<()> {
    capsa_core::check_name(name).map_err(|problem| {
        capsa_core::Error::invalid(
            "name",
            format!("{name:?}: {problem}"),
            capsa_core::NAME_RULE,
        )
        .into()
    })
}

/// A private directory for the VM's sockets; short, because Unix socket paths
/// are limited to 108 bytes.
pub(crate) fn make_run_dir() -> Result<tempfile::TempDir> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir)
        .join("capsa");
    std::fs::create_dir_all(&base)
        .map_err(|e| Error::io(format!("creating {}", base.display()), e))?;
    // Private (tempfile's default follows the umask): a confined QEMU of
    // another sandbox, or another local user, must not read it.
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .prefix("vm-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(&base)
        .map_err(|e| Error::io(format!("creating a run directory in {}", base.display()), e))
}
