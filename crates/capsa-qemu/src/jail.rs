//! Confinement of the QEMU process, modelled on Firecracker's jailer.
//!
//! - **seccomp**: QEMU runs with `-sandbox` ([`crate::args::SANDBOX`]).
//! - **user**: when capsa runs as root, QEMU runs as a uid/gid of its own,
//!   leased from a reserved range (`CAPSA_JAIL_UIDS`) for this VM alone, with
//!   no supplementary groups (but `/dev/kvm`'s group under KVM) and
//!   `no_new_privs`. It owns only its jail directory
//!   (`CAPSA_JAIL_DIR/<n>`, mode 0700), where its sockets live; it gets the
//!   kernel, initrd and disks as inherited fds, so it needs no path into
//!   capsa's state or cache directories, and another VM's uid cannot open them.
//! - **cgroup**: QEMU joins a per-VM cgroup ([`crate::cgroup`]) before exec.
//!
//! A lease is an `flock` on `<jail dir>/.leases/<n>`, held by the process
//! that runs the VM until QEMU has been reaped: it is released by the
//! kernel if that process dies, so a crash never leaks a uid.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use capsa_core::{Accel, BootSource, Confinement, DiskFormat, Error, Result, VmSpec};

use crate::args::{DiskFds, FileFds};
use crate::cgroup::Cgroup;

/// The uid/gid a confined QEMU runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Creds {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// One supplementary group kept (`/dev/kvm`'s, when the VM uses KVM).
    pub extra_gid: Option<u32>,
}

/// Everything QEMU's confinement holds for one VM; dropped once QEMU is reaped.
#[derive(Debug)]
pub(crate) struct Jail {
    /// Where QEMU's sockets live (its jail directory, or the run directory
    /// when it runs as capsa's user).
    pub dir: PathBuf,
    /// Remove `dir` when done (it is the jail directory).
    owned_dir: bool,
    /// Who QEMU runs as, when not as capsa's user.
    pub creds: Option<Creds>,
    /// The uid lease (an flock'd file).
    _lease: Option<File>,
    /// The VM's cgroup, when there is one.
    pub cgroup: Option<Cgroup>,
    /// Run QEMU under `-sandbox`.
    pub seccomp: bool,
    /// Files QEMU inherits: (fd held here, fd number in QEMU).
    pub pass: Vec<(OwnedFd, i32)>,
}

/// First fd number handed out to passed files (3 is guest RAM).
const FIRST_PASSED_FD: i32 = crate::instance::RAM_FD + 1;

impl Jail {
    /// Prepares confinement for `spec` as configured. `backing` names, per
    /// disk, a read-only base image QEMU must reach beneath that disk (a
    /// restored VM's overlay), which a confined QEMU cannot open by path.
    pub fn prepare(
        conf: &Confinement,
        run_dir: &Path,
        spec: &VmSpec,
        accel: Accel,
        backing: &[Option<(PathBuf, DiskFormat)>],
    ) -> Result<(Jail, Option<FileFds>)> {
        let cgroup = if conf.cgroup {
            match Cgroup::create(spec.cpus, spec.memory_mib) {
                Ok(c) => Some(c),
                Err(why) => {
                    crate::cgroup::note_unavailable(&why);
                    None
                }
            }
        } else {
            None
        };
        let mut jail = Jail {
            dir: run_dir.to_path_buf(),
            owned_dir: false,
            creds: None,
            _lease: None,
            cgroup,
            seccomp: conf.seccomp,
            pass: Vec::new(),
        };
        // SAFETY: geteuid has no preconditions.
        if !conf.user || unsafe { libc::geteuid() } != 0 {
            return Ok((jail, None));
        }
        let (n, lease) = lease(conf)?;
        let id = conf.uid_base + n;
        let extra_gid = if accel == Accel::Kvm {
            std::fs::metadata("/dev/kvm").ok().map(|m| m.gid())
        } else {
            None
        };
        let creds = Creds {
            uid: id,
            gid: id,
            extra_gid,
        };
        let dir = conf.jail_dir.join(n.to_string());
        fresh_private_dir(&dir, creds)?;
        jail.dir = dir;
        jail.owned_dir = true;
        jail.creds = Some(creds);
        jail._lease = Some(lease);
        let files = jail.open_files(spec, backing)?;
        Ok((jail, Some(files)))
    }

    fn pass(&mut self, path: &Path, write: bool) -> Result<i32> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|e| Error::io(format!("opening {} for QEMU", path.display()), e))?;
        let n = FIRST_PASSED_FD + self.pass.len() as i32;
        self.pass.push((OwnedFd::from(f), n));
        Ok(n)
    }

    fn open_files(
        &mut self,
        spec: &VmSpec,
        backing: &[Option<(PathBuf, DiskFormat)>],
    ) -> Result<FileFds> {
        let BootSource::LinuxDirect { kernel, initrd, .. } = &spec.boot;
        let mut files = FileFds {
            kernel: self.pass(kernel, false)?,
            initrd: match initrd {
                Some(p) => Some(self.pass(p, false)?),
                None => None,
            },
            disks: Vec::new(),
        };
        let mut set = 0u32;
        for (i, d) in spec.disks.iter().enumerate() {
            let base = backing.get(i).cloned().flatten();
            let format = d.format.unwrap_or(DiskFormat::Raw);
            if base.is_none()
                && format == DiskFormat::Qcow2
                && crate::snapshot::qcow2_has_backing(&d.path).unwrap_or(false)
            {
                return Err(Error::InvalidSpec {
                    field: "disk",
                    problem: format!(
                        "{} is a qcow2 image with a backing file, which QEMU running as an \
                         unprivileged user cannot open by its path",
                        d.path.display()
                    ),
                    fix: "flatten it (`qemu-img convert -O qcow2 IN OUT`), or run QEMU as \
                          capsa's user with CAPSA_CONFINE=seccomp,cgroup"
                        .into(),
                });
            }
            // Both access modes for a writable disk: QEMU may reopen it read-only.
            let mut fds = vec![self.pass(&d.path, !d.read_only)?];
            if !d.read_only {
                fds.push(self.pass(&d.path, false)?);
            }
            set += 1;
            let disk_set = set;
            let backing = match base {
                Some((p, f)) => {
                    set += 1;
                    Some((f, set, vec![self.pass(&p, false)?]))
                }
                None => None,
            };
            files.disks.push(DiskFds {
                set: disk_set,
                fds,
                backing,
            });
        }
        Ok(files)
    }

    /// (fd here, fd number in QEMU) pairs, for the child's fd table.
    pub fn fd_map(&self) -> Vec<(RawFd, i32)> {
        self.pass.iter().map(|(f, n)| (f.as_raw_fd(), *n)).collect()
    }

    /// The TCG translation cache bound that keeps QEMU within its cgroup.
    pub fn tb_size_mib(&self) -> Option<u32> {
        self.cgroup.as_ref().map(|_| crate::cgroup::TCG_TB_SIZE_MIB)
    }

    /// Hands a socket file capsa made in the jail directory to QEMU's user.
    pub fn give(&self, path: &Path) -> Result<()> {
        if let Some(c) = self.creds {
            std::os::unix::fs::chown(path, Some(c.uid), Some(c.gid))
                .map_err(|e| Error::io(format!("handing {} to QEMU's user", path.display()), e))?;
        }
        Ok(())
    }

    /// Passes `fd` to QEMU; returns its number there.
    pub fn pass_fd(&mut self, fd: OwnedFd) -> i32 {
        let n = self
            .pass
            .iter()
            .map(|(_, n)| *n + 1)
            .max()
            .unwrap_or(FIRST_PASSED_FD)
            .max(FIRST_PASSED_FD);
        self.pass.push((fd, n));
        n
    }

    /// Closes the passed files (QEMU has its own copies once it runs).
    pub fn release_files(&mut self) {
        self.pass.clear();
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        if self.owned_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Leases the first free per-sandbox uid index.
fn lease(conf: &Confinement) -> Result<(u32, File)> {
    let leases = conf.jail_dir.join(".leases");
    root_dir(&conf.jail_dir, 0o711)?;
    root_dir(&leases, 0o700)?;
    for n in 0..conf.uid_count {
        let p = leases.join(n.to_string());
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(|e| Error::io(format!("opening the uid lease {}", p.display()), e))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok((n, f));
        }
    }
    Err(Error::Backend {
        backend: "qemu",
        message: format!(
            "all {} per-sandbox uids from {} are in use",
            conf.uid_count, conf.uid_base
        ),
        fix: Some(format!(
            "stop some sandboxes, or widen the range with {}=BASE:COUNT",
            capsa_core::JAIL_UIDS_ENV
        )),
        source: None,
    })
}

/// Makes (or checks) a root-owned directory with `mode`, refusing one
/// planted by someone else or a symlink.
fn root_dir(dir: &Path, mode: u32) -> Result<()> {
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(format!("creating {}", dir.display()), e)),
    }
    let md = std::fs::symlink_metadata(dir)
        .map_err(|e| Error::io(format!("checking {}", dir.display()), e))?;
    if !md.is_dir() || md.uid() != 0 || md.mode() & 0o022 != 0 {
        return Err(Error::Backend {
            backend: "qemu",
            message: format!(
                "{} is not a root-owned directory closed to others (uid {}, mode {:o})",
                dir.display(),
                md.uid(),
                md.mode() & 0o7777
            ),
            fix: Some(format!(
                "remove it, or point {} elsewhere",
                capsa_core::JAIL_DIR_ENV
            )),
            source: None,
        });
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(format!("setting the mode of {}", dir.display()), e))
}

/// An empty directory owned by `creds`, mode 0700 (a leftover of a crashed
/// holder of the same lease is cleared first).
fn fresh_private_dir(dir: &Path, creds: Creds) -> Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(md) if md.is_dir() => std::fs::remove_dir_all(dir),
        Ok(_) => std::fs::remove_file(dir),
        Err(_) => Ok(()),
    }
    .map_err(|e| Error::io(format!("clearing {}", dir.display()), e))?;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    std::os::unix::fs::chown(dir, Some(creds.uid), Some(creds.gid))
        .map_err(|e| Error::io(format!("handing {} to QEMU's user", dir.display()), e))
}
