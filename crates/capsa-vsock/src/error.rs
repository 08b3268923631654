//! The crate's single error type.

use std::io;
use std::path::PathBuf;

/// Errors from creating or running a [`crate::VsockDevice`]. Each message
/// says what to change.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// A configuration value is out of range.
    #[error("invalid vsock configuration: {reason}")]
    InvalidConfig {
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A socket path does not fit in `sockaddr_un`.
    #[error(
        "socket path {path:?} is empty or too long for a Unix socket (max {max} bytes); \
         use a shorter directory such as a short temp dir"
    )]
    PathTooLong {
        /// The offending path.
        path: PathBuf,
        /// The longest path that fits (accounting for the `_<port>` suffix).
        max: usize,
    },
    /// A live process is already serving the socket path.
    #[error(
        "{path:?} is in use by a running process; stop it or choose another path \
         (stale sockets are removed automatically)"
    )]
    SocketInUse {
        /// The path another process is listening on.
        path: PathBuf,
    },
    /// The path exists and is not a socket; it is never deleted.
    #[error("{path:?} exists and is not a socket; remove it or choose another path")]
    NotASocket {
        /// The offending path.
        path: PathBuf,
    },
    /// Binding a listening socket failed.
    #[error(
        "cannot listen on {path:?}: {source}; check that the directory exists and is writable"
    )]
    Bind {
        /// The path that could not be bound.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Creating an epoll, eventfd or timerfd failed (usually fd exhaustion).
    #[error("cannot create {what}: {source}; raise the open file limit (ulimit -n)")]
    Os {
        /// Which kernel object.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Starting a thread failed.
    #[error("cannot start the vsock device thread: {0}; check the process thread limit")]
    Thread(io::Error),
    /// The vhost-user protocol layer failed.
    #[error("vhost-user backend failed: {0}; check that the frontend is QEMU with vhost-user-vsock-pci and shared guest memory (memory-backend-memfd,share=on)")]
    VhostUser(String),
    /// The seccomp filter of the device threads could not be installed.
    #[error("cannot install the vsock device's seccomp filter: {reason}; run on a kernel with seccomp, or turn the filter off (VsockConfig::seccomp, CAPSA_CONFINE=user,cgroup)")]
    Seccomp {
        /// Why.
        reason: String,
    },
    /// The device thread panicked; this is a bug.
    #[error("the vsock device thread panicked; this is a bug in capsa-vsock, please report it")]
    Panicked,
}
