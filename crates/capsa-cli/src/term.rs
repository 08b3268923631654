//! Raw terminal mode with guaranteed restore.

use std::os::fd::RawFd;

/// Puts a terminal in raw mode and restores it when dropped (also on error paths).
pub struct RawMode {
    fd: RawFd,
    saved: libc::termios,
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
    }
}
