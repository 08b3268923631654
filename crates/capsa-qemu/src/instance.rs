//! One running QEMU process and its QMP connection.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capsa_core::{Accel, ConsoleStreams, ExitReason, Result, VmSpec};
use qapi::futures::{QapiService, QmpStreamTokio};
use tokio::io::{AsyncBufReadExt, BufReader, WriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};

use crate::jail::{Creds, Jail};
use crate::QemuError;

type Qmp = QapiService<QmpStreamTokio<WriteHalf<UnixStream>>>;

/// The fd number guest RAM is passed to QEMU as.
pub(crate) const RAM_FD: i32 = 3;

/// How long QEMU gets to open its QMP socket.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Lines of QEMU's stderr kept for error messages.
const STDERR_TAIL: usize = 32;

/// A VM run by a QEMU child process.
pub struct QemuInstance {
    pub(crate) pid: u32,
    pub(crate) qmp: Qmp,
    pub(crate) exit: watch::Receiver<Option<ExitReason>>,
    pub(crate) kill_tx: mpsc::Sender<()>,
    pub(crate) console: Option<ConsoleStreams>,
    pub(crate) shutting_down: AtomicBool,
    /// The in-process vsock device; dropped (and stopped) with the instance.
    pub(crate) vsock: Option<capsa_vsock::VsockDevice>,
    /// What a snapshot needs to know about the VM.
    pub(crate) info: InstanceInfo,
    /// One snapshot at a time (it detaches and re-attaches the vsock device).
    pub(crate) snapshot_lock: tokio::sync::Mutex<()>,
    /// The directory QEMU's sockets live in (its jail directory when confined).
    pub(crate) qemu_dir: PathBuf,
    /// Who QEMU runs as, when not as capsa's user.
    pub(crate) creds: Option<Creds>,
    /// The VM cgroup's `cgroup.procs` handles (empty without one): a share's
    /// virtiofsd started later joins QEMU there, under the same limits.
    pub(crate) cgroup_procs: Vec<std::fs::File>,
    /// The shares plugged in, by slot (see [`crate::args::share_bus`]).
    pub(crate) shares: tokio::sync::Mutex<Vec<Option<crate::share::ActiveShare>>>,
    /// capsa's network stack for the VM's NIC; stopped with the instance.
    pub(crate) net: Option<capsa_net::NetHandle>,
}

/// Facts about a VM kept for snapshots.
#[derive(Debug)]
pub(crate) struct InstanceInfo {
    /// The validated spec QEMU runs (disk paths are the ones QEMU opened).
    pub spec: VmSpec,
    /// The resolved accelerator.
    pub accel: Accel,
    /// Guest RAM, when capsa made it (see `ram`); QEMU maps the same memfd.
    pub ram: Option<std::fs::File>,
    /// The image QEMU opened for each disk (an overlay for restored VMs).
    pub disk_paths: Vec<PathBuf>,
    /// The QEMU binary (qemu-img is looked for next to it).
    pub qemu: PathBuf,
}

impl std::fmt::Debug for QemuInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuInstance")
            .field("pid", &self.pid)
            .finish()
    }
}

impl QemuInstance {
    /// Spawns QEMU with `args`, confined by `jail`, and connects to its QMP
    /// socket at `qmp_path`.
    pub(crate) async fn spawn(
        binary: &Path,
        args: &[String],
        qmp_path: PathBuf,
        console: bool,
        vsock: Option<capsa_vsock::VsockDevice>,
        info: InstanceInfo,
        mut jail: Jail,
    ) -> std::result::Result<Self, QemuError> {
        let mut cmd = tokio::process::Command::new(binary);
        cmd.args(args)
            .stdin(if console {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(if console {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // Every fd QEMU inherits, as (fd here, number in QEMU): guest RAM
        // (see args::Launch::ram_fd) and the files a confined QEMU cannot open.
        let mut fd_map: Vec<(i32, i32)> = Vec::new();
        if let Some(f) = info.ram.as_ref() {
            use std::os::fd::AsRawFd;
            fd_map.push((f.as_raw_fd(), RAM_FD));
        }
        fd_map.extend(jail.fd_map());
        let mut scratch = vec![-1i32; fd_map.len()];
        let above = fd_map.iter().map(|(_, n)| *n).max().unwrap_or(2) + 1;
        let procs = jail
            .cgroup
            .as_ref()
            .map(|c| c.procs_fds())
            .unwrap_or_default();
        let creds = jail.creds;
        let cgroup_procs = match jail.cgroup.as_ref().map(|c| c.join_handles()) {
            Some(Ok(files)) => files,
            Some(Err(e)) => {
                // Without them a later share would run outside the VM's limits.
                return Err(QemuError::Spawn {
                    binary: binary.to_path_buf(),
                    source: std::io::Error::new(
                        e.kind(),
                        format!("keeping the VM cgroup's handles: {e}"),
                    ),
                });
            }
            None => Vec::new(),
        };
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // SAFETY: only async-signal-safe calls (setpgid, write, fcntl, dup2,
        // set*id, prctl) between fork and exec, and no allocation.
        unsafe {
            cmd.pre_exec(move || {
                let check = |rc: libc::c_int| {
                    if rc < 0 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(())
                    }
                };
                // Own process group: a Ctrl-C on the user's terminal reaches capsa,
                // which stops the VM in order, instead of killing QEMU mid-write.
                libc::setpgid(0, 0);
                // Into the VM's cgroup while still privileged, before QEMU
                // allocates anything.
                for fd in &procs {
                    if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // Two passes, so no target number clobbers a source not yet moved.
                for (i, (src, _)) in fd_map.iter().enumerate() {
                    scratch[i] = libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, above);
                    check(scratch[i])?;
                }
                for (i, (_, target)) in fd_map.iter().enumerate() {
                    check(libc::dup2(scratch[i], *target))?;
                }
                if let Some(c) = creds {
                    match c.extra_gid {
                        Some(g) => check(libc::setgroups(1, &g))?,
                        None => check(libc::setgroups(0, std::ptr::null()))?,
                    }
                    check(libc::setgid(c.gid))?;
                    check(libc::setuid(c.uid))?;
                }
                // Nothing QEMU runs can gain privileges (setuid binaries, file caps).
                check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
                // If the owning process dies without cleaning up, QEMU goes too.
                // Set after setuid, which clears it.
                check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
                if libc::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        tracing::debug!(binary = %binary.display(), ?args, "spawning QEMU");
        let mut child = cmd.spawn().map_err(|source| QemuError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        // QEMU has its own copies now.
        jail.release_files();
        let qemu_dir = jail.dir.clone();
        let seccomp = jail.seccomp;

        let tail = Arc::new(Mutex::new(VecDeque::<String>::new()));
        if let Some(stderr) = child.stderr.take() {
            let tail = tail.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::debug!(target: "capsa_qemu::stderr", pid, "{line}");
                    if let Ok(mut t) = tail.lock() {
                        if t.len() == STDERR_TAIL {
                            t.pop_front();
                        }
                        t.push_back(line);
                    }
                }
            });
        }
        let console = match (child.stdin.take(), child.stdout.take()) {
            (Some(i), Some(o)) => Some(ConsoleStreams {
                input: Box::new(i),
                output: Box::new(o),
            }),
            _ => None,
        };

        // The waiter task owns the child: it alone reaps it, and kills it when asked
        // or when every handle is gone, so a pid is never signalled after reuse.
        let (exit_tx, exit) = watch::channel(None);
        let (kill_tx, mut kill_rx) = mpsc::channel::<()>(4);
        let tail_w = tail.clone();
        tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                k = kill_rx.recv() => {
                    if k.is_none() {
                        tracing::debug!(pid, "handle dropped: killing QEMU");
                    }
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            // QEMU is reaped: its cgroup can go, its uid lease be reused.
            drop(jail);
            // Give the stderr reader a moment to drain the last lines.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let message = tail_w
                .lock()
                .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
                .unwrap_or_default();
            let reason = match status {
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    match (s.code(), s.signal()) {
                        (Some(0), _) => ExitReason::PoweredOff,
                        (_, Some(signal)) => ExitReason::Killed { signal },
                        (Some(code), None) => ExitReason::Failed { code, message },
                        (None, None) => ExitReason::Failed { code: -1, message },
                    }
                }
                Err(e) => ExitReason::Failed {
                    code: -1,
                    message: format!("waiting for QEMU failed: {e}"),
                },
            };
            tracing::debug!(pid, ?reason, "QEMU exited");
            let _ = exit_tx.send(Some(reason));
        });

        let qmp = match connect_qmp(&qmp_path, exit.clone()).await {
            Ok(q) => q,
            Err(e) => {
                let _ = kill_tx.send(()).await;
                let mut exit = exit.clone();
                let reason = exit
                    .wait_for(|r| r.is_some())
                    .await
                    .ok()
                    .and_then(|r| r.clone());
                return Err(match reason {
                    Some(ExitReason::Failed { message, .. })
                        if seccomp && message.contains("'sandbox'") =>
                    {
                        QemuError::NoSeccomp {
                            binary: binary.to_path_buf(),
                            stderr: message,
                        }
                    }
                    Some(ExitReason::Failed { code, message }) => QemuError::EarlyExit {
                        status: format!("exit code {code}"),
                        stderr: message,
                    },
                    _ => e,
                });
            }
        };
        Ok(Self {
            pid,
            qmp,
            exit,
            kill_tx,
            console,
            shutting_down: AtomicBool::new(false),
            vsock,
            info,
            snapshot_lock: tokio::sync::Mutex::new(()),
            qemu_dir,
            creds,
            cgroup_procs,
            shares: tokio::sync::Mutex::new((0..capsa_core::MAX_SHARES).map(|_| None).collect()),
            net: None,
        })
    }

    /// Records shares plugged in on QEMU's command line (slot = index).
    pub(crate) fn set_boot_shares(&mut self, started: Vec<crate::share::ActiveShare>) {
        let slots = self.shares.get_mut();
        for (i, s) in started.into_iter().enumerate() {
            if let Some(slot) = slots.get_mut(i) {
                *slot = Some(s);
            }
        }
    }

    /// The specs of the shares plugged in now.
    pub(crate) async fn share_specs(&self) -> Vec<capsa_core::ShareSpec> {
        self.shares
            .lock()
            .await
            .iter()
            .flatten()
            .map(|s| s.spec.clone())
            .collect()
    }

    /// How QEMU ended, once it has.
    pub(crate) fn exit_reason(&self) -> Option<ExitReason> {
        self.exit.borrow().clone()
    }

    /// The vsock device's vhost-user socket, when the VM has one.
    pub(crate) fn vhost_socket(&self) -> Option<PathBuf> {
        self.vsock.as_ref().map(|d| d.config().vhost_socket.clone())
    }

    pub(crate) async fn exec<C>(&self, name: &'static str, cmd: C) -> Result<C::Ok>
    where
        C: qapi::qmp::QmpCommand + qapi::Command,
    {
        if self.exit.borrow().is_some() {
            return Err(QemuError::Exited.into());
        }
        self.qmp
            .execute(cmd)
            .await
            .map_err(|e| {
                if self.exit.borrow().is_some() {
                    QemuError::Exited
                } else {
                    QemuError::Command {
                        command: name,
                        reason: e.to_string(),
                    }
                }
            })
            .map_err(Into::into)
    }
}

async fn connect_qmp(
    path: &Path,
    exit: watch::Receiver<Option<ExitReason>>,
) -> std::result::Result<Qmp, QemuError> {
    let qerr = |reason: String| QemuError::Qmp {
        path: path.to_path_buf(),
        reason,
    };
    let deadline = tokio::time::Instant::now() + QMP_CONNECT_TIMEOUT;
    let stream = loop {
        if exit.borrow().is_some() {
            return Err(qerr("QEMU exited".into()));
        }
        match UnixStream::connect(path).await {
            Ok(s) => break s,
            Err(e) if tokio::time::Instant::now() > deadline => {
                return Err(qerr(format!(
                    "socket did not come up in {QMP_CONNECT_TIMEOUT:?}: {e}"
                )))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    let (r, w) = tokio::io::split(stream);
    let negotiation = tokio::time::timeout(QMP_CONNECT_TIMEOUT, QmpStreamTokio::open_split(r, w))
        .await
        .map_err(|_| qerr("no QMP greeting".into()))?
        .map_err(|e| qerr(e.to_string()))?;
    let stream = negotiation
        .negotiate()
        .await
        .map_err(|e| qerr(e.to_string()))?;
    let (service, _events) = stream.spawn_tokio();
    Ok(service)
}
