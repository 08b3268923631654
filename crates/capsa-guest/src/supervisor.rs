//! The workload process, signals, zombie reaping and the power-off sequence.
//!
//! PID 1 blocks the signals it cares about and takes them synchronously with
//! `sigwaitinfo`/`sigtimedwait`; there are no signal handlers, so no
//! async-signal-safety concerns. Blocked signals are queued even for PID 1
//! (the kernel only drops signals init has no handler for when unblocked), so
//! a stop request that arrives during setup is not lost.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::agent::{self, AgentConfig, Reaper};
use crate::cmdline::{Config, Mode};
use crate::console::{self, debug, error, info, warning};
use crate::{EXIT_MARKER_PREFIX, GUEST_PATH};

/// How long processes get to exit after `SIGTERM` before they are killed.
const TERM_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for killed processes to be reaped.
const KILL_GRACE: Duration = Duration::from_secs(1);

/// Signals PID 1 takes synchronously.
const HANDLED: &[libc::c_int] = &[
    libc::SIGCHLD,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGPWR,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

use crate::agent::sys::sigset;

/// Blocks the handled signals and makes Ctrl-Alt-Del send `SIGINT` to PID 1
/// instead of rebooting. Call first thing, before any other setup.
pub fn take_signals() -> io::Result<()> {
    let set = sigset(HANDLED);
    // SAFETY: valid sigset; single-threaded at this point.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: plain reboot(2) call that only changes the CAD behaviour.
    if unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_CAD_OFF) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Why the supervisor stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The workload ended with this code.
    WorkloadExited(i32),
    /// The host asked for a graceful stop with this signal.
    Requested(libc::c_int),
}

/// Runs the workload and reaps every process that ends up as a child of PID 1.
pub struct Supervisor {
    workload: Option<libc::pid_t>,
    exit_reported: bool,
    /// In agent mode: exec children's statuses go to their connections.
    agent_reaper: Option<Arc<Reaper>>,
}

impl Supervisor {
    /// A supervisor without a workload yet.
    pub fn new() -> Self {
        Self {
            workload: None,
            exit_reported: false,
            agent_reaper: None,
        }
    }

    /// Starts the workload of `cfg.mode` in its own session with the console
    /// as controlling terminal. If it cannot start, reports exit code 127.
    ///
    /// In agent mode there is no workload: the agent's accept thread starts
    /// and the guest runs until the host asks it to stop.
    pub fn start(&mut self, cfg: &Config) -> Option<Stop> {
        if cfg.mode == Mode::Agent {
            let config = AgentConfig {
                term: cfg.term.clone(),
                ..AgentConfig::default()
            };
            return match agent::start_vsock(config) {
                Ok(agent) => {
                    self.agent_reaper = Some(Arc::clone(agent.reaper()));
                    None
                }
                Err(e) => {
                    error!("cannot start the agent: {e}");
                    Some(Stop::Requested(0))
                }
            };
        }
        match spawn(cfg) {
            Ok(pid) => {
                debug!("workload started as pid {pid}");
                self.workload = Some(pid);
                None
            }
            Err(e) => {
                let what = match &cfg.mode {
                    Mode::Shell | Mode::Agent => "/bin/sh".to_string(),
                    Mode::Run { program } => program.display().to_string(),
                };
                error!("cannot start {what}: {e}");
                self.report_exit(127);
                Some(Stop::WorkloadExited(127))
            }
        }
    }

    fn report_exit(&mut self, code: i32) {
        if !self.exit_reported {
            self.exit_reported = true;
            console::write_line(&format!("{EXIT_MARKER_PREFIX}{code}"));
        }
    }

    /// Reaps every exited child without blocking. Returns the workload's exit
    /// code if it was among them, and whether no children are left at all.
    fn reap(&mut self) -> (Option<i32>, bool) {
        let mut workload_code = None;
        // Held across the waitpid calls so that an agent thread cannot be
        // between fork and registering its child (see agent::Reaper).
        let reaper = self.agent_reaper.clone();
        let mut table = reaper.as_ref().map(|r| r.lock());
        loop {
            let mut status = 0;
            // SAFETY: status is a valid out pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid > 0 {
                if Some(pid) == self.workload {
                    let code = exit_code(status);
                    self.workload = None;
                    self.report_exit(code);
                    workload_code = Some(code);
                } else if let Some(table) = table.as_mut() {
                    table.deliver(pid, status);
                }
                continue;
            }
            if pid == 0 {
                return (workload_code, false);
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ECHILD) => return (workload_code, true),
                _ => {
                    warning!("waitpid: {err}");
                    return (workload_code, false);
                }
            }
        }
    }

    /// Waits until the workload exits or a stop is requested, reaping zombies
    /// meanwhile. On a stop request, forwards it to the workload's process group.
    pub fn wait(&mut self) -> Stop {
        let set = sigset(HANDLED);
        loop {
            if let (Some(code), _) = self.reap() {
                return Stop::WorkloadExited(code);
            }
            // SAFETY: valid sigset; a null siginfo pointer is allowed.
            let sig = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
            match sig {
                libc::SIGCHLD => {}
                // SIGUSR1/SIGUSR2 are what busybox `halt` / `poweroff` send to PID 1.
                libc::SIGTERM | libc::SIGINT | libc::SIGPWR | libc::SIGUSR1 | libc::SIGUSR2 => {
                    info!("stop requested ({}), shutting down", signal_name(sig));
                    self.forward(sig);
                    return Stop::Requested(sig);
                }
                -1 => {
                    let err = io::Error::last_os_error();
                    if err.raw_os_error() != Some(libc::EINTR) {
                        error!("sigwaitinfo: {err}");
                        return Stop::Requested(0);
                    }
                }
                other => debug!("ignoring {}", signal_name(other)),
            }
        }
    }

    /// Passes a stop request on to the workload's process group. `SIGHUP` is
    /// added because an interactive shell ignores `SIGTERM` and `SIGINT`.
    fn forward(&self, sig: libc::c_int) {
        if let Some(pid) = self.workload {
            // SAFETY: plain kill(2) calls on the workload's process group.
            unsafe {
                libc::kill(-pid, sig);
                libc::kill(-pid, libc::SIGHUP);
                libc::kill(-pid, libc::SIGCONT);
            }
        }
    }

    /// Waits until no children are left or `timeout` passes; true if none are left.
    fn reap_all(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let set = sigset(&[libc::SIGCHLD]);
        loop {
            if self.reap().1 {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let left = deadline - now;
            let ts = libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            };
            // SAFETY: valid sigset and timespec; a null siginfo pointer is allowed.
            unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
        }
    }

    /// Stops every process (TERM, then KILL after [`TERM_GRACE`]), syncs,
    /// unmounts what it can and powers off. Never returns.
    pub fn shutdown(&mut self) -> ! {
        let start = Instant::now();
        // SAFETY: kill(-1) signals every process except PID 1 and kernel threads.
        unsafe {
            libc::kill(-1, libc::SIGTERM);
            libc::kill(-1, libc::SIGCONT);
        }
        if !self.reap_all(TERM_GRACE) {
            warning!("processes still running after {TERM_GRACE:?}; killing them");
            // SAFETY: as above.
            unsafe { libc::kill(-1, libc::SIGKILL) };
            if !self.reap_all(KILL_GRACE) {
                warning!("some processes did not exit");
            }
        }
        if self.workload.is_some() {
            // Killed and reaped by someone else's wait, or unkillable: still tell the host.
            self.report_exit(128 + libc::SIGKILL);
        }
        debug!("processes stopped in {:?}", start.elapsed());
        // SAFETY: sync(2) has no preconditions.
        unsafe { libc::sync() };
        unmount_all();
        power_off()
    }
}

/// Shell-style exit code: status, or 128 + signal.
fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        255
    }
}

fn signal_name(sig: libc::c_int) -> String {
    match sig {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT (Ctrl-Alt-Del)".into(),
        libc::SIGPWR => "SIGPWR".into(),
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGUSR1 => "SIGUSR1 (halt)".into(),
        libc::SIGUSR2 => "SIGUSR2 (poweroff)".into(),
        other => format!("signal {other}"),
    }
}

fn spawn(cfg: &Config) -> io::Result<libc::pid_t> {
    let tty = console::open_workload_tty()?;
    let mut cmd = match &cfg.mode {
        Mode::Shell => {
            let mut c = Command::new("/bin/sh");
            // A leading '-' makes it a login shell (reads /etc/profile).
            c.arg0("-sh");
            c
        }
        Mode::Run { program } => Command::new(program),
        Mode::Agent => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "agent mode has no workload process",
            ))
        }
    };
    let home = if std::path::Path::new("/root").is_dir() {
        "/root"
    } else {
        "/"
    };
    cmd.env_clear()
        .env("PATH", GUEST_PATH)
        .env("HOME", home)
        .env("TERM", &cfg.term)
        .env("SHELL", "/bin/sh")
        .env("USER", "root")
        .env("LOGNAME", "root")
        .current_dir(home)
        .stdin(Stdio::from(tty.try_clone()?))
        .stdout(Stdio::from(tty.try_clone()?))
        .stderr(Stdio::from(tty));
    // SAFETY: the closure only makes async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(|| {
            // PID 1 keeps its signals blocked; the workload must not inherit that.
            crate::agent::sys::unblock_all_signals();
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            // Best effort: without a controlling tty the workload still runs,
            // only without job control / Ctrl-C.
            libc::ioctl(0, libc::TIOCSCTTY, 1);
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    Ok(child.id() as libc::pid_t)
}

/// Unmounts everything but the root and the kernel's pseudo file systems, in
/// reverse mount order; what cannot be unmounted is remounted read-only so
/// its data is on disk before power-off.
fn unmount_all() {
    let mounts = match std::fs::read_to_string("/proc/mounts") {
        Ok(m) => m,
        Err(e) => {
            warning!("cannot read /proc/mounts: {e}");
            return;
        }
    };
    let targets: Vec<String> = mounts
        .lines()
        .take(1024)
        .filter_map(|l| l.split(' ').nth(1))
        .map(unescape_mount_path)
        .filter(|t| !matches!(t.as_str(), "/" | "/proc" | "/sys" | "/dev"))
        .collect();
    for target in targets.iter().rev() {
        let Ok(c) = std::ffi::CString::new(target.as_str()) else {
            continue;
        };
        // SAFETY: c is a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
            continue;
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINVAL) || err.raw_os_error() == Some(libc::ENOENT) {
            continue; // already gone with its parent
        }
        // SAFETY: remount of an existing mount point with null source/type/data.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                c.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            debug!("cannot unmount {target}: {err}");
        }
    }
}

/// `/proc/mounts` escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Powers the VM off; if even that fails, waits forever (PID 1 must not exit).
pub fn power_off() -> ! {
    // SAFETY: sync(2) and reboot(2) have no memory-safety preconditions.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    error!("power off failed: {}", io::Error::last_os_error());
    loop {
        // SAFETY: pause(2) has no preconditions.
        unsafe { libc::pause() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_mount_path(r"/x\\"), r"/x\\");
        assert_eq!(unescape_mount_path(r"\134"), r"\");
        assert_eq!(unescape_mount_path(r"trailing\04"), r"trailing\04");
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(libc::SIGKILL), 128 + 9);
    }
}
