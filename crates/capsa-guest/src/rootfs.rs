//! The image root filesystem (`capsa.rootfs=`): the read-only image disk, a
//! writable upper (size-capped tmpfs or a disk), an overlay of both at
//! [`ROOT`], and the paths user commands and file requests resolve inside it.
//!
//! capsa's init and agent stay in the initramfs: only exec'd commands enter
//! the image (chroot in the child, after fork), and the agent's file requests
//! resolve paths with `openat2(RESOLVE_IN_ROOT)` from a directory fd of the
//! root, so an absolute symlink or `..` in the image leads back into the
//! image, never into the initramfs. An image therefore cannot replace or
//! break the agent: a distroless or musl image works the same.

use std::ffi::CString;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::cmdline::{RootfsBoot, Upper};
use crate::console::debug;

/// Where the merged root is mounted.
pub const ROOT: &str = "/run/capsa/root";
const LOWER: &str = "/run/capsa/lower";
const UPPER: &str = "/run/capsa/upper";
/// virtio-blk serials the host gives the disks (see `capsa_core::ROOTFS_SERIAL`).
const ROOTFS_SERIAL: &str = "capsa-rootfs";
const UPPER_SERIAL: &str = "capsa-upper";
/// How long the disks may take to show up after their driver loaded.
const DEVICE_WAIT: Duration = Duration::from_secs(10);
/// Most block devices looked at.
const MAX_BLOCK_DEVICES: usize = 256;

/// The mounted root: its path (for chroot) and an `O_PATH` fd (for openat2).
#[derive(Debug)]
pub struct RootDir {
    fd: OwnedFd,
    path: CString,
}

static ROOTFS: OnceLock<RootDir> = OnceLock::new();

/// The image root, if this guest booted with one.
pub fn root() -> Option<&'static RootDir> {
    ROOTFS.get()
}

impl RootDir {
    /// The root's path, NUL-terminated (for `chroot` in a child).
    pub fn path(&self) -> &CString {
        &self.path
    }

    /// Opens `path` (absolute or relative, interpreted inside the root)
    /// with `flags`; symlinks and `..` cannot leave the root.
    pub fn open(&self, path: &Path, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
        open_in(self.fd.as_raw_fd(), path, flags, mode)
    }

    /// `stat` of `path` inside the root, following symlinks (inside it).
    pub fn stat(&self, path: &Path) -> io::Result<libc::stat> {
        let fd = self.open(path, libc::O_PATH, 0)?;
        fstat(fd.as_raw_fd())
    }

    /// A host path naming the same file as `path` inside the root, with its
    /// directory resolved in the root and the last component left for the
    /// caller's call (so `lstat`, `unlink`, `rename`, `mkdir` act on the
    /// entry itself, not a symlink's target). Keep the fd while the path is used.
    pub fn entry(&self, path: &Path) -> io::Result<(OwnedFd, PathBuf)> {
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path names no entry"))?;
        let parent = path.parent().unwrap_or(Path::new("/"));
        let dir = self.open(parent, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        let p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
        Ok((dir, p))
    }

    /// A host path of `path` inside the root with every component resolved
    /// there (symlinks followed inside the root). Keep the fd while the path is used.
    pub fn resolved(&self, path: &Path) -> io::Result<(OwnedFd, PathBuf)> {
        let fd = self.open(path, libc::O_PATH, 0)?;
        let p = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        Ok((fd, p))
    }
}

/// `openat2(dirfd, path, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`.
fn open_in(dirfd: RawFd, path: &Path, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let rel = path.as_os_str().as_bytes();
    let rel = if rel.iter().all(|&b| b == b'/') {
        &b"."[..]
    } else {
        rel
    };
    let c = CString::new(rel)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: open_how is plain data.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = if flags & libc::O_CREAT != 0 {
        u64::from(mode)
    } else {
        0
    };
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid dirfd, NUL-terminated path and an open_how of the given size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) })
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and stat buffer; AT_EMPTY_PATH stats the fd itself.
    let rc = unsafe { libc::fstatat(fd, c"".as_ptr(), &mut st, libc::AT_EMPTY_PATH) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in string"))
}

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let (s, t, f, d) = (cstr(source)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
    // SAFETY: valid NUL-terminated strings for the call.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
    if rc == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(
            e.kind(),
            format!("mount {fstype} {source} on {target}: {e}"),
        ))
    }
}

fn mkdir(path: &str, mode: u32) -> io::Result<()> {
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
    {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            Err(io::Error::new(e.kind(), format!("mkdir {path}: {e}")))
        }
        _ => Ok(()),
    }
}

/// `/dev/vdX` of the virtio-blk disk with `serial`, waiting for it to appear.
fn find_disk(serial: &str) -> io::Result<String> {
    let start = Instant::now();
    loop {
        if let Ok(rd) = std::fs::read_dir("/sys/block") {
            for entry in rd.take(MAX_BLOCK_DEVICES).flatten() {
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                let Ok(s) = std::fs::read_to_string(entry.path().join("serial")) else {
                    continue;
                };
                if s.trim() == serial {
                    let dev = format!("/dev/{name}");
                    if Path::new(&dev).exists() {
                        return Ok(dev);
                    }
                }
            }
        }
        if start.elapsed() > DEVICE_WAIT {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no disk with serial {serial} after {DEVICE_WAIT:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Mounts the image, the upper and the overlay, the pseudo file systems
/// inside it, and writes `/etc/hostname`, `/etc/hosts`, `/etc/resolv.conf`.
pub fn mount_root(cfg: &RootfsBoot, hostname: &str) -> io::Result<()> {
    let t = Instant::now();
    let image = find_disk(ROOTFS_SERIAL)?;
    mkdir(LOWER, 0o755)?;
    mkdir(UPPER, 0o755)?;
    mkdir(ROOT, 0o755)?;
    mount(&image, LOWER, cfg.fstype, libc::MS_RDONLY, "")?;
    match cfg.upper {
        Upper::Tmpfs(mib) => mount(
            "tmpfs",
            UPPER,
            "tmpfs",
            0,
            &format!("size={mib}m,mode=0755"),
        )?,
        Upper::Disk => {
            let dev = find_disk(UPPER_SERIAL)?;
            mount(&dev, UPPER, "ext4", 0, "")?;
        }
    }
    mkdir(&format!("{UPPER}/upper"), 0o755)?;
    mkdir(&format!("{UPPER}/work"), 0o755)?;
    mount(
        "overlay",
        ROOT,
        "overlay",
        0,
        &format!("lowerdir={LOWER},upperdir={UPPER}/upper,workdir={UPPER}/work"),
    )?;
    let fd = open_in(
        libc::AT_FDCWD,
        Path::new(ROOT),
        libc::O_PATH | libc::O_DIRECTORY,
        0,
    )?;
    let root = RootDir {
        fd,
        path: cstr(ROOT)?,
    };
    // Inside the image: mount points are resolved in the root (an image's
    // /proc symlinked to / must not mount over the initramfs).
    let nsne = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    for (dir, src, fstype, flags) in [
        ("/proc", "proc", "proc", nsne),
        ("/sys", "sysfs", "sysfs", nsne),
        ("/dev", "/dev", "", libc::MS_BIND | libc::MS_REC),
    ] {
        let target = mountpoint(&root, dir)?;
        let t = format!("/proc/self/fd/{}", target.as_raw_fd());
        mount(src, &t, fstype, flags, "")?;
    }
    write_identity(&root, hostname)?;
    let resolv = std::fs::read("/etc/resolv.conf")
        .unwrap_or_else(|_| b"# capsa: this sandbox has no network configured\n".to_vec());
    write_etc(&root, "resolv.conf", &resolv)?;
    let _ = ROOTFS.set(root);
    debug!("root filesystem mounted at {ROOT} in {:?}", t.elapsed());
    Ok(())
}

/// Opens (making it if missing) directory `dir` inside the root.
fn mountpoint(root: &RootDir, dir: &str) -> io::Result<OwnedFd> {
    let flags = libc::O_PATH | libc::O_DIRECTORY;
    match root.open(Path::new(dir), flags, 0) {
        Ok(fd) => Ok(fd),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let (parent, p) = root.entry(Path::new(dir))?;
            std::fs::DirBuilder::new().mode(0o755).create(&p)?;
            drop(parent);
            root.open(Path::new(dir), flags, 0)
        }
        Err(e) => Err(io::Error::new(e.kind(), format!("{dir} in the image: {e}"))),
    }
}

/// Replaces `/etc/NAME` in the root (in the upper layer): whatever the image
/// had there, a symlink included, is unlinked first, never followed.
fn write_etc(root: &RootDir, name: &str, content: &[u8]) -> io::Result<()> {
    let etc = mountpoint(root, "/etc")?;
    let path = PathBuf::from(format!("/proc/self/fd/{}", etc.as_raw_fd())).join(name);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(io::Error::new(e.kind(), format!("/etc/{name}: {e}")))
        }
        _ => {}
    }
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("/etc/{name}: {e}")))?;
    f.write_all(content)
}

/// Writes `/etc/hostname` and `/etc/hosts` for `hostname` into the root.
pub fn write_identity(root: &RootDir, hostname: &str) -> io::Result<()> {
    write_etc(root, "hostname", format!("{hostname}\n").as_bytes())?;
    let hosts = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
    );
    write_etc(root, "hosts", hosts.as_bytes())
}
