//! Errors of the QEMU backend.

use std::path::PathBuf;

/// Everything that can fail while starting or driving QEMU.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QemuError {
    /// No QEMU binary was found.
    #[error("qemu-system-x86_64 not found (looked at {looked})")]
    NotFound {
        /// Where capsa looked.
        looked: String,
    },
    /// QEMU could not be spawned.
    #[error("cannot start {binary}: {source}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited before the VM was up.
    #[error("QEMU exited during start-up ({status}): {stderr}")]
    EarlyExit {
        /// Exit status text.
        status: String,
        /// The tail of QEMU's stderr.
        stderr: String,
    },
    /// The QMP socket never came up or the handshake failed.
    #[error("QMP connection to {path} failed: {reason}")]
    Qmp {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A QMP command failed.
    #[error("QMP command {command} failed: {reason}")]
    Command {
        /// The command name.
        command: &'static str,
        /// QEMU's error text.
        reason: String,
    },
    /// QEMU was built without seccomp, so it cannot run confined.
    #[error("{binary} cannot run under its seccomp filter (-sandbox): {stderr}")]
    NoSeccomp {
        /// The QEMU binary.
        binary: std::path::PathBuf,
        /// QEMU's message.
        stderr: String,
    },
    /// The VM already ended.
    #[error("the VM has already exited")]
    Exited,
}

impl QemuError {
    /// What the user can do about it.
    pub fn fix(&self) -> Option<String> {
        match self {
            QemuError::NotFound { .. } => Some(
                "install QEMU with `apt-get install qemu-system-x86`, or point CAPSA_QEMU at the binary"
                    .into(),
            ),
            QemuError::EarlyExit { .. } => {
                Some("read QEMU's message above; `capsa doctor` checks the set-up".into())
            }
            QemuError::NoSeccomp { .. } => Some(
                "use a QEMU built with seccomp (Debian's qemu-system-x86 is), or accept running \
                 it without its filter with CAPSA_CONFINE=user,cgroup"
                    .into(),
            ),
            _ => None,
        }
    }
}

impl From<QemuError> for capsa_core::Error {
    fn from(e: QemuError) -> Self {
        capsa_core::Error::Backend {
            backend: "qemu",
            message: e.to_string(),
            fix: e.fix(),
            source: Some(Box::new(e)),
        }
    }
}
