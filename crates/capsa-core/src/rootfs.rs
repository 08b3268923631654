//! A root filesystem for the guest: a read-only image (one per OCI image
//! digest, converted by `capsa-oci`) plus a writable upper layer, and the
//! image's run configuration (`Env`, `WorkingDir`, `User`, `Entrypoint`,
//! `Cmd`).
//!
//! The image is attached as a read-only virtio-blk disk with the serial
//! [`ROOTFS_SERIAL`] (a disk upper with [`UPPER_SERIAL`]) and announced on
//! the kernel command line (`capsa.rootfs=FS`, `capsa.upper=tmpfs:MIB|disk`),
//! so the guest init finds it whatever the disk order. capsa's init and agent
//! stay in the initramfs; only user commands run inside the image's root.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{DiskFormat, DiskSpec, Error, Result, VmSpec};

/// virtio-blk serial of the read-only image disk.
pub const ROOTFS_SERIAL: &str = "capsa-rootfs";
/// virtio-blk serial of a disk upper layer.
pub const UPPER_SERIAL: &str = "capsa-upper";
/// Most entries in `Env`, `Entrypoint` and `Cmd` each.
pub const MAX_CONFIG_ITEMS: usize = 4096;
/// Most bytes of one `Env`/`Entrypoint`/`Cmd` entry.
pub const MAX_CONFIG_ITEM_BYTES: usize = 128 * 1024;
/// Most bytes of all of `Env`, `Entrypoint` and `Cmd` together.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;
/// Longest `User` accepted (`name[:group]` or `uid[:gid]`).
pub const MAX_USER_BYTES: usize = 256;
/// Smallest upper layer (tmpfs or disk).
pub const MIN_UPPER_MIB: u64 = 1;
/// Largest disk upper (1 TiB).
pub const MAX_DISK_UPPER_MIB: u64 = 1 << 20;

/// File system of the read-only image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootfsFormat {
    /// EROFS (what `capsa-oci` makes by default).
    Erofs,
    /// ext4, mounted read-only.
    Ext4,
}

impl RootfsFormat {
    /// The kernel's file system name.
    pub fn as_str(self) -> &'static str {
        match self {
            RootfsFormat::Erofs => "erofs",
            RootfsFormat::Ext4 => "ext4",
        }
    }
}

/// The writable layer over the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum UpperSpec {
    /// A size-capped tmpfs: lives in guest RAM, so a memory snapshot holds it
    /// and pools copy no disk. Writes past the cap fail with `ENOSPC`.
    Tmpfs {
        /// Cap in MiB (at most the guest's RAM).
        size_mib: u64,
    },
    /// An ext4 file system on a disk of its own (persistent across restarts
    /// of a named sandbox); created by the caller.
    Disk {
        /// Host path of the (raw, ext4-formatted) disk image.
        path: PathBuf,
    },
}

/// The image's run configuration, as in the OCI image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRunConfig {
    /// `KEY=VALUE` entries, applied under the sandbox's and the command's.
    #[serde(default)]
    pub env: Vec<String>,
    /// Default working directory (absolute).
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`, resolved in the image's
    /// `/etc/passwd` and `/etc/group`.
    #[serde(default)]
    pub user: Option<String>,
    /// Always run first; command arguments follow it.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// Default arguments (after the entrypoint) when no command is given.
    #[serde(default)]
    pub cmd: Vec<String>,
}

impl ImageRunConfig {
    /// What runs for `args` with Docker's rules: the entrypoint, then `args`
    /// if any, else `Cmd`. Empty if there is nothing to run.
    pub fn command(&self, args: &[String]) -> Vec<String> {
        let tail = if args.is_empty() { &self.cmd } else { args };
        self.entrypoint.iter().chain(tail).cloned().collect()
    }

    /// The `Env` entries as pairs (entries without `=` are skipped).
    pub fn env_pairs(&self) -> Vec<(String, String)> {
        self.env
            .iter()
            .filter_map(|e| e.split_once('='))
            .filter(|(k, _)| !k.is_empty())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn validate(&self) -> Result<()> {
        let bad = |what: String| {
            Error::invalid(
                "image config",
                what,
                "rebuild the image with a smaller config, or override it (--env, --workdir, --user, a command)",
            )
        };
        let mut total = 0usize;
        for (name, list) in [
            ("Env", &self.env),
            ("Entrypoint", &self.entrypoint),
            ("Cmd", &self.cmd),
        ] {
            if list.len() > MAX_CONFIG_ITEMS {
                return Err(bad(format!(
                    "{name} has {} entries (at most {MAX_CONFIG_ITEMS})",
                    list.len()
                )));
            }
            for item in list {
                if item.len() > MAX_CONFIG_ITEM_BYTES || item.contains('\0') {
                    return Err(bad(format!(
                        "a {name} entry is longer than {MAX_CONFIG_ITEM_BYTES} bytes or holds NUL"
                    )));
                }
                total += item.len();
            }
        }
        if total > MAX_CONFIG_BYTES {
            return Err(bad(format!(
                "Env, Entrypoint and Cmd hold {total} bytes (at most {MAX_CONFIG_BYTES})"
            )));
        }
        if let Some(w) = &self.working_dir {
            if !w.starts_with('/') || w.len() > 4096 || w.contains('\0') {
                return Err(bad(format!(
                    "WorkingDir {:?} is not an absolute path of at most 4096 bytes",
                    w.chars().take(80).collect::<String>()
                )));
            }
        }
        if let Some(u) = &self.user {
            if u.len() > MAX_USER_BYTES
                || u.bytes().any(|b| b.is_ascii_control() || b == b' ')
                || u.matches(':').count() > 1
            {
                return Err(bad(format!(
                    "User {:?} is not user[:group] of at most {MAX_USER_BYTES} bytes",
                    u.chars().take(80).collect::<String>()
                )));
            }
        }
        Ok(())
    }
}

/// Boot with a root filesystem (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootfsSpec {
    /// Host path of the converted read-only image (shared by every sandbox
    /// on that image; never written).
    pub image: PathBuf,
    /// Its file system.
    pub format: RootfsFormat,
    /// The OCI image digest (`sha256:<64 hex>`) it was made from: the
    /// identity of the image in base-snapshot keys and listings.
    pub digest: String,
    /// The writable layer.
    pub upper: UpperSpec,
    /// The image's run configuration.
    #[serde(default)]
    pub config: ImageRunConfig,
}

impl RootfsSpec {
    /// The default tmpfs cap for a guest of `memory_mib`: half its RAM.
    pub fn default_tmpfs_mib(memory_mib: u64) -> u64 {
        (memory_mib / 2).max(MIN_UPPER_MIB)
    }

    /// Checks the fields (not the files: [`VmSpec::validate`] probes disks).
    pub fn validate(&self, memory_mib: u64) -> Result<()> {
        let digest_ok = self
            .digest
            .strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        if !digest_ok {
            return Err(Error::invalid(
                "rootfs",
                format!(
                    "image digest {:?} is not sha256:<64 hex digits>",
                    self.digest.chars().take(80).collect::<String>()
                ),
                "take the digest from `capsa image ls` (the image store records it)",
            ));
        }
        match &self.upper {
            UpperSpec::Tmpfs { size_mib } => {
                if *size_mib < MIN_UPPER_MIB || *size_mib > memory_mib {
                    return Err(Error::invalid(
                        "rootfs",
                        format!(
                            "a tmpfs upper of {size_mib} MiB in a guest of {memory_mib} MiB \
                             (it lives in guest RAM)"
                        ),
                        format!(
                            "ask for {MIN_UPPER_MIB} to {memory_mib} MiB (--tmpfs-upper), more \
                             memory, or a disk upper (--disk-upper SIZE)"
                        ),
                    ));
                }
            }
            UpperSpec::Disk { path } => {
                if path.as_os_str().is_empty() {
                    return Err(Error::invalid(
                        "rootfs",
                        "the disk upper has no path",
                        "name the upper disk's file",
                    ));
                }
            }
        }
        self.config.validate()
    }

    /// The kernel command line values the guest init reads.
    pub fn cmdline_values(&self) -> [(&'static str, String); 2] {
        let upper = match &self.upper {
            UpperSpec::Tmpfs { size_mib } => format!("tmpfs:{size_mib}"),
            UpperSpec::Disk { .. } => "disk".to_string(),
        };
        [
            ("capsa.rootfs", self.format.as_str().to_string()),
            ("capsa.upper", upper),
        ]
    }
}

impl VmSpec {
    /// Boots this VM with `rootfs`: records it, attaches the image read-only
    /// (and a disk upper) with their serials, and sets the command line the
    /// guest init reads. Replaces an earlier rootfs.
    pub fn set_rootfs(&mut self, rootfs: RootfsSpec) -> Result<()> {
        self.disks.retain(
            |d| !matches!(d.serial.as_deref(), Some(s) if s == ROOTFS_SERIAL || s == UPPER_SERIAL),
        );
        self.disks.push(DiskSpec {
            read_only: true,
            format: Some(DiskFormat::Raw),
            serial: Some(ROOTFS_SERIAL.to_string()),
            ..DiskSpec::new(&rootfs.image)
        });
        if let UpperSpec::Disk { path } = &rootfs.upper {
            self.disks.push(DiskSpec {
                format: Some(DiskFormat::Raw),
                serial: Some(UPPER_SERIAL.to_string()),
                ..DiskSpec::new(path)
            });
        }
        let crate::BootSource::LinuxDirect { cmdline, .. } = &mut self.boot;
        for (k, v) in rootfs.cmdline_values() {
            cmdline.set(k, &v)?;
        }
        self.rootfs = Some(rootfs);
        Ok(())
    }

    /// With a rootfs: its fields are valid and the disks and command line
    /// match it (a hand-edited `spec.json` cannot boot a different image than
    /// the one it names).
    pub(crate) fn validate_rootfs(&self) -> Result<()> {
        let serial_count = |s: &str| {
            self.disks
                .iter()
                .filter(|d| d.serial.as_deref() == Some(s))
                .count()
        };
        let Some(r) = &self.rootfs else {
            if serial_count(ROOTFS_SERIAL) + serial_count(UPPER_SERIAL) > 0 {
                return Err(Error::invalid(
                    "disk",
                    format!("disk serials {ROOTFS_SERIAL} and {UPPER_SERIAL} are capsa's own"),
                    "give the disk another serial, or boot an image with --image",
                ));
            }
            return Ok(());
        };
        r.validate(self.memory_mib)?;
        let mismatch = |what: &str| {
            Error::invalid(
                "rootfs",
                format!("the spec's disks or command line do not match its rootfs ({what})"),
                "build the spec with VmSpec::set_rootfs",
            )
        };
        let image = self
            .disks
            .iter()
            .find(|d| d.serial.as_deref() == Some(ROOTFS_SERIAL));
        match image {
            Some(d) if serial_count(ROOTFS_SERIAL) == 1 && d.read_only && d.path == r.image => {}
            _ => return Err(mismatch("image disk")),
        }
        let want_upper = usize::from(matches!(r.upper, UpperSpec::Disk { .. }));
        if serial_count(UPPER_SERIAL) != want_upper {
            return Err(mismatch("upper disk"));
        }
        if let UpperSpec::Disk { path } = &r.upper {
            let d = self
                .disks
                .iter()
                .find(|d| d.serial.as_deref() == Some(UPPER_SERIAL));
            // A restored VM writes to an overlay of the frozen upper: the
            // path differs then, the serial and writability do not.
            let _ = path;
            if d.is_none_or(|d| d.read_only) {
                return Err(mismatch("upper disk"));
            }
        }
        let crate::BootSource::LinuxDirect { cmdline, .. } = &self.boot;
        for (k, v) in r.cmdline_values() {
            if cmdline.get(k) != Some(Some(v.as_str())) {
                return Err(mismatch(k));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HostLimits;

    fn rootfs(dir: &std::path::Path) -> RootfsSpec {
        let img = dir.join("img.erofs");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        RootfsSpec {
            image: img,
            format: RootfsFormat::Erofs,
            digest: format!("sha256:{}", "ab".repeat(32)),
            upper: UpperSpec::Tmpfs { size_mib: 64 },
            config: ImageRunConfig::default(),
        }
    }

    fn spec(dir: &std::path::Path) -> VmSpec {
        let k = dir.join("vmlinux");
        std::fs::write(&k, b"kernel").unwrap();
        VmSpec::linux(k, None)
    }

    #[test]
    fn set_rootfs_attaches_and_validates() {
        let d = tempfile::tempdir().unwrap();
        let host = HostLimits {
            memory_mib: 4096,
            cpus: 2,
        };
        let mut s = spec(d.path());
        s.set_rootfs(rootfs(d.path())).unwrap();
        s.validate(&host).unwrap();
        assert_eq!(s.disks.len(), 1);
        assert!(s.disks[0].read_only);
        let crate::BootSource::LinuxDirect { cmdline, .. } = &s.boot;
        let line = cmdline.render().unwrap();
        assert!(line.contains("capsa.rootfs=erofs"), "{line}");
        assert!(line.contains("capsa.upper=tmpfs:64"), "{line}");
        // Setting it again replaces, never duplicates.
        s.set_rootfs(rootfs(d.path())).unwrap();
        assert_eq!(s.disks.len(), 1);
        // JSON round trip keeps it.
        let back: VmSpec = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);

        // A tampered spec: the disk no longer the image the rootfs names.
        let mut t = s.clone();
        t.disks[0].path = d.path().join("vmlinux");
        assert!(t.validate(&host).unwrap_err().to_string().contains("match"));
        // Serials are capsa's own without a rootfs.
        let mut u = s.clone();
        u.rootfs = None;
        assert!(u.validate(&host).is_err());
    }

    #[test]
    fn bounds_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let mut r = rootfs(d.path());
        r.upper = UpperSpec::Tmpfs { size_mib: 8192 };
        let e = r.validate(512).unwrap_err().to_string();
        assert!(e.contains("--tmpfs-upper"), "{e}");
        let mut r = rootfs(d.path());
        r.digest = "sha256:xyz".into();
        assert!(r.validate(512).is_err());
        let mut r = rootfs(d.path());
        r.config.env = vec!["A=b".into(); MAX_CONFIG_ITEMS + 1];
        assert!(r.validate(512).is_err());
        let mut r = rootfs(d.path());
        r.config.working_dir = Some("relative".into());
        assert!(r.validate(512).is_err());
        let mut r = rootfs(d.path());
        r.config.user = Some("a:b:c".into());
        assert!(r.validate(512).is_err());
        let mut r = rootfs(d.path());
        r.config.cmd = vec!["x".repeat(MAX_CONFIG_ITEM_BYTES + 1)];
        assert!(r.validate(512).is_err());
    }

    #[test]
    fn docker_command_rules() {
        let c = ImageRunConfig {
            entrypoint: vec!["/ep".into(), "-x".into()],
            cmd: vec!["def".into()],
            ..Default::default()
        };
        assert_eq!(c.command(&[]), ["/ep", "-x", "def"]);
        assert_eq!(c.command(&["a".into()]), ["/ep", "-x", "a"]);
        let c = ImageRunConfig {
            cmd: vec!["/bin/sh".into()],
            ..Default::default()
        };
        assert_eq!(c.command(&["ls".into()]), ["ls"]);
        assert!(ImageRunConfig::default().command(&[]).is_empty());
        let c = ImageRunConfig {
            env: vec!["A=1".into(), "bad".into(), "=x".into(), "B=x=y".into()],
            ..Default::default()
        };
        assert_eq!(
            c.env_pairs(),
            [("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
    }
}
