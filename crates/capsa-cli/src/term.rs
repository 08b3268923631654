//! Raw terminal mode with guaranteed restore, and the session-ending signals.

use std::os::fd::RawFd;
use std::sync::Mutex;

/// The terminal mode to put back: kept outside the [`RawMode`] guard too, so
/// that a panic anywhere (any thread, even with `panic = "abort"`) restores it
/// from the panic hook.
static SAVED: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);

/// Puts a terminal in raw mode and restores it when dropped (also on error paths).
pub struct RawMode {
    fd: RawFd,
    saved: libc::termios,
}

/// Whether `fd` is a terminal.
pub fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the fd.
    unsafe { libc::isatty(fd) == 1 }
}

impl RawMode {
    /// Enters raw mode on `fd` if it is a terminal; `None` otherwise.
    pub fn enter(fd: RawFd) -> Option<Self> {
        // SAFETY: isatty/tcgetattr/tcsetattr only read/write the termios struct we own.
        unsafe {
            if libc::isatty(fd) != 1 {
                return None;
            }
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            if let Ok(mut s) = SAVED.lock() {
                s.get_or_insert((fd, saved));
            }
            if libc::tcsetattr(fd, libc::TCSANOW, &raw) != 0 {
                return None;
            }
            Some(Self { fd, saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the attributes saved in `enter` on the same fd.
        unsafe {
            libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved);
        }
        if let Ok(mut s) = SAVED.lock() {
            *s = None;
        }
    }
}

/// Restores the terminal saved by a live [`RawMode`], if any (idempotent).
pub fn restore() {
    // try_lock: a panic while the lock is held must not deadlock the hook.
    let saved = match SAVED.try_lock() {
        Ok(mut s) => s.take(),
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().take(),
        Err(std::sync::TryLockError::WouldBlock) => None,
    };
    if let Some((fd, t)) = saved {
        // SAFETY: writes back attributes read from the same fd.
        unsafe {
            libc::tcsetattr(fd, libc::TCSANOW, &t);
        }
    }
}

/// Makes a panic restore the terminal before the message is printed (so
/// the message is readable and the shell usable afterwards).
pub fn restore_on_panic() {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        prev(info);
    }));
}

/// The signals that end a session from outside: the terminal closed
/// (SIGHUP), someone asked us to stop (SIGTERM), or SIGINT (Ctrl-C when stdin
/// is not in raw mode; in raw mode Ctrl-C is a key for the guest and only
/// `kill -INT` sends it). Caught, they let every exit path restore the
/// terminal and clean up.
pub struct Hangup {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Hangup {
    /// Starts catching the signals (from now on they no longer kill the process).
    pub fn catch() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for one of the signals; returns its number.
    pub async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.hup.recv() => libc::SIGHUP,
            _ = self.term.recv() => libc::SIGTERM,
            _ = self.int.recv() => libc::SIGINT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(fd: RawFd) -> libc::termios {
        // SAFETY: tcgetattr fills the struct we own.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(fd, &mut t), 0);
            t
        }
    }

    fn same(a: &libc::termios, b: &libc::termios) -> bool {
        a.c_iflag == b.c_iflag
            && a.c_oflag == b.c_oflag
            && a.c_cflag == b.c_cflag
            && a.c_lflag == b.c_lflag
            && a.c_cc == b.c_cc
    }

    /// A panic restores the terminal from the hook even when the guard's
    /// destructor never runs (as with `panic = "abort"`).
    #[test]
    fn a_panic_restores_the_terminal_mode() {
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty fills the two fds.
        let r = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0, "openpty");
        let before = attrs(slave);
        let raw = RawMode::enter(slave).expect("a pty is a terminal");
        assert!(!same(&attrs(slave), &before), "raw mode changes the mode");
        std::mem::forget(raw);
        restore_on_panic();
        let caught = std::panic::catch_unwind(|| panic!("boom"));
        assert!(caught.is_err());
        assert!(same(&attrs(slave), &before), "the panic hook restored it");
        // SAFETY: closing the fds opened above.
        unsafe {
            libc::close(master);
            libc::close(slave);
        }
    }
}
