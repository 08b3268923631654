//! Shared directories: one virtiofsd per share, confined by capsa, plugged
//! into QEMU as `vhost-user-fs-pci` (at start, or hot-plugged later).
//!
//! virtiofsd is QEMU 7.2's C daemon (`/usr/lib/qemu/virtiofsd`, from
//! `qemu-system-common`, so present wherever QEMU is). It sandboxes itself
//! (mount, pid and net namespaces, `pivot_root` into the shared directory,
//! seccomp, capabilities dropped), which keeps symlinks inside the share from
//! leading out. What it cannot do on its own (no read-only option, no uid
//! mapping in 7.2) capsa does around it, before it runs:
//!
//! 1. In a private mount namespace (as root), the share is bind-mounted
//!    (not recursively: mounts below it are not shared) onto `/tmp` there,
//!    and for a read-only share remounted read-only. virtiofsd serves that.
//! 2. capsa drops to the share directory's owner (uid/gid) and makes a user
//!    namespace mapping only that owner to root. virtiofsd runs as that
//!    "root": files the guest creates belong to the owner on the host, and
//!    the guest can reach no more than the owner can.
//! 3. The read-only mount was made in the more privileged namespace, so the
//!    kernel locks it read-only in the new one: not even a compromised
//!    virtiofsd can remount it read-write.
//!
//! Its vhost-user socket is a listening socket capsa binds in QEMU's directory
//! (handed to QEMU's user) and passes to virtiofsd as `--fd=3`.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use capsa_core::{Error, Result, ShareSpec};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::jail::Creds;

/// Environment variable naming the virtiofsd binary to use.
pub const VIRTIOFSD_ENV: &str = "CAPSA_VIRTIOFSD";

/// Where virtiofsd is looked for when [`VIRTIOFSD_ENV`] is unset.
const VIRTIOFSD_PATHS: &[&str] = &[
    "/usr/lib/qemu/virtiofsd",
    "/usr/libexec/virtiofsd",
    "/usr/lib/virtiofsd",
];

/// The path the share appears at inside virtiofsd's mount namespace.
const SERVED_AT: &str = "/tmp";

/// How long the guest gets to release an unplugged device.
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether this process can run shares: it must be root (virtiofsd 7.2
/// confines itself only as root, and capsa switches it to the share's owner).
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Why shares need root: virtiofsd 7.2 must be root (or root of a user
/// namespace it can drop supplementary groups in, which an unprivileged
/// user's namespace forbids), and capsa must switch to the share's owner.
fn not_root() -> Error {
    Error::Unsupported {
        backend: "qemu".into(),
        what: "shared directories when capsa does not run as root (virtiofsd must start as \
               root to confine itself and to map files to the directory's owner)"
            .into(),
        fix: "run capsa or capsad as root (as in CI and under systemd), or copy files with \
              `capsa cp` / --copy-in and --copy-out"
            .into(),
    }
}

/// Finds virtiofsd: `$CAPSA_VIRTIOFSD`, else the Debian/Fedora locations, else `PATH`.
pub fn find_virtiofsd() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(VIRTIOFSD_ENV) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        return Err(no_virtiofsd(&format!("{VIRTIOFSD_ENV}={}", p.display())));
    }
    for p in VIRTIOFSD_PATHS {
        if Path::new(p).is_file() {
            return Ok(PathBuf::from(p));
        }
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let c = dir.join("virtiofsd");
        if c.is_file() {
            return Ok(c);
        }
    }
    Err(no_virtiofsd(&format!(
        "{VIRTIOFSD_ENV}, {} and PATH",
        VIRTIOFSD_PATHS.join(", ")
    )))
}

fn no_virtiofsd(looked: &str) -> Error {
    Error::Backend {
        backend: "qemu",
        message: format!("shared directories need virtiofsd, which is not in {looked}"),
        fix: Some(
            "install it (apt-get install qemu-system-common), or point CAPSA_VIRTIOFSD at it"
                .into(),
        ),
        source: None,
    }
}

fn share_error(share: &ShareSpec, message: String) -> Error {
    Error::Backend {
        backend: "qemu",
        message: format!(
            "share {} -> {}: {message}",
            share.host.display(),
            share.guest
        ),
        fix: None,
        source: None,
    }
}

/// One running virtiofsd.
#[derive(Debug)]
pub(crate) struct Virtiofsd {
    child: tokio::process::Child,
    socket: PathBuf,
}

impl Virtiofsd {
    /// Ends it and waits for it (its sandboxed child follows: virtiofsd sets
    /// `PR_SET_PDEATHSIG` on it).
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// A share plugged into the VM.
#[derive(Debug)]
pub(crate) struct ActiveShare {
    pub spec: ShareSpec,
    pub daemon: Virtiofsd,
}

/// Starts a confined virtiofsd for `share` listening at `socket` (which is
/// handed to QEMU's user `qemu`), in the VM's cgroup when `cgroup_procs`
/// holds its `cgroup.procs` handles. The share must have been validated.
pub(crate) fn spawn(
    share: &ShareSpec,
    socket: &Path,
    qemu: Option<Creds>,
    cgroup_procs: &[std::fs::File],
) -> Result<Virtiofsd> {
    let binary = find_virtiofsd()?;
    let meta = std::fs::metadata(&share.host)
        .map_err(|e| share_error(share, format!("cannot inspect the host directory: {e}")))?;
    if !meta.is_dir() {
        return Err(share_error(
            share,
            "the host path is not a directory".into(),
        ));
    }
    // As root, virtiofsd becomes the directory's owner (see the module docs).
    if !running_as_root() {
        return Err(not_root());
    }
    let (uid, gid) = (meta.uid(), meta.gid());

    let _ = std::fs::remove_file(socket);
    let listener = std::os::unix::net::UnixListener::bind(socket)
        .map_err(|e| Error::io(format!("binding {}", socket.display()), e))?;
    if let Some(c) = qemu {
        std::os::unix::fs::chown(socket, Some(c.uid), Some(c.gid))
            .map_err(|e| Error::io(format!("handing {} to QEMU's user", socket.display()), e))?;
    }
    let listen_fd = OwnedFd::from(listener);

    // Everything the child needs, made before fork: no allocation after it.
    let cstr = |s: &str| CString::new(s).map_err(|_| share_error(share, "path holds NUL".into()));
    let host = CString::new(share.host.as_os_str().as_encoded_bytes())
        .map_err(|_| share_error(share, "host path holds NUL".into()))?;
    let served = cstr(SERVED_AT)?;
    let slash = cstr("/")?;
    let uid_map_path = cstr("/proc/self/uid_map")?;
    let gid_map_path = cstr("/proc/self/gid_map")?;
    let setgroups_path = cstr("/proc/self/setgroups")?;
    let outer_uid_map = format!("0 {uid} 1\n").into_bytes();
    let outer_gid_map = format!("0 {gid} 1\n").into_bytes();
    let deny = b"deny".to_vec();
    let read_only = share.read_only();
    let nofile = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20)
        .min(1_000_000);
    let src_fd = listen_fd.as_raw_fd();
    let procs: Vec<std::os::fd::RawFd> = cgroup_procs.iter().map(|f| f.as_raw_fd()).collect();
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };

    let mut cmd = tokio::process::Command::new(&binary);
    cmd.arg("--fd=3")
        .arg("-o")
        .arg(format!("source={SERVED_AT}"))
        // capsa raises the limit before dropping privileges; inside the user
        // namespace virtiofsd could not.
        .arg("--rlimit-nofile=0")
        .arg("-o")
        .arg("log_level=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: only async-signal-safe calls (setpgid, write, setrlimit, unshare, mount,
    // set*id, prctl, open/write/close, dup2) between fork and exec, on data
    // prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let check = |rc: libc::c_int| {
                if rc < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            let write_file = |path: &CString, data: &[u8]| -> std::io::Result<()> {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, data.as_ptr().cast(), data.len());
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if n != data.len() as isize {
                    return Err(err);
                }
                Ok(())
            };
            let map_to = |u: &[u8], g: &[u8]| -> std::io::Result<()> {
                // EACCES/ENOENT on "setgroups" only means an older kernel.
                let _ = write_file(&setgroups_path, &deny);
                write_file(&uid_map_path, u)?;
                write_file(&gid_map_path, g)
            };
            let bind_share = || -> std::io::Result<()> {
                check(libc::mount(
                    std::ptr::null(),
                    slash.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                check(libc::mount(
                    host.as_ptr(),
                    served.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))?;
                if read_only {
                    check(libc::mount(
                        std::ptr::null(),
                        served.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND
                            | libc::MS_REMOUNT
                            | libc::MS_RDONLY
                            | libc::MS_NOSUID
                            | libc::MS_NODEV,
                        std::ptr::null(),
                    ))?;
                }
                Ok(())
            };
            // Own process group: a Ctrl-C on the terminal goes to capsa, not here.
            libc::setpgid(0, 0);
            // Into the VM's cgroup while still privileged: the share's work
            // (and its page cache) counts against the VM, as QEMU's does.
            for fd in &procs {
                if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            check(libc::dup2(src_fd, 3))?;
            // One fd per inode the guest looks up: the default 1024 would not
            // survive a `find` over a source tree.
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            check(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim))?;
            lim.rlim_cur = nofile;
            lim.rlim_max = lim.rlim_max.max(nofile);
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            check(libc::unshare(libc::CLONE_NEWNS))?;
            bind_share()?;
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setgid(gid))?;
            check(libc::setuid(uid))?;
            // setuid cleared it; without it /proc/self/*_map belong to root.
            check(libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0))?;
            // The bind above was made in a more privileged namespace: in this
            // one the kernel locks it read-only.
            check(libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS))?;
            map_to(&outer_uid_map, &outer_gid_map)?;
            // If the VM's owner dies, so does virtiofsd (set after setuid, which clears it).
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    tracing::debug!(binary = %binary.display(), host = %share.host.display(), uid, gid, read_only, "spawning virtiofsd");
    let mut child = cmd.spawn().map_err(|e| {
        share_error(
            share,
            format!("cannot start virtiofsd ({}): {e}", binary.display()),
        )
    })?;
    drop(listen_fd);
    if let Some(stderr) = child.stderr.take() {
        let pid = child.id().unwrap_or(0);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            // Debug: it warns about routine events (the guest unplugging).
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::debug!(target: "capsa_qemu::virtiofsd", pid, "{line}");
            }
        });
    }
    Ok(Virtiofsd {
        child,
        socket: socket.to_path_buf(),
    })
}

/// The error a snapshot of a VM with shares attached gets: QEMU 7.2 cannot
/// save `vhost-user-fs` devices.
pub(crate) fn snapshot_refusal(shares: &[ShareSpec]) -> Error {
    let list = shares
        .iter()
        .map(|s| format!("{} (host {})", s.guest, s.host.display()))
        .collect::<Vec<_>>()
        .join(", ");
    let rm = shares
        .iter()
        .map(|s| format!("`capsa share rm <sandbox> {}`", s.guest))
        .collect::<Vec<_>>()
        .join(", then ");
    Error::invalid(
        "snapshot",
        format!(
            "the sandbox has shared directories attached at {list}, and a snapshot cannot hold \
             a shared directory (QEMU cannot save virtio-fs devices)"
        ),
        format!(
            "detach them first ({rm}, or Sandbox::share_remove), snapshot, then attach them \
             again to the source and to each restored sandbox"
        ),
    )
}

/// Waits until QEMU has dropped device `id` from its tree (the guest has acknowledged the unplug).
pub(crate) async fn wait_unplugged(inst: &crate::QemuInstance, id: &str) -> Result<()> {
    use qapi::qmp;
    let deadline = tokio::time::Instant::now() + UNPLUG_TIMEOUT;
    loop {
        let props = inst
            .exec(
                "qom-list",
                qmp::qom_list {
                    path: "/machine/peripheral".into(),
                },
            )
            .await?;
        if !props.iter().any(|p| p.name == id) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Error::Backend {
                backend: "qemu",
                message: format!("the guest did not release device {id} within {UNPLUG_TIMEOUT:?}"),
                fix: Some(
                    "the guest kernel must handle ACPI PCI hot-unplug; is the guest hung?".into(),
                ),
                source: None,
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `chardev-add` of a vhost-user client socket at `path` (shares, and the
/// vsock device plugged back after a snapshot).
pub(crate) async fn add_chardev(inst: &crate::QemuInstance, id: &str, path: &Path) -> Result<()> {
    use qapi::qmp;
    let backend = qmp::ChardevBackend::socket(qmp::ChardevSocketWrapper {
        data: qmp::ChardevSocket {
            base: qmp::ChardevCommon {
                logappend: None,
                logfile: None,
            },
            addr: qmp::SocketAddressLegacy::unix(qmp::UnixSocketAddressWrapper {
                data: qmp::UnixSocketAddress {
                    path: path.to_string_lossy().into_owned(),
                    abstract_: None,
                    tight: None,
                },
            }),
            server: Some(false),
            nodelay: None,
            reconnect: None,
            telnet: None,
            tls_authz: None,
            tls_creds: None,
            tn3270: None,
            wait: None,
            websocket: None,
        },
    });
    inst.exec(
        "chardev-add",
        qmp::chardev_add {
            id: id.into(),
            backend,
        },
    )
    .await
    .map(|_| ())
}

/// `chardev-remove`, retried while the unplugged device still holds it.
pub(crate) async fn remove_chardev(inst: &crate::QemuInstance, id: &str) -> Result<()> {
    use qapi::qmp;
    let deadline = tokio::time::Instant::now() + UNPLUG_TIMEOUT;
    loop {
        match inst
            .exec("chardev-remove", qmp::chardev_remove { id: id.into() })
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}
