//! Console output of PID 1 and opening the console for the workload.
//!
//! Messages go to fd 2 as one `write` per line so they do not interleave with
//! the workload's output mid-line. Before `/dev` is mounted fd 2 may be
//! closed (no `/dev/console` in the initramfs): writes then fail silently.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};

static DEBUG: AtomicBool = AtomicBool::new(false);

/// Turns debug messages on or off (`capsa.debug=1`).
pub fn set_debug(on: bool) {
    DEBUG.store(on, Ordering::Relaxed);
}

/// Whether debug messages are printed.
pub fn debug_enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

/// Writes one whole line to fd 2, ignoring errors (there is nowhere else to report them).
pub fn write_line(line: &str) {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    let mut rest = &buf[..];
    while !rest.is_empty() {
        // SAFETY: rest is a valid buffer of rest.len() bytes.
        let n = unsafe { libc::write(2, rest.as_ptr().cast(), rest.len()) };
        if n > 0 {
            rest = &rest[n as usize..];
        } else if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        } else {
            return;
        }
    }
}

/// Prints `capsa-init: <message>`.
macro_rules! info {
    ($($arg:tt)*) => {
        $crate::console::write_line(&format!("capsa-init: {}", format_args!($($arg)*)))
    };
}

/// Prints `capsa-init: warning: <message>`.
macro_rules! warning {
    ($($arg:tt)*) => {
        $crate::console::write_line(&format!("capsa-init: warning: {}", format_args!($($arg)*)))
    };
}

/// Prints `capsa-init: error: <message>`.
macro_rules! error {
    ($($arg:tt)*) => {
        $crate::console::write_line(&format!("capsa-init: error: {}", format_args!($($arg)*)))
    };
}

/// Prints `capsa-init: debug: <message>` when `capsa.debug=1`.
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::console::debug_enabled() {
            $crate::console::write_line(&format!("capsa-init: debug: {}", format_args!($($arg)*)))
        }
    };
}

pub(crate) use {debug, error, info, warning};

fn open_rw(path: &str) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)
}

/// Points fds 0, 1 and 2 of PID 1 at `/dev/console` (once devtmpfs is mounted).
pub fn attach_stdio() -> io::Result<()> {
    let console = open_rw("/dev/console")?;
    use std::os::fd::AsRawFd;
    for fd in 0..3 {
        // SAFETY: dup2 on a valid open fd.
        if unsafe { libc::dup2(console.as_raw_fd(), fd) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The terminal behind `/dev/console`, for the workload's stdio.
///
/// `/dev/console` itself cannot be a controlling terminal in a useful way
/// (job control and Ctrl-C need the real tty), so, like busybox `cttyhack`,
/// open the device named last in `/sys/class/tty/console/active` (the one
/// `/dev/console` writes to) and fall back to `/dev/console`.
pub fn open_workload_tty() -> io::Result<File> {
    if let Ok(active) = std::fs::read_to_string("/sys/class/tty/console/active") {
        if let Some(name) = active.split_whitespace().last() {
            let safe = !name.is_empty()
                && name.len() < 32
                && name.bytes().all(|b| b.is_ascii_alphanumeric());
            if safe {
                match open_rw(&format!("/dev/{name}")) {
                    Ok(f) => return Ok(f),
                    Err(e) => debug!("cannot open /dev/{name}: {e}; using /dev/console"),
                }
            }
        }
    }
    open_rw("/dev/console")
}
