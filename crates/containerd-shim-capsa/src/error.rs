//! The shim's errors, each naming the problem and the fix, mapped onto the
//! ttrpc status codes containerd turns back into its own error kinds.

use containerd_shim::protos::ttrpc::{self, Code};

/// What can go wrong in the shim.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// containerd's bundle (config.json) is missing, too large or malformed.
    #[error("bundle {path}: {message}; fix: {fix}")]
    Bundle {
        /// The file or directory.
        path: String,
        /// What is wrong.
        message: String,
        /// What to do.
        fix: &'static str,
    },
    /// A request names something this shim does not have.
    #[error("{0}")]
    NotFound(String),
    /// A request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The settings file named by containerd's runtime options is unusable.
    #[error("shim settings {path}: {message}; fix: correct the file (keys: pool_size, fast_start, default_memory_mib, default_cpus, pool_max_idle_secs) or drop ConfigPath from the runtime's options")]
    Config {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A request comes at the wrong time (e.g. deleting a running task).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A second create of the same id.
    #[error("{0}")]
    AlreadyExists(String),
    /// The root filesystem could not be mounted or converted.
    #[error("root filesystem: {message}; fix: {fix}")]
    Rootfs {
        /// What is wrong.
        message: String,
        /// What to do.
        fix: String,
    },
    /// capsa (the VM, its agent) failed.
    #[error("capsa: {0}")]
    Capsa(Box<capsa::Error>),
    /// The agent client failed (an exec stream broke).
    #[error("capsa agent: {0}")]
    Agent(#[from] capsa::AgentClientError),
    /// Host I/O failed.
    #[error("{context}: {source}")]
    Io {
        /// What the shim was doing.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
}

impl ShimError {
    /// An I/O error with what the shim was doing.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ShimError::Io {
            context: context.into(),
            source,
        }
    }

    fn code(&self) -> Code {
        match self {
            ShimError::NotFound(_) => Code::NOT_FOUND,
            ShimError::InvalidArgument(_) | ShimError::Bundle { .. } | ShimError::Config { .. } => {
                Code::INVALID_ARGUMENT
            }
            ShimError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            ShimError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            _ => Code::INTERNAL,
        }
    }
}

impl From<capsa::Error> for ShimError {
    fn from(e: capsa::Error) -> Self {
        ShimError::Capsa(Box::new(e))
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> Self {
        tracing::warn!("request failed: {e}");
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

/// The answer to an RPC this shim does not implement: containerd's
/// `NotImplemented`, never a silent success.
pub fn unimplemented(what: &str) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(
        Code::UNIMPLEMENTED,
        format!("{what} is not implemented by the capsa shim (io.containerd.capsa.v2); fix: use the runc runtime for it"),
    ))
}

/// Shorthand.
pub type Result<T, E = ShimError> = std::result::Result<T, E>;
