//! Who collects the exit status of exec'd processes.
//!
//! As PID 1 the agent must reap every process (orphans included) with
//! `waitpid(-1)`, which would steal the status of an exec'd child from the
//! connection thread waiting for it. So there is one table of live exec
//! children, guarded by one lock:
//!
//! - spawning holds the lock from `fork` until the pid is in the table, so the
//!   reaper cannot reap a child before it is known;
//! - the reaper holds the lock while it calls `waitpid`, and hands each exec
//!   child's raw wait status to its connection through a pipe (pollable, so
//!   the exec poll loop needs no extra thread);
//! - signals go to a process group only while its leader is in the table
//!   (not yet reaped), so a signal never reaches a recycled pid.
//!
//! [`Reaping::Central`] is for PID 1 and the host-mode agent process: some
//! other loop (the supervisor) calls [`Reaper::reap_all`] on `SIGCHLD`.
//! [`Reaping::PerChild`] is for embedding the agent in a process that has
//! other children of its own (tests): one small thread per exec waits for
//! that pid only.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, MutexGuard};

use super::sys;

/// How exec'd children are reaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaping {
    /// Something calls [`Reaper::reap_all`] (or the supervisor's reap loop)
    /// whenever `SIGCHLD` arrives; required when running as PID 1.
    Central,
    /// Each child gets a waiter thread that waits for its pid only.
    PerChild,
}

/// Live exec children: pid -> write end of its exit pipe.
pub(crate) struct Table {
    children: HashMap<libc::pid_t, File>,
}

impl Table {
    /// Hands a reaped child's raw wait status to its connection; false if the
    /// pid is not an exec child (an orphan PID 1 reaped, or an abandoned exec).
    pub(crate) fn deliver(&mut self, pid: libc::pid_t, status: libc::c_int) -> bool {
        match self.children.remove(&pid) {
            Some(mut pipe) => {
                // Four bytes into an empty pipe never block; if the reader is
                // gone the write fails harmlessly (SIGPIPE is ignored).
                let _ = pipe.write_all(&status.to_ne_bytes());
                true
            }
            None => false,
        }
    }
}

/// The table of exec children and the way they are reaped.
pub struct Reaper {
    mode: Reaping,
    table: Mutex<Table>,
}

impl Reaper {
    /// A reaper with no children.
    pub fn new(mode: Reaping) -> Arc<Self> {
        Arc::new(Self {
            mode,
            table: Mutex::new(Table {
                children: HashMap::new(),
            }),
        })
    }

    /// The table lock. A panic elsewhere must not stop reaping, so a
    /// poisoned lock is taken over (the table stays consistent: every
    /// mutation is a single insert or remove).
    pub(crate) fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns `cmd` and registers the child. The returned [`ExitWatch`]
    /// becomes readable when the child has been reaped.
    pub(crate) fn spawn(self: &Arc<Self>, cmd: &mut Command) -> io::Result<(Child, ExitWatch)> {
        let (read, write) = sys::pipe()?;
        sys::set_nonblocking(read.as_raw_fd(), true)?;
        let mut table = self.lock();
        let child = cmd.spawn()?;
        let pid = child.id() as libc::pid_t;
        table.children.insert(pid, write);
        drop(table);
        if self.mode == Reaping::PerChild {
            let me = Arc::clone(self);
            let waiter = std::thread::Builder::new()
                .name(format!("agent-wait-{pid}"))
                .stack_size(64 * 1024)
                .spawn(move || me.wait_for(pid));
            if let Err(e) = waiter {
                // Without a waiter nobody would reap it: undo the spawn.
                sys::kill_group(pid, libc::SIGKILL);
                // SAFETY: waits for our own child; status pointer may be null.
                unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
                self.lock().children.remove(&pid);
                return Err(e);
            }
        }
        let watch = ExitWatch {
            pid,
            read,
            reaper: Arc::clone(self),
        };
        Ok((child, watch))
    }

    /// [`Reaping::PerChild`]: waits until `pid` is a zombie without reaping it,
    /// then reaps it under the lock (so `signal_group` cannot race the reap).
    fn wait_for(&self, pid: libc::pid_t) {
        loop {
            // SAFETY: siginfo_t is plain data; waitid fills it.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: valid out pointer; WNOWAIT leaves the zombie in place.
            let rc = unsafe {
                libc::waitid(
                    libc::P_PID,
                    pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                )
            };
            if rc == 0 {
                break;
            }
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                break; // ECHILD: someone else reaped it; deliver below reports it.
            }
        }
        let mut table = self.lock();
        let mut status = 0;
        // SAFETY: valid out pointer; the child is a zombie, so this returns at once.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if rc != pid {
            // Lost track of it: report "killed by SIGKILL" rather than hang the exec.
            status = libc::SIGKILL;
        }
        table.deliver(pid, status);
    }

    /// [`Reaping::Central`]: reaps every exited child without blocking and
    /// hands exec children their status. Call on every `SIGCHLD`.
    pub fn reap_all(&self) {
        let mut table = self.lock();
        loop {
            let mut status = 0;
            // SAFETY: valid out pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid > 0 {
                table.deliver(pid, status);
                continue;
            }
            if pid < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
    }

    /// Sends `sig` to the process group of exec child `pid` if it has not
    /// been reaped yet; returns whether it was sent.
    pub(crate) fn signal_group(&self, pid: libc::pid_t, sig: libc::c_int) -> bool {
        let table = self.lock();
        if table.children.contains_key(&pid) {
            sys::kill_group(pid, sig);
            true
        } else {
            false
        }
    }

    /// Kills the process groups of all live exec children (host-mode shutdown).
    pub fn kill_all(&self) {
        let table = self.lock();
        for &pid in table.children.keys() {
            sys::kill_group(pid, libc::SIGKILL);
        }
    }

    /// Number of exec children not reaped yet.
    pub fn live(&self) -> usize {
        self.lock().children.len()
    }
}

/// The exit notification of one exec child.
pub(crate) struct ExitWatch {
    pid: libc::pid_t,
    read: File,
    reaper: Arc<Reaper>,
}

/// What [`ExitWatch::try_status`] found.
pub(crate) enum Exit {
    /// Still running (or reaped but not yet delivered).
    Running,
    /// Reaped with this raw wait status.
    Status(libc::c_int),
}

impl ExitWatch {
    /// Process id (and process group id) of the child.
    pub(crate) fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// The fd to poll for `POLLIN`.
    pub(crate) fn fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// Reads the status if it has been delivered (non-blocking).
    pub(crate) fn try_status(&mut self) -> Exit {
        let mut buf = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match self.read.read(&mut buf[got..]) {
                Ok(0) => {
                    // Writer gone without a status: cannot happen while we
                    // are registered; report it as killed rather than hang.
                    return Exit::Status(libc::SIGKILL);
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && got == 0 => {
                    return Exit::Running
                }
                // The 4 bytes are written at once, so a partial read only
                // happens mid-write; wait for the rest.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut fds = [libc::pollfd {
                        fd: self.fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    }];
                    let _ = sys::poll(&mut fds, None);
                }
                Err(_) => return Exit::Status(libc::SIGKILL),
            }
        }
        Exit::Status(libc::c_int::from_ne_bytes(buf))
    }

    /// Signals the child's process group unless it was already reaped.
    pub(crate) fn signal(&self, sig: libc::c_int) -> bool {
        self.reaper.signal_group(self.pid, sig)
    }
}

impl Drop for ExitWatch {
    fn drop(&mut self) {
        // An abandoned child (client gone) is left to the reaper as an orphan.
        // In PerChild mode the waiter thread still reaps it; removing the
        // entry only stops signals to it and the status hand-off.
        self.reaper.lock().children.remove(&self.pid);
    }
}
