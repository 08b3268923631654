//! The client's error type.

use std::io;
use std::time::Duration;

use capsa_proto::{AgentError, ErrorKind, ProtoError};

/// Result of client calls.
pub type Result<T, E = AgentClientError> = std::result::Result<T, E>;

/// Everything a call to the guest agent can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentClientError {
    /// The connector could not open a stream to the agent (VM not running,
    /// agent not listening yet, vsock device gone).
    #[error("cannot connect to the guest agent: {0}")]
    Connect(#[source] io::Error),
    /// The agent refused or failed the request; `kind` says why
    /// (`NotFound`, `PermissionDenied`, `Busy`, ...).
    #[error("guest agent: {0}")]
    Remote(#[from] AgentError),
    /// The call did not finish before its deadline. Its connection has been
    /// dropped, so the agent abandons the operation (an exec is killed).
    #[error("{op} did not finish within {after:?}")]
    Timeout {
        /// The operation (`"exec"`, `"write_file"`, ...).
        op: &'static str,
        /// The deadline that passed.
        after: Duration,
    },
    /// The agent sent something the protocol does not allow at this point.
    #[error("guest agent protocol violation: {0}")]
    Protocol(String),
    /// The request breaks a protocol rule (relative path, empty argv, ...);
    /// nothing was sent.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// I/O failed on the connection (`UnexpectedEof`: the agent closed it
    /// early) or on the caller's own reader or writer.
    #[error("I/O with the guest agent: {0}")]
    Io(#[from] io::Error),
}

impl AgentClientError {
    /// The guest's error kind, if the agent reported the error.
    pub fn remote_kind(&self) -> Option<ErrorKind> {
        match self {
            Self::Remote(e) => Some(e.kind),
            _ => None,
        }
    }
}

impl From<ProtoError> for AgentClientError {
    fn from(e: ProtoError) -> Self {
        match e {
            ProtoError::Io(e) => Self::Io(e),
            ProtoError::Closed => Self::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the guest agent closed the connection",
            )),
            other => Self::Protocol(other.to_string()),
        }
    }
}
