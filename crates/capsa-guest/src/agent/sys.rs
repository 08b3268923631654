//! Thin, checked wrappers over the system calls the agent needs and std lacks.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Turns a `-1` return into the OS error.
pub(crate) fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Sets or clears `O_NONBLOCK`.
pub(crate) fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: fcntl on a caller-owned fd; F_GETFL/F_SETFL take no pointers.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    let flags = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags) })?;
    Ok(())
}

/// A close-on-exec pipe: (read end, write end).
pub(crate) fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds is a valid array of two ints.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 returned two fresh fds that nothing else owns.
    unsafe { Ok((File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))) }
}

/// Sets `SO_RCVTIMEO` and `SO_SNDTIMEO` so that blocking I/O on a connection
/// cannot hang forever on a peer that stopped talking. Fails with `ENOTSOCK`
/// on non-sockets (callers ignore that: pipes in tests are fine without).
pub(crate) fn set_socket_timeouts(fd: RawFd, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: tv is a valid timeval of the size passed.
        cvt(unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        })?;
    }
    Ok(())
}

/// `shutdown(fd, SHUT_WR)`, ignoring errors (best effort before a close).
pub(crate) fn shutdown_write(fd: RawFd) {
    // SAFETY: plain shutdown(2) on a caller-owned fd.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}

/// `poll(2)` retried on `EINTR`. `timeout` of `None` waits forever.
pub(crate) fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms = match timeout {
        None => -1,
        // Round up so that a wait for 0.5 ms does not become a busy loop.
        Some(d) => d.as_micros().div_ceil(1000).min(libc::c_int::MAX as u128) as libc::c_int,
    };
    loop {
        // SAFETY: fds is a valid slice of pollfd.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Sends `sig` to process group `pgid`; errors (group gone) are ignored.
pub(crate) fn kill_group(pgid: libc::pid_t, sig: libc::c_int) {
    if pgid > 1 {
        // SAFETY: plain kill(2) on a process group; pgid > 1 excludes "all processes".
        unsafe { libc::kill(-pgid, sig) };
    }
}

/// A pseudo terminal pair: the master stays with the agent, the slave becomes
/// the child's stdio.
pub(crate) struct Pty {
    /// Agent side.
    pub(crate) master: File,
    /// Child side (closed in the agent once the child is spawned).
    pub(crate) slave: File,
}

/// Opens a PTY of the given size. Both ends are close-on-exec; the child gets
/// the slave through dup2 onto its stdio.
pub(crate) fn open_pty(rows: u16, cols: u16) -> io::Result<Pty> {
    // SAFETY: posix_openpt returns a new fd or -1.
    let m = cvt(unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
    // SAFETY: m is a fresh fd owned here.
    let master = unsafe { File::from_raw_fd(m) };
    // SAFETY: grantpt/unlockpt on a valid master fd.
    cvt(unsafe { libc::grantpt(m) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::unlockpt(m) })?;
    // TIOCGPTPEER opens the slave through the master (no path lookup, so no
    // race with devpts); older kernels lack it, then open the slave by name.
    // SAFETY: ioctl with an int argument on a valid master fd.
    let peer = unsafe {
        libc::ioctl(
            m,
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    let slave = if peer >= 0 {
        // SAFETY: the ioctl returned a fresh fd owned here.
        unsafe { File::from_raw_fd(peer) }
    } else {
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: name is a valid buffer of the given length.
        let rc = unsafe { libc::ptsname_r(m, name.as_mut_ptr(), name.len()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: ptsname_r wrote a NUL-terminated path into name.
        let fd = cvt(unsafe {
            libc::open(
                name.as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: open returned a fresh fd owned here.
        unsafe { File::from_raw_fd(fd) }
    };
    set_winsize(master.as_raw_fd(), rows, cols)?;
    Ok(Pty { master, slave })
}

/// `TIOCSWINSZ` on a PTY master (the kernel sends `SIGWINCH` to the
/// terminal's foreground process group).
pub(crate) fn set_winsize(fd: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: ws is a valid winsize for the ioctl.
    cvt(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) })?;
    Ok(())
}

/// Signals PID 1 (or the host-mode agent) takes synchronously.
pub(crate) fn block_signals(signals: &[libc::c_int]) -> io::Result<()> {
    let set = sigset(signals);
    // SAFETY: valid sigset; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Clears the calling thread's signal mask. Async-signal-safe: meant for a
/// forked child before exec, so the command does not inherit the blocked
/// signals of PID 1's signal loop.
pub(crate) fn unblock_all_signals() {
    // SAFETY: sigset_t is plain data; sigemptyset and pthread_sigmask are
    // async-signal-safe and only touch the local set and this thread's mask.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
}

/// A signal set holding `signals`.
pub(crate) fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Wraps a raw fd returned by a system call.
///
/// # Safety
/// `fd` must be a fresh, valid fd that nothing else owns.
pub(crate) unsafe fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: guaranteed by the caller.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
