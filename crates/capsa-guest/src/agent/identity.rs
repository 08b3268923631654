//! `Open(SetIdentity)`: what makes a clone restored from a snapshot its own
//! machine. Every clone of one snapshot wakes up with the same hostname,
//! machine id, RNG state and a wall clock stuck at the snapshot's instant;
//! the host sends fresh values right after the restore.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use capsa_proto::{AgentError, AgentFrame, IdentityRequest};

use super::Fail;

/// `_IOW('R', 0x03, int[2])`: add (and credit) entropy to the input pool.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

fn fail(what: &str, e: &std::io::Error) -> Fail {
    Fail::Reply(AgentError::io(what, e))
}

/// Applies `req` (validated first); replies `Done(None)`.
pub(super) fn set_identity(req: IdentityRequest) -> Result<AgentFrame, Fail> {
    req.validate()
        .map_err(|e| Fail::Reply(super::invalid(e.to_string())))?;
    // The clock first: everything after it (file mtimes) should carry the new time.
    if let Some((secs, nanos)) = req.realtime {
        let ts = libc::timespec {
            tv_sec: secs as libc::time_t,
            tv_nsec: nanos as libc::c_long,
        };
        // SAFETY: ts is a valid timespec.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
            return Err(fail("setting the clock", &std::io::Error::last_os_error()));
        }
    }
    if !req.entropy.is_empty() {
        add_entropy(&req.entropy).map_err(|e| fail("reseeding the RNG", &e))?;
    }
    if let Some(h) = &req.hostname {
        // SAFETY: the pointer and length describe h's bytes.
        if unsafe { libc::sethostname(h.as_ptr().cast(), h.len()) } != 0 {
            return Err(fail("sethostname", &std::io::Error::last_os_error()));
        }
        if let Some(root) = crate::rootfs::root() {
            crate::rootfs::write_identity(root, h)
                .map_err(|e| fail("writing the image's /etc/hostname and /etc/hosts", &e))?;
        }
    }
    if let Some(id) = &req.machine_id {
        write_machine_id(id).map_err(|e| fail("writing /etc/machine-id", &e))?;
    }
    Ok(AgentFrame::Done(None))
}

/// Credits `bytes` to the input pool and reseeds the CRNG, so that what
/// clones read from `/dev/urandom` after a restore diverges at once.
fn add_entropy(bytes: &[u8]) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info: Vec<u8> = Vec::with_capacity(8 + bytes.len());
    let bits = (bytes.len() * 8) as i32;
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    // Keep the u32 array whole.
    while info.len() % 4 != 0 {
        info.push(0);
    }
    // SAFETY: info is a valid rand_pool_info of buf_size bytes of payload.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } != 0 {
        // If crediting is refused, mixing in still makes the pools diverge.
        (&f).write_all(bytes)?;
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn write_machine_id(id: &str) -> std::io::Result<()> {
    std::fs::create_dir_all("/etc")?;
    let tmp = "/etc/.machine-id.capsa";
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o444)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(tmp)?;
        f.write_all(format!("{id}\n").as_bytes())?;
    }
    std::fs::rename(tmp, "/etc/machine-id")
}
