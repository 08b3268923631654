//! The fluent builder: collects options into a [`VmSpec`], validates it, and
//! hands it to a backend.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use capsa_core::{
    Accel, BootSource, DiskSpec, HostLimits, Hypervisor, KernelCmdline, StartOptions, VmSpec,
};

use crate::{Error, Result, VmConsole, VmHandle};

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
}

impl std::fmt::Debug for VmBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmBuilder")
            .field("spec", &self.spec)
            .field("name", &self.name)
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
        }
    }

    /// Builds from an existing spec (as the CLI, monitor and daemon do).
    pub fn from_spec(spec: VmSpec) -> Self {
        Self {
            spec,
            name: None,
            backend: None,
            deferred: None,
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

    /// Chooses the accelerator (default: probe).
    pub fn accel(mut self, accel: Accel) -> Self {
        self.spec.accel = accel;
        self
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
        let backend: Arc<dyn Hypervisor> = match self.backend {
            Some(b) => b,
            None => Arc::new(capsa_qemu::QemuBackend::new().map_err(capsa_core::Error::from)?),
        };
        let name = self.name.unwrap_or_else(|| {
            format!(
                "vm-{}-{}",
                std::process::id(),
                NEXT_ID.fetch_add(1, Ordering::Relaxed)
            )
        });
        validate_name(&name)?;
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
        Ok(VmHandle::new(name, spec, instance, console, run_dir))
    }
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(capsa_core::Error::invalid(
            "name",
            format!("{name:?} is not a valid VM name"),
            "use 1-64 letters, digits, '-', '_' or '.', not starting with '.'",
        )
        .into())
    }
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
    tempfile::Builder::new()
        .prefix("vm-")
        .tempdir_in(&base)
        .map_err(|e| Error::io(format!("creating a run directory in {}", base.display()), e))
}
