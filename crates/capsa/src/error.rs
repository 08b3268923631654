//! The library's error type.

use std::time::Duration;

/// Everything the capsa library can fail with.
///
/// Errors from lower layers keep their type (match on [`Error::Core`] to see an
/// `InvalidSpec` and its field); [`Error::fix`] gives the hint to show a user.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The spec was refused or the backend failed.
    #[error(transparent)]
    Core(#[from] capsa_core::Error),
    /// The guest bundle (kernel, initramfs) could not be resolved or built.
    #[error(transparent)]
    Image(#[from] capsa_image::ImageError),
    /// The guest agent refused or failed a request (match `remote_kind()` for NotFound etc.).
    #[error(transparent)]
    Agent(#[from] capsa_agent_client::AgentClientError),
    /// A console wait ran past its deadline.
    #[error(
        "timed out after {after:?} waiting for {pattern:?} on the console; last output: {tail:?}"
    )]
    ConsoleTimeout {
        /// The awaited pattern(s).
        pattern: String,
        /// The deadline.
        after: Duration,
        /// The newest console output, to see where the guest got stuck.
        tail: String,
    },
    /// The console closed (the VM ended) while waiting or writing.
    #[error("the console closed{}; last output: {tail:?}", waiting_for.as_ref().map(|p| format!(" while waiting for {p:?}")).unwrap_or_default())]
    ConsoleClosed {
        /// The awaited pattern(s), if waiting.
        waiting_for: Option<String>,
        /// The newest console output.
        tail: String,
    },
    /// A screen call failed (no display, bad coordinates or keys, a bad dump).
    #[error(transparent)]
    Screen(#[from] crate::screen::ScreenError),
    /// The VM was built without a console.
    #[error("this VM has no console; fix: call .console() on the builder")]
    NoConsole,
    /// The VM was built without a vsock device.
    #[error("this VM has no vsock device; fix: call .vsock() on the builder")]
    NoVsock,
    /// A vsock connection or listener failed.
    #[error("vsock port {port}: {reason}")]
    Vsock {
        /// The vsock port.
        port: u32,
        /// What went wrong.
        reason: String,
    },
    /// Finding, starting or talking to a monitor process (or a sandbox record) failed.
    #[error(transparent)]
    Vmm(#[from] capsa_vmm::VmmError),
    /// The request only makes sense for a VM run by a `capsa-vmm` monitor.
    #[error("{what} needs the monitor strategy; fix: build with .strategy(Strategy::Monitor) or .keep_running(true)")]
    NeedsMonitor {
        /// What was asked.
        what: &'static str,
    },
    /// No snapshot has this name in the snapshot store.
    #[error("no snapshot named {name:?} in {root}. Fix: `capsa snapshot ls` lists the snapshots there (or set CAPSA_SNAPSHOT_DIR)")]
    SnapshotNotFound {
        /// The snapshot name.
        name: String,
        /// The store that was searched.
        root: std::path::PathBuf,
    },
    /// A snapshot of this name exists already.
    #[error("a snapshot named {name:?} already exists. Fix: pick another name or remove it with `capsa snapshot rm {name}`")]
    SnapshotExists {
        /// The snapshot name.
        name: String,
    },
    /// A snapshot name breaks the naming rule (the sandbox rule).
    #[error("invalid snapshot name {name:?}: {problem}. Fix: use 1-63 characters [a-z0-9][a-z0-9_.-]*, e.g. `base.1`")]
    SnapshotName {
        /// The refused name.
        name: String,
        /// Which part of the rule it breaks.
        problem: &'static str,
    },
    /// The OCI image store (finding, loading or converting an image).
    #[error(transparent)]
    Oci(#[from] capsa_oci::OciError),
    /// An argument to a library call is unusable.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A remote capsa service (capsad) refused or failed the call; the
    /// message carries its reason and fix.
    #[error("{0}")]
    Remote(String),
    /// A directory capsa would keep its data in is not safely the caller's.
    #[error("{what} {path} is unsafe: {problem}")]
    UnsafeDir {
        /// Which directory (`"snapshot store"`, ...).
        what: &'static str,
        /// Its path.
        path: std::path::PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The guest sent something the host refuses to act on (a file name that
    /// is not one component, a tree past its bounds); nothing was written for it.
    #[error("refused guest input: {0}")]
    GuestInput(String),
    /// Host I/O failed.
    #[error("{context}: {source}")]
    Io {
        /// What capsa was doing.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// For an error from starting a command (`exec`/`spawn`): the exit code a
    /// shell gives the same failure, 127 (no such program) or 126 (found but
    /// not executable); `None` for any other error.
    pub fn spawn_exit_code(&self) -> Option<u8> {
        match self {
            Error::Agent(a) => match a.remote_kind()? {
                capsa_proto::ErrorKind::NotFound => Some(127),
                capsa_proto::ErrorKind::PermissionDenied => Some(126),
                _ => None,
            },
            _ => None,
        }
    }

    /// The fix hint to show a user, when there is one.
    pub fn fix(&self) -> Option<String> {
        match self {
            Error::Core(e) => e.fix().map(str::to_string),
            // Image errors carry their fix in the message itself.
            Error::Image(_) => None,
            Error::NoConsole => Some("call .console() on the builder".into()),
            Error::UnsafeDir { .. } => Some(
                "use a directory that only you own and can write (`mkdir -m 700 DIR`), \
                 or remove this one if you did not create it"
                    .into(),
            ),
            Error::NeedsMonitor { .. } => {
                Some("build with .strategy(Strategy::Monitor) or .keep_running(true)".into())
            }
            _ => None,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result alias for the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;
