//! The seccomp filter of the device's threads.
//!
//! The device parses guest-controlled descriptors, so a bug in it is a guest
//! escape into whichever process serves it: the per-VM monitor, or the
//! embedding application (capsa's in-process strategy). The filter is
//! installed on the `capsa-vsock` thread before it serves anything; the
//! vhost-user message thread and the vring worker it later spawns inherit it.
//! Other threads of the process are not filtered.
//!
//! Allowed: reading/writing/polling fds the device already holds, receiving
//! fds over the vhost-user socket and mapping guest memory from them, memory
//! management, thread creation (threads only), new Unix stream sockets and
//! `connect` (guest->host connections dial `<uds>_<port>`), unlinking its
//! own socket files, signals to its own process only. Not allowed, among
//! others: `open`/`openat`, `execve`, `fork`, non-Unix sockets, `bind`,
//! `ptrace`, `process_vm_*`, `kill`, `mount`, `set*id`, `chmod`/`chown`,
//! `seccomp`, `ioctl` beyond `FIONBIO`/`FIOCLEX`.
//!
//! `open`/`openat` fail quietly with `EACCES` (see `programs`). Any other
//! call outside the list is *trapped* (`SECCOMP_RET_TRAP`): it fails with
//! `EPERM`, a SIGSYS handler writes the syscall number to stderr and counts
//! it ([`blocked_syscalls`]). (While a thread blocks SIGSYS, as the C library
//! does around `fork`, the kernel kills the process instead.) Not `SECCOMP_RET_KILL_PROCESS`, because the
//! filtered threads may live in the embedding application's process: killing
//! it for a missed syscall on a rare path (say, a log subscriber that opens
//! a file from the device thread) would turn a filter gap into an outage of
//! the embedder, while the trap blocks the call just as firmly. If the
//! process has its own SIGSYS handler capsa leaves it in place; with none at
//! all, SIGSYS's default action kills the process (fail closed).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::error::VsockError;

static BLOCKED: AtomicU64 = AtomicU64::new(0);
static HANDLER: Once = Once::new();

/// Syscalls blocked (trapped) in filtered device threads of this process so far.
pub fn blocked_syscalls() -> u64 {
    BLOCKED.load(Ordering::Relaxed)
}

#[cfg(target_arch = "x86_64")]
const ALLOWED: &[i64] = &[
    // I/O on fds the device holds.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_accept,
    libc::SYS_accept4,
    // Waiting.
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_restart_syscall,
    // Memory (guest RAM is mmap'ed from fds received over vhost-user).
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    // Threads and their teardown.
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // Removing its own socket files on shutdown.
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// The filter for this process (signals are limited to its own pid).
fn programs() -> Result<Vec<BpfProgram>, String> {
    #[cfg(not(target_arch = "x86_64"))]
    {
        Err(format!(
            "no syscall list for {} yet; run with the device filter off",
            std::env::consts::ARCH
        ))
    }
    #[cfg(target_arch = "x86_64")]
    {
        let e = |e: seccompiler::BackendError| e.to_string();
        let arch = TargetArch::x86_64;
        let cond = |arg: u8, op: SeccompCmpOp, v: u64| {
            SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, v).map_err(e)
        };
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
            ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
        // Threads only, never a new process.
        let thread = libc::CLONE_THREAD as u64;
        rules.insert(
            libc::SYS_clone,
            vec![
                SeccompRule::new(vec![cond(0, SeccompCmpOp::MaskedEq(thread), thread)?])
                    .map_err(e)?,
            ],
        );
        // Guest->host connections dial `<uds>_<port>`: Unix stream sockets
        // only. (connect's path cannot be filtered: see the threat model.)
        rules.insert(
            libc::SYS_socket,
            vec![
                SeccompRule::new(vec![cond(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)?])
                    .map_err(e)?,
            ],
        );
        rules.insert(libc::SYS_connect, Vec::new());
        // Non-blocking mode and close-on-exec on fds it holds, nothing else.
        rules.insert(
            libc::SYS_ioctl,
            [libc::FIONBIO, libc::FIOCLEX]
                .iter()
                .map(|&req| SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, req)?]).map_err(e))
                .collect::<Result<_, _>>()?,
        );
        // Thread names only.
        rules.insert(
            libc::SYS_prctl,
            vec![
                SeccompRule::new(vec![cond(0, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)?])
                    .map_err(e)?,
            ],
        );
        // Signals (abort on a fatal error) to this process only.
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() } as u64;
        rules.insert(
            libc::SYS_tgkill,
            vec![SeccompRule::new(vec![cond(0, SeccompCmpOp::Eq, pid)?]).map_err(e)?],
        );
        // clone3 passes its flags in memory a filter cannot read: it is let
        // through the allow-list here and answered ENOSYS by the filter
        // below, so the C library falls back to clone, whose flags are checked.
        rules.insert(libc::SYS_clone3, Vec::new());
        let no_clone3: BpfProgram = SeccompFilter::new(
            BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )
        .map_err(e)?
        .try_into()
        .map_err(e)?;
        // Opening files is denied quietly (EACCES, not trapped): glibc's
        // malloc reads /sys/devices/system/cpu/online once per process from
        // whichever thread first needs a new arena, and falls back to
        // sched_getaffinity when it cannot; that thread may be a device thread.
        rules.insert(libc::SYS_open, Vec::new());
        rules.insert(libc::SYS_openat, Vec::new());
        let no_open: BpfProgram = SeccompFilter::new(
            BTreeMap::from([(libc::SYS_open, Vec::new()), (libc::SYS_openat, Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EACCES as u32),
            arch,
        )
        .map_err(e)?
        .try_into()
        .map_err(e)?;
        let allow_list: BpfProgram =
            SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch)
                .map_err(e)?
                .try_into()
                .map_err(e)?;
        // The allow-list last: installing a filter itself needs prctl.
        Ok(vec![no_clone3, no_open, allow_list])
    }
}

/// Installs the filter on the calling thread (and so on threads it spawns).
pub(crate) fn install() -> Result<(), VsockError> {
    let fail = |reason: String| VsockError::Seccomp { reason };
    HANDLER.call_once(install_sigsys_handler);
    for p in programs().map_err(fail)? {
        seccompiler::apply_filter(&p).map_err(|e| fail(e.to_string()))?;
    }
    Ok(())
}

/// Installs the SIGSYS handler unless the process has one of its own.
fn install_sigsys_handler() {
    // SAFETY: plain sigaction calls on a zeroed struct; the handler only
    // does async-signal-safe work (an atomic add and write(2)).
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGSYS, std::ptr::null(), &mut old) != 0
            || old.sa_sigaction != libc::SIG_DFL
        {
            return;
        }
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut());
    }
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    BLOCKED.fetch_add(1, Ordering::Relaxed);
    // A trapped call returns what the handler leaves in the return register;
    // the kernel left the syscall number there.
    // SAFETY: for SA_SIGINFO handlers the third argument is the ucontext.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        let uc = ctx.cast::<libc::ucontext_t>();
        (*uc).uc_mcontext.gregs[libc::REG_RAX as usize] = -(libc::EPERM as i64);
    }
    // siginfo for SIGSYS: _call_addr (pointer) at offset 16, _syscall (int) at 24.
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let nr = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    const PREFIX: &[u8] = b"capsa-vsock: seccomp blocked syscall ";
    let mut buf = [0u8; 64];
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 10];
    let mut n = nr.unsigned_abs();
    let mut k = 0;
    loop {
        digits[k] = b'0' + (n % 10) as u8;
        n /= 10;
        k += 1;
        if n == 0 || k == digits.len() {
            break;
        }
    }
    let mut len = PREFIX.len();
    for d in digits[..k].iter().rev() {
        buf[len] = *d;
        len += 1;
    }
    buf[len] = b'\n';
    len += 1;
    // SAFETY: write(2) of a stack buffer to stderr is async-signal-safe.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// The filter blocks what it must, on a throwaway thread.
    #[test]
    fn blocks_open_and_exec_but_not_io() {
        let r = std::thread::spawn(|| {
            install().unwrap();
            let before = blocked_syscalls();
            let mut fds = [0; 2];
            // SAFETY: pipe2 is not allowed, so this must fail; fds stays valid.
            let piped = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
            let opened = std::fs::File::open("/etc/hostname");
            // SAFETY: plain syscalls with valid (or null) arguments.
            let spawned = unsafe {
                let argv = [std::ptr::null::<libc::c_char>()];
                libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), argv.as_ptr()) == -1
                    && libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) == -1
            };
            let t = std::thread::spawn(|| 7).join().unwrap();
            (
                piped,
                opened.map_err(|e| e.kind()).err(),
                spawned,
                t,
                blocked_syscalls() - before,
            )
        })
        .join()
        .unwrap();
        assert_eq!(r.0, -1, "pipe2 is not on the list");
        assert_eq!(
            r.1,
            Some(std::io::ErrorKind::PermissionDenied),
            "open is refused, quietly"
        );
        assert!(r.2, "exec and new sockets are blocked");
        assert_eq!(r.3, 7, "threads still work");
        assert_eq!(r.4, 3, "trapped calls are counted (pipe2, execve, socket)");
        // Other threads are not filtered.
        assert!(std::fs::File::open("/etc/hostname").is_ok());
    }
}
