//! One-time system setup: mounts, device links, kernel modules, hostname, `lo`.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::time::Instant;

use crate::console::{debug, warning};
use crate::MODULES_LOAD_PATH;

/// Most lines of `modules.load` considered; the initramfs writer emits far fewer.
const MAX_MODULES: usize = 4096;

/// A mount PID 1 performs; `required` ones abort the boot when they fail.
struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: libc::c_ulong,
    data: &'static str,
    dir_mode: u32,
    required: bool,
}

const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// Order matters: /dev/pts and /dev/shm live on devtmpfs.
const MOUNTS: &[Mount] = &[
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
        dir_mode: 0o555,
        required: true,
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
        dir_mode: 0o555,
        required: true,
    },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: libc::MS_NOSUID,
        data: "mode=0755",
        dir_mode: 0o755,
        required: true,
    },
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: "mode=0620,ptmxmode=0666",
        dir_mode: 0o755,
        required: false,
    },
    Mount {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=1777",
        dir_mode: 0o1777,
        required: false,
    },
    Mount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=1777",
        dir_mode: 0o1777,
        required: false,
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=0755",
        dir_mode: 0o755,
        required: false,
    },
    Mount {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
        dir_mode: 0o555,
        required: false,
    },
];

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in string"))
}

fn mount(m: &Mount) -> io::Result<()> {
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(m.dir_mode)
        .create(m.target)
    {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let (source, target, fstype, data) = (
        cstr(m.source)?,
        cstr(m.target)?,
        cstr(m.fstype)?,
        cstr(m.data)?,
    );
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            m.flags,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Mounts the pseudo file systems. Errors only for mounts nothing works without.
pub fn mount_all() -> io::Result<()> {
    for m in MOUNTS {
        match mount(m) {
            Ok(()) => {}
            // Already mounted (e.g. CONFIG_DEVTMPFS_MOUNT on a disk root).
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) if m.required => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("mount {} on {}: {e}", m.fstype, m.target),
                ))
            }
            Err(e) => warning!("mount {} on {}: {e}", m.fstype, m.target),
        }
    }
    Ok(())
}

/// The usual `/dev` links that devtmpfs does not create.
pub fn dev_links() {
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        match std::os::unix::fs::symlink(target, link) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => debug!("symlink {link}: {e}"),
        }
    }
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> io::Result<String> {
    // SAFETY: utsname is plain data; uname fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uts is a valid utsname.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let bytes: Vec<u8> = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Loads the modules listed in [`MODULES_LOAD_PATH`] (and with `display`
/// those of [`crate::DISPLAY_MODULES_LOAD_PATH`]), in order; failures are
/// logged and skipped so that one bad module does not stop the boot.
pub fn load_modules(display: bool) {
    load_module_list(MODULES_LOAD_PATH);
    if display {
        load_module_list(crate::DISPLAY_MODULES_LOAD_PATH);
    }
}

fn load_module_list(list_path: &str) {
    let list = match std::fs::read_to_string(list_path) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            warning!("cannot read {list_path}: {e}");
            return;
        }
    };
    let release = match kernel_release() {
        Ok(r) => r,
        Err(e) => {
            warning!("uname: {e}; not loading modules");
            return;
        }
    };
    let start = Instant::now();
    let mut loaded = 0usize;
    for line in list.lines().take(MAX_MODULES) {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let path = if line.starts_with('/') {
            line.to_string()
        } else {
            format!("/lib/modules/{release}/{line}")
        };
        match finit_module(&path) {
            Ok(true) => loaded += 1,
            Ok(false) => debug!("{path}: already loaded"),
            Err(e) => warning!("cannot load module {path}: {e}"),
        }
    }
    debug!("loaded {loaded} modules in {:?}", start.elapsed());
}

/// Loads one module file; `Ok(false)` when it was already loaded or built in.
fn finit_module(path: &str) -> io::Result<bool> {
    let file = File::open(path)?;
    // SAFETY: valid fd and an empty NUL-terminated parameter string.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), c"".as_ptr(), 0) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EEXIST) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// Sets the hostname (validated by the command line parser).
pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: name points to name.len() valid bytes.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Brings `lo` up; the kernel then adds 127.0.0.1/8 and ::1 by itself.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is owned here.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: valid socket fd and ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe {
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: valid socket fd and ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The guest's network interface (the only NIC capsa gives a VM).
const NIC: &[u8] = b"eth0\0";

/// Linux's `struct rtentry` (glibc's libc bindings lack it).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn sockaddr_v4(ip: [u8; 4]) -> libc::sockaddr {
    // SAFETY: sockaddr_in and sockaddr are plain data of the same size.
    unsafe {
        let mut sin: libc::sockaddr_in = std::mem::zeroed();
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_addr.s_addr = u32::from_ne_bytes(ip);
        std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin)
    }
}

/// Configures `eth0`, when the VM has a NIC, with capsa's fixed addresses:
/// `addr`/24, default route via `gateway`. Static, so there is no DHCP wait
/// and every VM (and every pooled snapshot) looks the same.
/// Returns `Ok(false)` when there is no NIC.
pub fn network_up(addr: [u8; 4], netmask: [u8; 4], gateway: [u8; 4]) -> io::Result<bool> {
    if !std::path::Path::new("/sys/class/net/eth0").exists() {
        return Ok(false);
    }
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is owned here.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let ifreq = || {
        // SAFETY: ifreq is plain data.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(NIC) {
            *dst = *src as libc::c_char;
        }
        ifr
    };
    let ioctl = |req: libc::c_ulong, arg: *mut libc::c_void| {
        // SAFETY: callers pass a valid request and a pointer to its argument.
        if unsafe { libc::ioctl(sock.as_raw_fd(), req as _, arg) } < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    let mut ifr = ifreq();
    ifr.ifr_ifru.ifru_addr = sockaddr_v4(addr);
    ioctl(libc::SIOCSIFADDR, (&mut ifr as *mut libc::ifreq).cast())?;
    let mut ifr = ifreq();
    ifr.ifr_ifru.ifru_netmask = sockaddr_v4(netmask);
    ioctl(libc::SIOCSIFNETMASK, (&mut ifr as *mut libc::ifreq).cast())?;
    let mut ifr = ifreq();
    ioctl(libc::SIOCGIFFLAGS, (&mut ifr as *mut libc::ifreq).cast())?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe {
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    ioctl(libc::SIOCSIFFLAGS, (&mut ifr as *mut libc::ifreq).cast())?;
    let mut rt = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_v4([0; 4]),
        rt_gateway: sockaddr_v4(gateway),
        rt_genmask: sockaddr_v4([0; 4]),
        rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    match ioctl(libc::SIOCADDRT, (&mut rt as *mut RtEntry).cast()) {
        Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(e),
        _ => {}
    }
    Ok(true)
}
