//! Plain, serde-able descriptions of a VM. No process, socket or file handle
//! lives here: a spec can be written to `spec.json`, sent over RPC, or built by
//! any front end, and [`VmSpec::validate`] checks it before anything starts.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{probe_disk_format, Error, KernelCmdline, NetworkSpec, Result};

/// Most vCPUs a spec may ask for.
pub const MAX_CPUS: u32 = 64;
/// Least guest memory capsa's guest (kernel, initramfs, agent) works in;
/// below it boots fail (found by fuzzing the daemon's API).
pub const MIN_MEMORY_MIB: u64 = 128;
/// Most guest memory a spec may ask for (1 TiB), before the host's own limit.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// Longest virtio-blk serial (the device's ID field holds 20 bytes).
pub const MAX_DISK_SERIAL: usize = 20;

/// Everything needed to start one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// What the VM boots.
    pub boot: BootSource,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Block devices, attached in order (`/dev/vda`, `/dev/vdb`, ...).
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// The serial console.
    #[serde(default)]
    pub console: ConsoleSpec,
    /// Which accelerator to run on.
    #[serde(default)]
    pub accel: Accel,
    /// A virtio-vsock device for host<->guest streams (the guest agent uses it).
    #[serde(default)]
    pub vsock: Option<VsockSpec>,
    /// Host directories mounted in the guest over virtio-fs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<crate::ShareSpec>,
    /// Boot with a root filesystem image (see [`crate::RootfsSpec`]); set with
    /// [`VmSpec::set_rootfs`], which also attaches its disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<crate::RootfsSpec>,
    /// A virtio-net NIC served by capsa's userspace stack; `None` is no NIC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkSpec>,
    /// A framebuffer display with a tablet and a keyboard; `None` is headless.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<crate::DisplaySpec>,
}

/// A virtio-vsock device. The host side is a Unix socket in the hybrid-vsock
/// convention (see `capsa-vsock`), placed in the VM's run directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockSpec {
    /// The guest's context id (3 or more; 0-2 are reserved).
    pub guest_cid: u32,
}

impl Default for VsockSpec {
    fn default() -> Self {
        Self { guest_cid: 3 }
    }
}

/// How the VM boots.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum BootSource {
    /// Direct kernel boot: the VMM loads the kernel and initramfs itself, no firmware or bootloader.
    LinuxDirect {
        /// Kernel image (an uncompressed PVH `vmlinux` boots fastest; a bzImage also works).
        kernel: PathBuf,
        /// Initial ramdisk, if any.
        initrd: Option<PathBuf>,
        /// Kernel command line (backend defaults are merged under it).
        #[serde(default)]
        cmdline: KernelCmdline,
    },
}

/// A disk attached as a virtio block device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Host path of the image.
    pub path: PathBuf,
    /// Attach read-only: guest writes fail.
    #[serde(default)]
    pub read_only: bool,
    /// Image format; `None` means detect it from the file's header.
    #[serde(default)]
    pub format: Option<DiskFormat>,
    /// Allow a host block device (`/dev/...`): refused unless set, so a
    /// typo or a hostile request cannot hand a whole host disk to a guest.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_device: bool,
    /// virtio-blk serial the guest sees (`/sys/block/vdX/serial`): letters,
    /// digits, `-`, `_`, at most 20 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

impl DiskSpec {
    /// A writable disk whose format is detected from its contents.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            read_only: false,
            format: None,
            allow_device: false,
            serial: None,
        }
    }

    /// Parses the CLI form `PATH[:ro|:rw][:dev]` (`:dev` allows a host
    /// block device).
    pub fn parse_cli(s: &str) -> Self {
        let (s, allow_device) = match s.strip_suffix(":dev") {
            Some(p) => (p, true),
            None => (s, false),
        };
        let mut d = match s.strip_suffix(":ro") {
            Some(p) => Self {
                read_only: true,
                ..Self::new(p)
            },
            None => Self::new(s.strip_suffix(":rw").unwrap_or(s)),
        };
        d.allow_device = allow_device;
        d
    }
}

/// A disk image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A plain byte-for-byte image.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

impl DiskFormat {
    /// The name QEMU and qemu-img use.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// The serial console.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSpec {
    /// Capture the console so the caller can read and write it.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Also append everything the guest prints to this file.
    #[serde(default)]
    pub log: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

impl Default for ConsoleSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            log: None,
        }
    }
}

/// Which accelerator runs the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM where a guest really runs under it (probed), TCG otherwise.
    #[default]
    Auto,
    /// Hardware virtualisation; fails if it does not work here.
    Kvm,
    /// Software emulation: slower, works everywhere.
    Tcg,
}

impl Accel {
    /// Lower-case name, as on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Accel {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(Error::invalid(
                "accel",
                format!("unknown accelerator {s:?}"),
                "use one of: auto, kvm, tcg",
            )),
        }
    }
}

/// What the host can give a VM; validation checks specs against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// Total host RAM in MiB.
    pub memory_mib: u64,
    /// Host CPUs.
    pub cpus: u32,
}

impl HostLimits {
    /// Reads the limits of this machine from `/proc/meminfo` and the scheduler.
    pub fn detect() -> Self {
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map(|kib| kib / 1024)
            .unwrap_or(u64::MAX);
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        Self { memory_mib, cpus }
    }
}

impl VmSpec {
    /// A spec booting `kernel` (+ `initrd`) with 1 vCPU and 512 MiB.
    pub fn linux(kernel: impl Into<PathBuf>, initrd: Option<PathBuf>) -> Self {
        Self {
            boot: BootSource::LinuxDirect {
                kernel: kernel.into(),
                initrd,
                cmdline: KernelCmdline::new(),
            },
            cpus: 1,
            memory_mib: 512,
            disks: Vec::new(),
            console: ConsoleSpec::default(),
            accel: Accel::Auto,
            vsock: None,
            shares: Vec::new(),
            rootfs: None,
            network: None,
            display: None,
        }
    }

    /// Checks the spec against the host and the files it names; fills in detected disk formats.
    ///
    /// Runs before any process starts, so a bad spec leaves nothing behind.
    pub fn validate(&mut self, host: &HostLimits) -> Result<()> {
        check_cpus(self.cpus)?;
        check_memory_mib(self.memory_mib)?;
        if self.cpus > host.cpus.max(1) {
            // More vCPUs than host CPUs cannot run at once; under TCG such a
            // guest may not even finish booting. Refuse instead of timing out.
            return Err(Error::invalid(
                "cpus",
                format!(
                    "{} vCPUs requested, but this host has {} CPUs",
                    self.cpus, host.cpus
                ),
                format!("ask for at most {} vCPUs", host.cpus.max(1)),
            ));
        }
        if self.memory_mib > host.memory_mib {
            return Err(Error::invalid(
                "memory",
                format!(
                    "{} MiB is more than this host's {} MiB",
                    self.memory_mib, host.memory_mib
                ),
                format!("ask for at most {} MiB", host.memory_mib),
            ));
        }
        let BootSource::LinuxDirect {
            kernel,
            initrd,
            cmdline,
        } = &self.boot;
        check_readable_file(
            "kernel",
            kernel,
            "pass --kernel PATH to a Linux kernel image, or set CAPSA_KERNEL",
        )?;
        if let Some(initrd) = initrd {
            check_readable_file(
                "initrd",
                initrd,
                "pass --initrd PATH to an existing initramfs",
            )?;
        }
        cmdline.render()?;
        if let Some(v) = &self.vsock {
            if v.guest_cid < 3 || v.guest_cid == u32::MAX {
                return Err(Error::invalid(
                    "vsock",
                    format!("guest CID {} is reserved", v.guest_cid),
                    "use a CID of 3 or more (each VM has its own device, so 3 is fine)",
                ));
            }
        }
        for disk in &self.disks {
            if let Some(serial) = &disk.serial {
                if serial.is_empty()
                    || serial.len() > MAX_DISK_SERIAL
                    || !serial
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    return Err(Error::invalid(
                        "disk",
                        format!("serial {serial:?} of {}", disk.path.display()),
                        format!("use 1-{MAX_DISK_SERIAL} letters, digits, '-' or '_'"),
                    ));
                }
            }
        }
        self.validate_rootfs()?;
        if let Some(n) = &self.network {
            n.validate()?;
        }
        if let Some(d) = &self.display {
            d.validate()?;
        }
        for disk in &mut self.disks {
            let format = probe_disk_format(&disk.path, disk.read_only, disk.allow_device).map_err(
                |source| Error::Disk {
                    path: disk.path.clone(),
                    source,
                },
            )?;
            if let Some(declared) = disk.format {
                if declared != format {
                    return Err(Error::invalid(
                        "disk",
                        format!(
                            "{} was declared {} but its contents are {}",
                            disk.path.display(),
                            declared.as_str(),
                            format.as_str()
                        ),
                        "drop the declared format and let capsa detect it",
                    ));
                }
            }
            disk.format = Some(format);
        }
        crate::share::validate_all(&mut self.shares)?;
        Ok(())
    }
}

fn check_readable_file(field: &'static str, path: &Path, fix: &str) -> Result<()> {
    match std::fs::File::open(path).and_then(|f| f.metadata()) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(Error::invalid(
            field,
            format!("{} is not a file", path.display()),
            fix,
        )),
        Err(e) => Err(Error::invalid(
            field,
            format!("cannot read {}: {e}", path.display()),
            fix,
        )),
    }
}

/// The one check of a vCPU count, whichever face asks (the host's own
/// count is checked later, by [`VmSpec::validate`]).
pub fn check_cpus(cpus: u32) -> Result<()> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(Error::invalid(
            "cpus",
            format!("{cpus} vCPUs requested"),
            format!("ask for 1 to {MAX_CPUS} vCPUs"),
        ));
    }
    Ok(())
}

/// The one check of a guest memory size in MiB, whichever face asks (the
/// host's own memory is checked later, by [`VmSpec::validate`]).
pub fn check_memory_mib(mib: u64) -> Result<()> {
    if mib < MIN_MEMORY_MIB {
        return Err(Error::invalid(
            "memory",
            format!("{mib} MiB is too little to boot Linux"),
            format!("ask for at least {MIN_MEMORY_MIB} MiB, e.g. --memory 512M"),
        ));
    }
    if mib > MAX_MEMORY_MIB {
        return Err(Error::invalid(
            "memory",
            format!("{mib} MiB is more than capsa gives a guest"),
            format!("ask for at most {MAX_MEMORY_MIB} MiB"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostLimits {
        HostLimits {
            memory_mib: 4096,
            cpus: 2,
        }
    }

    fn spec_with_kernel() -> (tempfile::TempDir, VmSpec) {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinux");
        std::fs::write(&k, b"kernel").unwrap();
        (dir, VmSpec::linux(k, None))
    }

    #[test]
    fn memory_limits() {
        let (_d, mut s) = spec_with_kernel();
        s.memory_mib = 0;
        let e = s.validate(&host()).unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidSpec {
                    field: "memory",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("Fix:"));
        s.memory_mib = 8192;
        assert!(matches!(
            s.validate(&host()),
            Err(Error::InvalidSpec {
                field: "memory",
                ..
            })
        ));
        s.memory_mib = 512;
        s.validate(&host()).unwrap();
    }

    #[test]
    fn cpus_and_kernel() {
        let (_d, mut s) = spec_with_kernel();
        s.cpus = 0;
        assert!(matches!(
            s.validate(&host()),
            Err(Error::InvalidSpec { field: "cpus", .. })
        ));
        // More vCPUs than host CPUs: refused with the host's count in the fix.
        s.cpus = host().cpus + 1;
        let e = s.validate(&host()).unwrap_err();
        assert!(matches!(e, Error::InvalidSpec { field: "cpus", .. }), "{e}");
        assert!(
            e.to_string().contains(&format!("at most {}", host().cpus)),
            "{e}"
        );
        s.cpus = host().cpus;
        s.validate(&host()).unwrap();
        let mut s = VmSpec::linux("/nonexistent/vmlinux", None);
        assert!(matches!(
            s.validate(&host()),
            Err(Error::InvalidSpec {
                field: "kernel",
                ..
            })
        ));
    }

    #[test]
    fn accel_parse() {
        assert_eq!("KVM".parse::<Accel>().unwrap(), Accel::Kvm);
        let e = "hvf".parse::<Accel>().unwrap_err();
        assert!(e.to_string().contains("auto, kvm, tcg"));
    }

    #[test]
    fn disk_cli_and_spec_json() {
        assert!(DiskSpec::parse_cli("a.img:ro").read_only);
        assert!(!DiskSpec::parse_cli("a.img").read_only);
        let (_d, s) = spec_with_kernel();
        let j = serde_json::to_string(&s).unwrap();
        let back: VmSpec = serde_json::from_str(&j).unwrap();
        assert_eq!(back, s);
        assert!(serde_json::from_str::<VmSpec>(&j.replacen("\"cpus\"", "\"cpuz\"", 1)).is_err());
    }
}
