//! The on-disk layout of sandboxes: how a VM is found again by name, from any
//! process, after its creator is gone.
//!
//! ```text
//! <root>/sandboxes/<name>/
//!   spec.json         the VmSpec the monitor boots (written by the spawner)
//!   sandbox.json      library-level extras (env, workdir, kind), opaque here
//!   restore.json      present until started: restore this snapshot instead of booting
//!   restored-from.json  what restore.json said, once the restore succeeded
//!   disk<N>.qcow2     a restored VM's own overlays on the snapshot's frozen disks
//!   state.json        written atomically by the monitor on every transition
//!   monitor.pid       the monitor's pid
//!   monitor.sock      tarpc control socket (mode 0600)
//!   monitor.log       the monitor's own log (its stderr)
//!   console.log       guest serial output (capped)
//!   console.sock      console clients: history, then live; writes go to the guest
//!   vsock.sock        hybrid-vsock socket (+ vsock.sock_<port> listeners)
//!   vhost-vsock.sock  the vhost-user socket QEMU connects to
//!   qmp.sock          QEMU's QMP socket (only the monitor talks to it)
//! ```
//!
//! The directory itself is the lock-free registry: a sandbox exists iff its
//! directory exists, and `state.json` + the monitor's pid (checked against its
//! recorded start time, so pid reuse cannot fake a live monitor) tell whether
//! it is alive.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capsa_core::{ExitReason, VmSpec};
use serde::{Deserialize, Serialize};

use crate::{Result, VmmError};

/// Errors of this module are [`VmmError`]s (one error type per crate).
pub type StateError = VmmError;

/// File names inside a sandbox directory.
pub mod files {
    /// The VM spec.
    pub const SPEC: &str = "spec.json";
    /// Library-level extras.
    pub const SANDBOX: &str = "sandbox.json";
    /// The monitor's state record.
    pub const STATE: &str = "state.json";
    /// The monitor's pid.
    pub const PID: &str = "monitor.pid";
    /// The monitor's control socket.
    pub const MONITOR_SOCK: &str = "monitor.sock";
    /// The monitor's log.
    pub const MONITOR_LOG: &str = "monitor.log";
    /// The guest console log.
    pub const CONSOLE_LOG: &str = "console.log";
    /// The console socket.
    pub const CONSOLE_SOCK: &str = "console.sock";
    /// The VNC viewer socket (VMs with a display): each connection becomes
    /// a viewer of QEMU's VNC server (RFB over this stream).
    pub const VNC_SOCK: &str = "vnc.sock";
    /// The hybrid-vsock socket.
    pub const VSOCK_SOCK: &str = "vsock.sock";
    /// The vhost-user vsock socket (the longest socket name in the directory).
    pub const VHOST_VSOCK_SOCK: &str = "vhost-vsock.sock";
    /// QEMU's QMP socket.
    pub const QMP_SOCK: &str = "qmp.sock";
    /// A [`super::RestoreRequest`]: the monitor restores instead of booting.
    pub const RESTORE: &str = "restore.json";
    /// The [`super::RestoreRequest`] a restored sandbox came from (kept for
    /// `inspect`; no longer acted on, so `start` after a stop boots cold).
    pub const RESTORED_FROM: &str = "restored-from.json";
}

/// Asks the monitor to start the VM from a snapshot instead of booting
/// `spec.json` (the content of [`files::RESTORE`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// The snapshot directory (absolute).
    pub snapshot: PathBuf,
}

/// Longest Unix socket path (`sun_path` is 108 bytes including the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// How long a directory without `state.json` counts as "being created" before it is dead.
const CREATE_GRACE: Duration = Duration::from_secs(10);

/// Largest state file accepted (they are a few hundred bytes; a huge one is not ours).
const MAX_STATE_FILE: u64 = 1 << 20;

/// What the monitor last recorded, as stored in `state.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordedState {
    /// The monitor is up; QEMU is not running yet.
    Starting,
    /// The guest runs.
    Running,
    /// The vCPUs are paused.
    Paused,
    /// The VM ended; `exit` says how.
    Stopped,
}

/// The content of `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    /// The recorded state.
    pub state: RecordedState,
    /// How the VM ended, once it has.
    #[serde(default)]
    pub exit: Option<ExitReason>,
    /// The monitor's pid.
    pub monitor_pid: u32,
    /// The monitor's start time (field 22 of `/proc/<pid>/stat`), to detect pid reuse.
    #[serde(default)]
    pub monitor_starttime: Option<u64>,
    /// QEMU's pid, once started.
    #[serde(default)]
    pub vmm_pid: Option<u32>,
    /// QEMU's start time, to detect pid reuse before signalling it.
    #[serde(default)]
    pub vmm_starttime: Option<u64>,
    /// When the sandbox was created (unix seconds).
    pub created_at: u64,
    /// When this record was written (unix seconds).
    pub updated_at: u64,
}

impl StateFile {
    /// Writes the record to `dir/state.json` atomically (temp file + rename), so
    /// a reader never sees half a record.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let tmp = dir.join(".state.json.tmp");
        let path = dir.join(files::STATE);
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| VmmError::BadState {
            path: path.clone(),
            message: e.to_string(),
        })?;
        std::fs::write(&tmp, bytes)
            .map_err(|e| VmmError::io(format!("writing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| VmmError::io(format!("renaming to {}", path.display()), e))
    }

    /// Reads `dir/state.json`; `Ok(None)` if it does not exist (yet).
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        read_json_opt(&dir.join(files::STATE))
    }
}

/// What a sandbox is doing, as seen from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// The monitor is up and QEMU is starting.
    Starting,
    /// The guest runs.
    Running,
    /// The vCPUs are paused.
    Paused,
    /// The VM ended cleanly and its monitor recorded how; it can be started again.
    Stopped,
    /// The monitor died without recording an exit (killed, crashed): only removal helps.
    Dead,
}

impl std::fmt::Display for SandboxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SandboxState::Starting => "starting",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Stopped => "stopped",
            SandboxState::Dead => "dead",
        })
    }
}

/// One sandbox found on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// Its name (the directory name).
    pub name: String,
    /// Its state directory.
    pub dir: PathBuf,
    /// Its state, with liveness checked.
    pub state: SandboxState,
    /// The monitor's pid, when recorded.
    pub monitor_pid: Option<u32>,
    /// QEMU's pid, when recorded.
    pub vmm_pid: Option<u32>,
    /// Creation time (unix seconds).
    pub created_at: u64,
    /// The VM spec, when readable.
    pub spec: Option<VmSpec>,
    /// Library-level extras from `sandbox.json`.
    pub extra: Option<serde_json::Value>,
    /// How the VM ended, once it has.
    pub exit: Option<ExitReason>,
}

impl SandboxRecord {
    /// Whether a live monitor owns this sandbox.
    pub fn is_live(&self) -> bool {
        matches!(
            self.state,
            SandboxState::Starting | SandboxState::Running | SandboxState::Paused
        )
    }
}

/// The directory all sandboxes live under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateRoot {
    root: PathBuf,
}

impl StateRoot {
    /// The default root: `$CAPSA_STATE_DIR`; else `$XDG_RUNTIME_DIR/capsa` when
    /// that is a directory; else `/run/capsa` for root; else `$TMPDIR/capsa-<uid>`.
    ///
    /// A runtime directory (tmpfs, per user) fits: sandboxes do not survive a
    /// reboot, and socket paths stay short.
    pub fn default_root() -> Self {
        if let Some(d) = std::env::var_os("CAPSA_STATE_DIR").filter(|d| !d.is_empty()) {
            return Self::new(d);
        }
        if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
            if d.is_dir() {
                return Self::new(d.join("capsa"));
            }
        }
        // SAFETY: geteuid/getuid cannot fail and touch no memory.
        let (euid, uid) = unsafe { (libc::geteuid(), libc::getuid()) };
        if euid == 0 {
            return Self::new("/run/capsa");
        }
        Self::new(std::env::temp_dir().join(format!("capsa-{uid}")))
    }

    /// A root at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { root: path.into() }
    }

    /// The root directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// `<root>/sandboxes`.
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.root.join("sandboxes")
    }

    /// `<root>/sandboxes/<name>` (the name is not validated here).
    pub fn sandbox_dir(&self, name: &str) -> PathBuf {
        self.sandboxes_dir().join(name)
    }

    /// Refuses a root (or its `sandboxes` directory) that another user owns
    /// or can write: it could hold a planted agent socket or a `state.json`
    /// naming a victim's process. Missing directories pass (they are created 0700).
    pub fn check(&self) -> Result<()> {
        for d in [self.root.clone(), self.sandboxes_dir()] {
            capsa_core::check_private_dir(&d).map_err(|problem| VmmError::UnsafeStateRoot {
                path: d.clone(),
                problem,
            })?;
        }
        Ok(())
    }

    /// Every sandbox under the root, sorted by name. Entries that are not
    /// valid sandbox names are skipped.
    pub fn list(&self) -> Result<Vec<SandboxRecord>> {
        self.check()?;
        let dir = self.sandboxes_dir();
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(VmmError::io(format!("listing {}", dir.display()), e)),
        };
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| VmmError::io(format!("listing {}", dir.display()), e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if validate_name(&name).is_err() {
                continue;
            }
            match self.get(&name) {
                Ok(r) => out.push(r),
                // Removed between readdir and read: not an error for a listing.
                Err(VmmError::NotFound { .. }) => {}
                // One corrupt sandbox must not hide the others: list it as dead.
                Err(VmmError::BadState { .. }) => out.push(SandboxRecord {
                    dir: self.sandbox_dir(&name),
                    name,
                    state: SandboxState::Dead,
                    monitor_pid: None,
                    vmm_pid: None,
                    created_at: 0,
                    spec: None,
                    extra: None,
                    exit: None,
                }),
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The sandbox called `name`.
    pub fn get(&self, name: &str) -> Result<SandboxRecord> {
        validate_name(name)?;
        self.check()?;
        let dir = self.sandbox_dir(name);
        let meta = match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => m,
            _ => {
                return Err(VmmError::NotFound {
                    name: name.to_string(),
                    root: self.root.clone(),
                })
            }
        };
        let spec: Option<VmSpec> = read_json_opt(&dir.join(files::SPEC)).unwrap_or(None);
        let extra: Option<serde_json::Value> =
            read_json_opt(&dir.join(files::SANDBOX)).unwrap_or(None);
        let state = StateFile::read(&dir)?;
        let dir_age = meta
            .modified()
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .unwrap_or_default();
        let created_from_dir = meta
            .modified()
            .ok()
            .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        Ok(match state {
            None => SandboxRecord {
                name: name.to_string(),
                dir,
                // Spawner crashed before the monitor wrote anything?
                state: if dir_age > CREATE_GRACE {
                    SandboxState::Dead
                } else {
                    SandboxState::Starting
                },
                monitor_pid: None,
                vmm_pid: None,
                created_at: created_from_dir,
                spec,
                extra,
                exit: None,
            },
            Some(s) => {
                let live = process_alive(s.monitor_pid, s.monitor_starttime);
                let state = match s.state {
                    RecordedState::Stopped => SandboxState::Stopped,
                    _ if !live => SandboxState::Dead,
                    RecordedState::Starting => SandboxState::Starting,
                    RecordedState::Running => SandboxState::Running,
                    RecordedState::Paused => SandboxState::Paused,
                };
                SandboxRecord {
                    name: name.to_string(),
                    dir,
                    state,
                    monitor_pid: Some(s.monitor_pid),
                    vmm_pid: s.vmm_pid,
                    created_at: s.created_at,
                    spec,
                    extra,
                    exit: s.exit,
                }
            }
        })
    }

    /// Kills whatever processes of the sandbox are left: a live monitor
    /// (SIGKILL, after checking its start time) and QEMU (after checking
    /// `/proc/<pid>/cmdline` names QEMU and this directory). The directory stays.
    pub fn kill_leftovers(&self, name: &str) -> Result<()> {
        validate_name(name)?;
        let dir = self.sandbox_dir(name);
        if let Some(s) = StateFile::read(&dir)? {
            if process_alive(s.monitor_pid, s.monitor_starttime) {
                tracing::info!(sandbox = name, pid = s.monitor_pid, "killing its monitor");
                kill_pid(s.monitor_pid);
                // kill(2) only queues the signal: wait (bounded) until it is
                // gone, so "removed" means no process of the sandbox is left.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                while process_alive(s.monitor_pid, s.monitor_starttime)
                    && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            if let Some(pid) = s.vmm_pid {
                kill_leftover_qemu(pid, s.vmm_starttime, &dir);
            }
        }
        Ok(())
    }

    /// Removes the sandbox's directory, first killing whatever is left of it:
    /// a live monitor (SIGKILL, after checking its start time) and QEMU
    /// (after checking `/proc/<pid>/cmdline` names QEMU and this directory).
    ///
    /// This is the low-level, unconditional removal; callers decide whether a
    /// running sandbox may be removed (see `capsa::Sandboxes::remove`).
    pub fn remove(&self, name: &str) -> Result<()> {
        validate_name(name)?;
        let dir = self.sandbox_dir(name);
        if !dir.is_dir() {
            return Err(VmmError::NotFound {
                name: name.to_string(),
                root: self.root.clone(),
            });
        }
        // A malformed state.json must not block removal.
        if let Err(e) = self.kill_leftovers(name) {
            tracing::warn!(sandbox = name, "{e}");
        }
        std::fs::remove_dir_all(&dir)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|e| VmmError::io(format!("removing {}", dir.display()), e))
    }
}

/// Checks a sandbox name: 1-63 characters `[a-z0-9][a-z0-9_.-]*`.
///
/// Names become directory names and parts of socket paths, so the rule keeps
/// them path-safe (no `/`, no `..`, no leading dot or dash) and short.
pub fn validate_name(name: &str) -> Result<(), StateError> {
    capsa_core::check_name(name).map_err(|problem| VmmError::InvalidName {
        name: name.chars().take(80).collect(),
        problem,
    })
}

/// Refuses a sandbox directory whose socket paths would exceed the Unix limit.
pub fn check_socket_paths(dir: &Path) -> Result<()> {
    // vhost-vsock.sock is the longest fixed name; listeners add `_<port>` to
    // vsock.sock, which stays shorter for ports below 10^5.
    let longest = dir.join(files::VHOST_VSOCK_SOCK);
    let len = longest.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(VmmError::PathTooLong {
            path: longest,
            len,
            max: MAX_SOCKET_PATH,
        });
    }
    Ok(())
}

/// Writes `v` as JSON to `path` atomically (temp file in the same directory, then rename).
pub(crate) fn write_json_atomic<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(v).map_err(|e| VmmError::BadState {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes)
        .map_err(|e| VmmError::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| VmmError::io(format!("renaming to {}", path.display()), e))
}

/// Reads a JSON file, `Ok(None)` when missing. Bounded: a file above 1 MiB is refused.
pub(crate) fn read_json_opt<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    use std::io::Read;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(VmmError::io(format!("reading {}", path.display()), e)),
    };
    let mut buf = Vec::new();
    f.take(MAX_STATE_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| VmmError::io(format!("reading {}", path.display()), e))?;
    if buf.len() as u64 > MAX_STATE_FILE {
        return Err(VmmError::BadState {
            path: path.to_path_buf(),
            message: "larger than 1 MiB".into(),
        });
    }
    serde_json::from_slice(&buf)
        .map(Some)
        .map_err(|e| VmmError::BadState {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// Seconds since the epoch.
pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `(state char, starttime)` of a process from `/proc/<pid>/stat`.
pub(crate) fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses; the fields after the last ')' are fixed.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // starttime is field 22 overall, i.e. index 19 after `pid (comm)`.
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// The start time of `pid`, for recording next to the pid.
pub fn process_starttime(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|(_, s)| s)
}

/// Whether `pid` is a live (not zombie) process started at `starttime` (if given).
pub fn process_alive(pid: u32, starttime: Option<u64>) -> bool {
    if pid == 0 {
        return false;
    }
    match proc_stat(pid) {
        None => false,
        Some(('Z' | 'X', _)) => false,
        Some((_, st)) => starttime.is_none_or(|want| want == st),
    }
}

fn kill_pid(pid: u32) {
    if let Ok(p) = i32::try_from(pid) {
        if p > 0 {
            // SAFETY: kill(2) with a positive pid we verified just before.
            unsafe {
                libc::kill(p, libc::SIGKILL);
            }
        }
    }
}

/// Kills `pid` only if it is still the QEMU of the sandbox in `dir`.
fn kill_leftover_qemu(pid: u32, starttime: Option<u64>, dir: &Path) {
    if !process_alive(pid, starttime) {
        return;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return;
    };
    let text = String::from_utf8_lossy(&cmdline);
    if text.contains("qemu") && text.contains(&*dir.to_string_lossy()) {
        tracing::info!(pid, dir = %dir.display(), "killing leftover QEMU");
        kill_pid(pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "0", "my-box.1", "a_b", &"x".repeat(63)] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            ".a",
            "-a",
            "_a",
            "A",
            "a/b",
            "a..b",
            "..",
            "a b",
            &"x".repeat(64),
        ] {
            let e = validate_name(bad).unwrap_err();
            assert!(e.to_string().contains("Fix:"), "{e}");
        }
    }

    #[test]
    fn socket_path_limit() {
        check_socket_paths(Path::new("/tmp/capsa/sandboxes/x")).unwrap();
        let long = PathBuf::from(format!("/tmp/{}", "d".repeat(100)));
        let e = check_socket_paths(&long).unwrap_err();
        assert!(e.to_string().contains("CAPSA_STATE_DIR"), "{e}");
    }

    #[test]
    fn roots_another_user_controls_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let root = StateRoot::new(tmp.path().join("root"));
        std::fs::create_dir(root.path()).unwrap();
        assert!(root.check().is_ok());
        // Open to others: anyone could plant a sandbox directory.
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        for e in [root.check().unwrap_err(), root.list().unwrap_err()] {
            assert!(matches!(e, VmmError::UnsafeStateRoot { .. }), "{e}");
            assert!(e.to_string().contains("Fix:"), "{e}");
        }
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        // Owned by another user (possible to set up only as root).
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(root.path(), Some(65534), Some(65534)).unwrap();
            let e = root.get("x").unwrap_err();
            assert!(e.to_string().contains("owned by uid 65534"), "{e}");
            std::os::unix::fs::chown(root.path(), Some(0), Some(0)).unwrap();
        }
        // A symlink planted where the root should be.
        let link = StateRoot::new(tmp.path().join("link"));
        std::os::unix::fs::symlink(root.path(), link.path()).unwrap();
        assert!(link
            .check()
            .unwrap_err()
            .to_string()
            .contains("symbolic link"));
    }

    #[test]
    fn records_and_liveness() {
        let tmp = tempfile::tempdir().unwrap();
        let root = StateRoot::new(tmp.path());
        assert!(root.list().unwrap().is_empty());
        assert!(matches!(
            root.get("nope").unwrap_err(),
            VmmError::NotFound { .. }
        ));
        let me = std::process::id();
        let dir = root.sandbox_dir("live");
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = StateFile {
            state: RecordedState::Running,
            exit: None,
            monitor_pid: me,
            monitor_starttime: process_starttime(me),
            vmm_pid: None,
            vmm_starttime: None,
            created_at: now_secs(),
            updated_at: now_secs(),
        };
        s.write(&dir).unwrap();
        assert_eq!(root.get("live").unwrap().state, SandboxState::Running);
        // Same pid, other start time: pid reuse, so the monitor is dead.
        s.monitor_starttime = s.monitor_starttime.map(|t| t + 1);
        s.write(&dir).unwrap();
        assert_eq!(root.get("live").unwrap().state, SandboxState::Dead);
        s.state = RecordedState::Stopped;
        s.exit = Some(ExitReason::PoweredOff);
        s.write(&dir).unwrap();
        let r = root.get("live").unwrap();
        assert_eq!(r.state, SandboxState::Stopped);
        assert_eq!(r.exit, Some(ExitReason::PoweredOff));
        // A fresh directory without state.json is starting; garbage is a typed error.
        std::fs::create_dir_all(root.sandbox_dir("new")).unwrap();
        assert_eq!(root.get("new").unwrap().state, SandboxState::Starting);
        std::fs::write(root.sandbox_dir("new").join(files::STATE), b"{garbage").unwrap();
        assert!(matches!(
            root.get("new").unwrap_err(),
            VmmError::BadState { .. }
        ));
        std::fs::remove_file(root.sandbox_dir("new").join(files::STATE)).unwrap();
        assert_eq!(root.list().unwrap().len(), 2);
        root.remove("live").unwrap();
        assert!(!dir.exists());
    }
}
