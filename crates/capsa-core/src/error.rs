//! The one error type of capsa-core, shared by the backend trait.

use std::path::PathBuf;

use crate::{CmdlineError, DiskProbeError};

/// Result alias for capsa-core and the backend trait.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong describing or driving a VM through a backend.
///
/// Every variant that a user can cause carries a `fix`: the message names the
/// problem *and* what to do about it, so the CLI can print it as is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A field of the [`crate::VmSpec`] is unusable; nothing was started.
    #[error("invalid {field}: {problem}. Fix: {fix}")]
    InvalidSpec {
        /// The spec field at fault (`memory`, `cpus`, `kernel`, ...).
        field: &'static str,
        /// What is wrong with it.
        problem: String,
        /// What the user should do instead.
        fix: String,
    },
    /// The backend cannot honour a request; it is refused instead of ignored.
    #[error("the {backend} backend does not support {what}. Fix: {fix}")]
    Unsupported {
        /// Backend name, e.g. `qemu`.
        backend: String,
        /// The feature that was asked for.
        what: String,
        /// What the user can do instead.
        fix: String,
    },
    /// The kernel command line could not be parsed.
    #[error("kernel command line: {0}")]
    Cmdline(#[from] CmdlineError),
    /// A disk image is missing, unreadable or corrupt.
    #[error("disk {path}: {source}")]
    Disk {
        /// The host path of the disk image.
        path: PathBuf,
        /// Why it cannot be used.
        #[source]
        source: DiskProbeError,
    },
    /// The backend failed to start or drive the VM.
    #[error("{backend}: {message}{}", fix.as_deref().map(|f| format!(". Fix: {f}")).unwrap_or_default())]
    Backend {
        /// Backend name, e.g. `qemu`.
        backend: &'static str,
        /// What failed.
        message: String,
        /// What to do about it, when known.
        fix: Option<String>,
        /// The underlying error, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// An I/O operation on the host failed.
    #[error("{context}: {source}")]
    Io {
        /// What capsa was doing.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The VM is not in a state that allows the request.
    #[error("the VM is {state}; {request} needs a running VM")]
    NotRunning {
        /// The state the VM is in.
        state: String,
        /// What was asked.
        request: &'static str,
    },
    /// A snapshot directory is unusable (missing or corrupt files).
    #[error("snapshot {path}: {problem}. Fix: {fix}")]
    Snapshot {
        /// The snapshot directory.
        path: PathBuf,
        /// What is wrong.
        problem: String,
        /// What to do about it.
        fix: String,
    },
    /// A snapshot belongs to another capsa version, kernel, spec or backend.
    #[error("snapshot {path} does not match this host: {what} was {snapshot}, here it is {here}. Fix: {fix}")]
    SnapshotMismatch {
        /// The snapshot directory.
        path: PathBuf,
        /// What differs (`kernel`, `capsa version`, `memory`, ...).
        what: String,
        /// The value recorded in the snapshot.
        snapshot: String,
        /// The value found here.
        here: String,
        /// What to do about it.
        fix: String,
    },
    /// A wait ran past its deadline.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The deadline that passed.
        after: std::time::Duration,
    },
}

impl Error {
    /// The fix hint carried by this error, if any.
    pub fn fix(&self) -> Option<&str> {
        match self {
            Error::InvalidSpec { fix, .. }
            | Error::Unsupported { fix, .. }
            | Error::Snapshot { fix, .. }
            | Error::SnapshotMismatch { fix, .. } => Some(fix),
            Error::Backend { fix, .. } => fix.as_deref(),
            Error::Disk { source, .. } => Some(source.fix()),
            _ => None,
        }
    }

    /// Shorthand for [`Error::InvalidSpec`].
    pub fn invalid(
        field: &'static str,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Error::InvalidSpec {
            field,
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// Shorthand for [`Error::Io`] with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
