//! `Open(Exec)`: run a process and stream its stdio over the connection.
//!
//! One connection thread runs one `poll(2)` loop over the connection, the
//! child's pipes (or PTY master) and the child's exit pipe; every fd is
//! non-blocking, so nothing in the loop can stall it.
//!
//! Back-pressure: output is read from the child only while less than one
//! chunk of encoded frames is waiting for the connection. When the host reads
//! slowly, the socket fills, the agent stops reading the pipe, the pipe fills
//! and the child blocks in `write` — nothing is buffered without bound. In
//! the other direction the agent reads the next client frame only once the
//! previous `Stdin` chunk has been written into the child, so a child that
//! does not read its stdin stalls the host's writes, not the agent's memory.
//! (Control frames queued behind such stdin wait too; dropping the connection
//! always works and kills the process.)
//!
//! End of an exec: after the process exits, output still in its pipes is
//! forwarded until EOF; if a descendant keeps the pipes open, forwarding stops
//! once they have been quiet for [`DRAIN_IDLE`] (or [`DRAIN_IDLE`] after the
//! exec's timeout, however chatty the descendant).
//! Then `Exited` is sent as the last frame.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use capsa_proto::{
    check_path, encode, AgentError, AgentFrame, ClientFrame, ErrorKind, ExecRequest, ExitStatus,
    CHUNK,
};

use super::frame::{Fill, FrameReader};
use super::reaper::{Exit, ExitWatch};
use super::{sys, Agent, Fail};
use crate::console::debug;

/// How long output pipes may stay silent after the process exited before the
/// agent stops waiting for their EOF (a background descendant holds them).
pub const DRAIN_IDLE: Duration = Duration::from_millis(200);
/// Bytes of encoded frames waiting for the connection above which the agent
/// stops reading the child's output.
const OUT_HIGH_WATER: usize = CHUNK;
/// How long a final error reply may take to reach a slow host.
const ERROR_FLUSH: Duration = Duration::from_secs(2);
/// Highest signal number Linux knows (`SIGRTMAX`).
const MAX_SIGNAL: i32 = 64;
/// Longest timeout honoured (100 years); longer ones are clamped to it.
const MAX_TIMEOUT_MS: u64 = 100 * 365 * 24 * 3600 * 1000;
/// `^D`: what "end of input" is on a terminal in canonical mode.
const VEOF: u8 = 0x04;

/// The environment every exec starts from; request entries override it.
fn default_env(term: &str) -> Vec<(String, String)> {
    let root_is_dir = match crate::rootfs::root() {
        Some(r) => r
            .stat(Path::new("/root"))
            .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR),
        None => Path::new("/root").is_dir(),
    };
    let home = if root_is_dir { "/root" } else { "/" };
    vec![
        ("PATH".to_string(), crate::GUEST_PATH.to_string()),
        ("HOME".to_string(), home.to_string()),
        ("TERM".to_string(), term.to_string()),
    ]
}

/// `base` with `overrides` applied: same name replaces, new names append
/// (later duplicates in `overrides` win).
pub(crate) fn merge_env(
    mut base: Vec<(String, String)>,
    overrides: &[(String, String)],
) -> Vec<(String, String)> {
    for (k, v) in overrides {
        match base.iter_mut().find(|(bk, _)| bk == k) {
            Some(entry) => entry.1 = v.clone(),
            None => base.push((k.clone(), v.clone())),
        }
    }
    base
}

/// Resolves `argv0` like `execvp`: as given if it contains a `/` (relative to
/// `cwd`), else the first executable regular file in `PATH`.
///
/// Done by the agent, not by `exec`, so that a missing program is reported
/// as [`ErrorKind::NotFound`] before anything is forked.
#[cfg(test)]
pub(crate) fn find_program(argv0: &str, path_var: &str, cwd: &str) -> Result<PathBuf, AgentError> {
    find_program_with(argv0, path_var, cwd, &host_stat)
}

/// What program lookup needs of a file.
pub(crate) struct FileInfo {
    is_dir: bool,
    is_file: bool,
    mode: u32,
}

/// `stat` in the agent's own file system.
fn host_stat(p: &Path) -> io::Result<FileInfo> {
    let m = std::fs::metadata(p)?;
    Ok(FileInfo {
        is_dir: m.is_dir(),
        is_file: m.is_file(),
        mode: m.permissions().mode(),
    })
}

/// `stat` inside the image root (symlinks resolved there).
fn root_stat(root: &crate::rootfs::RootDir, p: &Path) -> io::Result<FileInfo> {
    let st = root.stat(p)?;
    let fmt = st.st_mode & libc::S_IFMT;
    Ok(FileInfo {
        is_dir: fmt == libc::S_IFDIR,
        is_file: fmt == libc::S_IFREG,
        mode: st.st_mode,
    })
}

/// [`find_program`] with the file system given by `stat` (the agent's own,
/// or the image root's).
pub(crate) fn find_program_with(
    argv0: &str,
    path_var: &str,
    cwd: &str,
    stat: &dyn Fn(&Path) -> io::Result<FileInfo>,
) -> Result<PathBuf, AgentError> {
    let not_found = |msg: String| AgentError {
        kind: ErrorKind::NotFound,
        message: msg,
    };
    if argv0.contains('/') {
        let p = Path::new(cwd).join(argv0);
        return match stat(&p) {
            Ok(m) if m.is_dir => Err(AgentError {
                kind: ErrorKind::PermissionDenied,
                message: format!("{argv0}: is a directory"),
            }),
            Ok(_) => Ok(PathBuf::from(argv0)),
            Err(e) => Err(AgentError::io(argv0, &e)),
        };
    }
    let mut not_executable = None;
    for dir in path_var.split(':').take(256) {
        // An empty PATH element means the current directory (POSIX).
        let dir = if dir.is_empty() { cwd } else { dir };
        let candidate = Path::new(cwd).join(dir).join(argv0);
        if let Ok(m) = stat(&candidate) {
            if m.is_file && m.mode & 0o111 != 0 {
                return Ok(candidate);
            }
            if m.is_file {
                not_executable.get_or_insert(candidate);
            }
        }
    }
    match not_executable {
        Some(p) => Err(AgentError {
            kind: ErrorKind::PermissionDenied,
            message: format!("{}: not executable", p.display()),
        }),
        None => Err(not_found(format!("{argv0}: command not found in PATH"))),
    }
}

fn invalid(message: impl Into<String>) -> AgentError {
    AgentError {
        kind: ErrorKind::InvalidInput,
        message: message.into(),
    }
}

/// Runs one exec conversation on `conn` (the `Open` frame has been read).
pub(super) fn run<S: Read + Write + AsRawFd>(
    agent: &Agent,
    conn: &mut S,
    rd: &mut FrameReader,
    req: ExecRequest,
) -> Result<(), Fail> {
    req.validate()
        .map_err(|e| Fail::Reply(invalid(e.to_string())))?;
    let cwd = req.cwd.clone().unwrap_or_else(|| "/".to_string());
    check_path(&cwd).map_err(|e| Fail::Reply(invalid(format!("cwd: {e}"))))?;
    // A bad cwd is the request's fault (InvalidInput): at exec start,
    // NotFound and PermissionDenied mean the program alone, so the host can
    // map them to the shell's 127 and 126.
    let root = crate::rootfs::root();
    let stat = |p: &Path| match root {
        Some(r) => root_stat(r, p),
        None => host_stat(p),
    };
    match stat(Path::new(&cwd)) {
        Ok(m) if m.is_dir => {}
        Ok(_) => return Err(Fail::Reply(invalid(format!("cwd {cwd}: not a directory")))),
        Err(e) => return Err(Fail::Reply(invalid(format!("cwd {cwd}: {e}")))),
    }
    let env = merge_env(default_env(&agent.config.term), &req.env);
    let path_var = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    // With an image root, PATH is searched inside the image.
    let program = find_program_with(&req.argv[0], path_var, &cwd, &stat).map_err(Fail::Reply)?;

    let mut cmd = Command::new(&program);
    cmd.arg0(&req.argv[0])
        .args(&req.argv[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)));
    // In the image root the child enters the root itself (chroot, chdir,
    // then the ids: std would set them before a pre_exec hook runs).
    // Supplementary groups also take this path: std cannot set them (stable).
    let enter = if root.is_some() || !req.groups.is_empty() {
        let cwd_c = std::ffi::CString::new(cwd.as_bytes())
            .map_err(|_| Fail::Reply(invalid("cwd holds NUL")))?;
        Some(EnterRoot {
            root: root.map(|r| r.path().clone()),
            cwd: cwd_c,
            uid: req.uid,
            gid: req.gid,
            groups: req.groups.iter().map(|&g| g as libc::gid_t).collect(),
        })
    } else {
        // Setting a cwd equal to our own would only cost: std cannot use
        // posix_spawn with a cwd in a static binary and falls back to fork.
        if std::env::current_dir().ok().as_deref() != Some(std::path::Path::new(&cwd)) {
            cmd.current_dir(&cwd);
        }
        // std drops supplementary groups and calls setgid before setuid.
        if let Some(gid) = req.gid {
            cmd.gid(gid);
        }
        if let Some(uid) = req.uid {
            cmd.uid(uid);
        }
        None
    };
    let pty = match req.pty {
        Some(size) => {
            let pty = sys::open_pty(size.rows, size.cols)
                .map_err(|e| Fail::Reply(AgentError::io("open a pty", &e)))?;
            let stdio = || -> io::Result<Stdio> { Ok(Stdio::from(pty.slave.try_clone()?)) };
            let (i, o, e) = (stdio(), stdio(), stdio());
            match (i, o, e) {
                (Ok(i), Ok(o), Ok(e)) => {
                    cmd.stdin(i).stdout(o).stderr(e);
                }
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                    return Err(Fail::Reply(AgentError::io("dup the pty", &e)))
                }
            }
            Some(pty.master)
        }
        None => {
            cmd.stdin(if req.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
            None
        }
    };
    let with_pty = pty.is_some();
    // The agent keeps PID 1's TERM/INT/HUP/CHLD blocked for its signal loop.
    // Only std's posix_spawn path resets the mask, and the static guest build
    // forks (measured: children came up with the mask), so a command would
    // inherit it: `timeout 1 sleep 5` would wait the full 5 s and a
    // container's process could not be stopped with SIGTERM.
    // SAFETY: the closure only makes async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(|| {
            sys::unblock_all_signals();
            Ok(())
        });
    }
    if let Some(enter) = enter {
        // SAFETY: the closure only makes async-signal-safe system calls on
        // data prepared before the fork.
        unsafe {
            cmd.pre_exec(move || enter.enter());
        }
    }
    if with_pty {
        // SAFETY: the closure only makes async-signal-safe system calls.
        unsafe {
            cmd.pre_exec(move || {
                // Own session (hence process group) with the PTY as its
                // controlling terminal, so job control and ^C work.
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    } else {
        // Own process group so signals and the timeout kill reach the whole
        // tree.
        cmd.process_group(0);
    }
    let (mut child, watch) = agent
        .reaper
        .spawn(&mut cmd)
        .map_err(|e| Fail::Reply(AgentError::io(&format!("exec {}", req.argv[0]), &e)))?;
    // The Command holds the parent's copies of the PTY slave; close them now,
    // or the master would never see the child's side close.
    drop(cmd);
    let pid = watch.pid();
    debug!("exec pid {pid}: {:?}", req.argv[0]);

    let to_file = |fd: Option<OwnedFd>| fd.map(File::from);
    let (stdin, stdout, stderr) = match pty {
        Some(master) => {
            let writer = master.try_clone();
            match writer {
                Ok(w) => (Some(w), Some(master), None),
                Err(e) => {
                    watch.signal(libc::SIGKILL);
                    return Err(Fail::Reply(AgentError::io("dup the pty", &e)));
                }
            }
        }
        None => (
            to_file(child.stdin.take().map(OwnedFd::from)),
            to_file(child.stdout.take().map(OwnedFd::from)),
            to_file(child.stderr.take().map(OwnedFd::from)),
        ),
    };
    drop(child);

    let mut exec = ExecLoop {
        conn_fd: conn.as_raw_fd(),
        conn,
        rd,
        out: Vec::new(),
        out_pos: 0,
        stdin_allowed: req.stdin || with_pty,
        pty_master: if with_pty {
            stdout.as_ref().map(|f| f.as_raw_fd())
        } else {
            None
        },
        stdout,
        stderr,
        stdin,
        stdin_eof: false,
        stdin_dead: false,
        pending: Vec::new(),
        pending_pos: 0,
        close_stdin_when_flushed: false,
        watch,
        status: None,
        timed_out: false,
        // Clamped so that no Instant arithmetic can overflow (which panics).
        deadline: req.timeout_ms.and_then(|ms| {
            Instant::now().checked_add(Duration::from_millis(ms.min(MAX_TIMEOUT_MS)))
        }),
        exit_at: None,
        last_output: Instant::now(),
        exited_queued: false,
        scratch: vec![0u8; CHUNK],
    };
    exec.start(pid)
}

/// State of one running exec.
struct ExecLoop<'a, S> {
    conn: &'a mut S,
    conn_fd: RawFd,
    rd: &'a mut FrameReader,
    /// Encoded frames not yet written to the connection.
    out: Vec<u8>,
    out_pos: usize,
    /// Whether the request allows `Stdin` frames (stdin=true or a PTY).
    stdin_allowed: bool,
    /// The PTY master, if any (also `stdout`).
    pty_master: Option<RawFd>,
    stdout: Option<File>,
    stderr: Option<File>,
    stdin: Option<File>,
    /// `StdinEof` received.
    stdin_eof: bool,
    /// The child closed its stdin; further input is discarded.
    stdin_dead: bool,
    /// One `Stdin` chunk being written into the child.
    pending: Vec<u8>,
    pending_pos: usize,
    close_stdin_when_flushed: bool,
    watch: ExitWatch,
    status: Option<libc::c_int>,
    timed_out: bool,
    deadline: Option<Instant>,
    exit_at: Option<Instant>,
    last_output: Instant,
    exited_queued: bool,
    scratch: Vec<u8>,
}

/// Indices into the poll set.
const CONN: usize = 0;
const STDOUT: usize = 1;
const STDERR: usize = 2;
const STDIN: usize = 3;
const EXIT: usize = 4;

fn pfd(fd: Option<RawFd>, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        // A negative fd makes poll skip the entry.
        fd: if events == 0 { -1 } else { fd.unwrap_or(-1) },
        events,
        revents: 0,
    }
}

impl<S: Read + Write + AsRawFd> ExecLoop<'_, S> {
    fn start(&mut self, pid: libc::pid_t) -> Result<(), Fail> {
        let started = AgentFrame::Started { pid: pid as u32 };
        self.push(&started)?;
        sys::set_nonblocking(self.conn_fd, true).map_err(|_| Fail::Gone)?;
        for f in [&self.stdout, &self.stderr, &self.stdin]
            .into_iter()
            .flatten()
        {
            sys::set_nonblocking(f.as_raw_fd(), true).map_err(|_| Fail::Gone)?;
        }
        self.run()
    }

    fn push(&mut self, frame: &AgentFrame) -> Result<(), Fail> {
        let bytes = encode(frame).map_err(|_| Fail::Gone)?;
        self.out.extend_from_slice(&bytes);
        Ok(())
    }

    fn out_len(&self) -> usize {
        self.out.len() - self.out_pos
    }

    fn outputs_open(&self) -> bool {
        self.stdout.is_some() || self.stderr.is_some()
    }

    fn run(&mut self) -> Result<(), Fail> {
        loop {
            // Client frames already buffered, one Stdin chunk at a time.
            while self.pending.is_empty() && !self.exited_queued {
                match self.rd.next_frame() {
                    Ok(Some(frame)) => self.on_frame(frame)?,
                    Ok(None) => break,
                    Err(e) => return self.violation(format!("bad frame: {e}")),
                }
            }
            let now = Instant::now();
            if let Some(deadline) = self.deadline {
                if now >= deadline && self.status.is_none() && !self.timed_out {
                    debug!("exec pid {}: timeout, killing", self.watch.pid());
                    self.watch.signal(libc::SIGKILL);
                    self.timed_out = true;
                }
            }
            if self.outputs_open() && self.drain_cutoff().is_some_and(|t| now >= t) {
                self.close_outputs();
            }
            if let Some(status) = self.status {
                if !self.outputs_open() && !self.exited_queued {
                    self.exited_queued = true;
                    let st = exit_status(status, self.timed_out);
                    self.push(&AgentFrame::Exited(st))?;
                }
            }
            self.flush()?;
            if self.exited_queued && self.out_len() == 0 {
                sys::shutdown_write(self.conn_fd);
                return Ok(());
            }
            self.wait_and_handle(now)?;
        }
    }

    /// When to stop forwarding output after the process exited: once the
    /// pipes were quiet for [`DRAIN_IDLE`] while the host kept up, or
    /// [`DRAIN_IDLE`] after the timeout whatever is still flowing.
    fn drain_cutoff(&self) -> Option<Instant> {
        let exit_at = self.exit_at?;
        let quiet = (self.out_len() == 0).then(|| self.last_output.max(exit_at) + DRAIN_IDLE);
        let hard = self.deadline.map(|d| d.max(exit_at) + DRAIN_IDLE);
        match (quiet, hard) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn close_outputs(&mut self) {
        self.stdout = None;
        self.stderr = None;
    }

    /// One poll over everything, then the I/O it allows.
    fn wait_and_handle(&mut self, now: Instant) -> Result<(), Fail> {
        let read_conn = self.pending.is_empty() && !self.exited_queued;
        let room = self.out_len() < OUT_HIGH_WATER;
        let mut conn_events = libc::POLLRDHUP;
        if read_conn {
            conn_events |= libc::POLLIN;
        }
        if self.out_len() > 0 {
            conn_events |= libc::POLLOUT;
        }
        let out_events = if room { libc::POLLIN } else { 0 };
        let in_events = if self.pending.is_empty() {
            0
        } else {
            libc::POLLOUT
        };
        let exit_events = if self.status.is_none() {
            libc::POLLIN
        } else {
            0
        };
        let mut fds = [
            pfd(Some(self.conn_fd), conn_events),
            pfd(self.stdout.as_ref().map(|f| f.as_raw_fd()), out_events),
            pfd(self.stderr.as_ref().map(|f| f.as_raw_fd()), out_events),
            pfd(self.stdin.as_ref().map(|f| f.as_raw_fd()), in_events),
            pfd(Some(self.watch.fd()), exit_events),
        ];
        let mut timeout: Option<Duration> = None;
        let mut wake_at = |t: Instant| {
            let d = t.saturating_duration_since(now);
            timeout = Some(timeout.map_or(d, |cur: Duration| cur.min(d)));
        };
        if let Some(d) = self.deadline {
            if !self.timed_out {
                wake_at(d);
            }
        }
        if self.outputs_open() {
            if let Some(t) = self.drain_cutoff() {
                wake_at(t);
            }
        }
        sys::poll(&mut fds, timeout).map_err(|_| Fail::Gone)?;

        let hup = libc::POLLHUP | libc::POLLERR | libc::POLLRDHUP;
        let conn_rev = fds[CONN].revents;
        if conn_rev & libc::POLLNVAL != 0 {
            return Err(Fail::Gone);
        }
        if read_conn && conn_rev & (libc::POLLIN | hup) != 0 {
            match self.rd.fill(self.conn) {
                Ok(Fill::Data) | Ok(Fill::WouldBlock) => {}
                // The client went away (or half-closed, which this protocol
                // does not use): the process must not run on unobserved.
                Ok(Fill::Eof) | Err(_) => return Err(Fail::Gone),
            }
        } else if conn_rev & hup != 0 {
            return Err(Fail::Gone);
        }
        if fds[EXIT].revents != 0 {
            if let Exit::Status(status) = self.watch.try_status() {
                self.on_exit(status);
            }
        }
        if fds[STDOUT].revents != 0 {
            self.read_output(true);
        }
        if fds[STDERR].revents != 0 {
            self.read_output(false);
        }
        if fds[STDIN].revents != 0 {
            self.write_stdin();
        }
        Ok(())
    }

    fn on_exit(&mut self, status: libc::c_int) {
        self.status = Some(status);
        self.exit_at = Some(Instant::now());
        // Nobody is left to read stdin.
        self.stdin = None;
        self.pending.clear();
        self.pending_pos = 0;
        self.stdin_dead = true;
    }

    /// Reads one chunk from stdout (or the PTY) or stderr and queues it.
    fn read_output(&mut self, is_stdout: bool) {
        let file = if is_stdout {
            &mut self.stdout
        } else {
            &mut self.stderr
        };
        let Some(f) = file.as_mut() else { return };
        match f.read(&mut self.scratch) {
            Ok(0) => *file = None,
            Ok(n) => {
                let data = self.scratch[..n].to_vec();
                let frame = if is_stdout {
                    AgentFrame::Stdout(data)
                } else {
                    AgentFrame::Stderr(data)
                };
                // n <= CHUNK, far below MAX_FRAME: encoding cannot fail.
                if let Ok(bytes) = encode(&frame) {
                    self.out.extend_from_slice(&bytes);
                }
                self.last_output = Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // EIO on a PTY master: the slave side is closed everywhere.
            Err(_) => *file = None,
        }
    }

    fn write_stdin(&mut self) {
        let Some(f) = self.stdin.as_mut() else {
            self.pending.clear();
            self.pending_pos = 0;
            return;
        };
        while self.pending_pos < self.pending.len() {
            match f.write(&self.pending[self.pending_pos..]) {
                Ok(n) => self.pending_pos += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    // EPIPE: the child closed its stdin; drop what is left.
                    self.stdin = None;
                    self.stdin_dead = true;
                    break;
                }
            }
        }
        self.pending.clear();
        self.pending_pos = 0;
        if self.close_stdin_when_flushed {
            self.close_stdin_when_flushed = false;
            self.stdin = None;
        }
    }

    fn on_frame(&mut self, frame: ClientFrame) -> Result<(), Fail> {
        match frame {
            ClientFrame::Stdin(data) => {
                if !self.stdin_allowed {
                    return self.violation("Stdin frame for an exec without stdin".into());
                }
                if self.stdin_eof {
                    return self.violation("Stdin frame after StdinEof".into());
                }
                if !self.stdin_dead && !data.is_empty() {
                    self.pending = data;
                    self.pending_pos = 0;
                    self.write_stdin();
                }
            }
            ClientFrame::StdinEof => {
                if self.stdin_eof || self.stdin_dead || !self.stdin_allowed {
                    return Ok(());
                }
                self.stdin_eof = true;
                if self.pty_master.is_some() {
                    // A terminal has no half-close; ^D is end of input to
                    // programs reading it in canonical mode.
                    self.pending = vec![VEOF];
                    self.pending_pos = 0;
                    self.write_stdin();
                } else {
                    self.close_stdin_when_flushed = true;
                    self.write_stdin();
                }
            }
            ClientFrame::Signal(sig) => {
                if !(1..=MAX_SIGNAL).contains(&sig) {
                    return self.violation(format!("signal {sig} out of range 1..={MAX_SIGNAL}"));
                }
                self.watch.signal(sig);
            }
            ClientFrame::Resize(size) => {
                // Without a PTY there is nothing to resize; harmless, ignored.
                if let Some(master) = self.pty_master {
                    if self.stdout.is_some() {
                        let _ = sys::set_winsize(master, size.rows, size.cols);
                    }
                }
            }
            ClientFrame::Open { .. } | ClientFrame::Data(_) | ClientFrame::End => {
                return self.violation(format!(
                    "unexpected {} frame during an exec",
                    super::client_frame_name(&frame)
                ));
            }
        }
        Ok(())
    }

    /// The client broke the protocol: kill the process, send an error (best
    /// effort, bounded time), end the connection.
    fn violation(&mut self, message: String) -> Result<(), Fail> {
        debug!("exec pid {}: {message}", self.watch.pid());
        self.watch.signal(libc::SIGKILL);
        let _ = self.push(&AgentFrame::Error(invalid(message)));
        let until = Instant::now() + ERROR_FLUSH;
        while self.out_len() > 0 {
            self.flush()?;
            let now = Instant::now();
            if self.out_len() == 0 || now >= until {
                break;
            }
            let mut fds = [pfd(Some(self.conn_fd), libc::POLLOUT)];
            let _ = sys::poll(&mut fds, Some(until - now));
        }
        Err(Fail::Gone)
    }

    /// Writes queued frames until the socket would block.
    fn flush(&mut self) -> Result<(), Fail> {
        while self.out_len() > 0 {
            match self.conn.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(Fail::Gone),
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return Err(Fail::Gone),
            }
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            if self.out.capacity() > 4 * CHUNK {
                self.out = Vec::new();
            }
        } else if self.out_pos > CHUNK {
            // Keep the buffer from creeping: drop what has been sent.
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        Ok(())
    }
}

impl<S> Drop for ExecLoop<'_, S> {
    fn drop(&mut self) {
        // However the conversation ended (client gone, protocol broken, even
        // a panic), the process must not outlive it. A no-op once reaped.
        if self.status.is_none() {
            self.watch.signal(libc::SIGKILL);
        }
    }
}

/// What a child does to enter the image root before `exec`.
struct EnterRoot {
    /// The image root to chroot into, if any.
    root: Option<std::ffi::CString>,
    cwd: std::ffi::CString,
    uid: Option<u32>,
    gid: Option<u32>,
    /// Supplementary groups (bounded by the protocol's validation).
    groups: Vec<libc::gid_t>,
}

impl EnterRoot {
    /// Runs in the forked child: only async-signal-safe calls.
    fn enter(&self) -> io::Result<()> {
        let check = |rc: libc::c_int| {
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        // SAFETY: plain system calls on NUL-terminated strings made before the fork.
        unsafe {
            if let Some(root) = &self.root {
                check(libc::chroot(root.as_ptr()))?;
            }
            check(libc::chdir(self.cwd.as_ptr()))?;
            // Groups first: after setuid the process may no longer change them.
            if self.gid.is_some() || self.uid.is_some() || !self.groups.is_empty() {
                check(libc::setgroups(self.groups.len(), self.groups.as_ptr()))?;
            }
            if let Some(gid) = self.gid {
                check(libc::setgid(gid))?;
            }
            if let Some(uid) = self.uid {
                check(libc::setuid(uid))?;
            }
        }
        Ok(())
    }
}

/// Turns a raw wait status into the protocol's exit status.
pub(crate) fn exit_status(status: libc::c_int, timed_out: bool) -> ExitStatus {
    let (code, signal) = if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    };
    ExitStatus {
        code,
        signal,
        timed_out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_defaults_in_place() {
        let base = default_env("linux");
        let merged = merge_env(
            base,
            &[
                ("TERM".into(), "xterm".into()),
                ("A".into(), "1".into()),
                ("A".into(), "2".into()),
            ],
        );
        let get = |k: &str| merged.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("TERM"), Some("xterm"));
        assert_eq!(get("A"), Some("2"));
        assert_eq!(get("PATH"), Some(crate::GUEST_PATH));
        assert_eq!(merged.iter().filter(|(k, _)| k == "A").count(), 1);
    }

    #[test]
    fn program_lookup() {
        let dir = std::env::temp_dir().join(format!("capsa-lookup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("prog");
        std::fs::write(&exe, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plain = dir.join("plain");
        std::fs::write(&plain, b"x").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        let path = format!("/nonexistent:{}", dir.display());
        assert_eq!(find_program("prog", &path, "/").unwrap(), exe);
        assert_eq!(
            find_program("nope", &path, "/").unwrap_err().kind,
            ErrorKind::NotFound
        );
        assert_eq!(
            find_program("plain", &path, "/").unwrap_err().kind,
            ErrorKind::PermissionDenied
        );
        assert_eq!(
            find_program("/no/such/prog", &path, "/").unwrap_err().kind,
            ErrorKind::NotFound
        );
        assert_eq!(
            find_program("./prog", "", dir.to_str().unwrap()).unwrap(),
            PathBuf::from("./prog")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn wait_status_mapping() {
        assert_eq!(exit_status(3 << 8, false).code, Some(3));
        let killed = exit_status(libc::SIGKILL, true);
        assert_eq!((killed.code, killed.signal), (None, Some(9)));
        assert!(killed.timed_out);
    }
}
