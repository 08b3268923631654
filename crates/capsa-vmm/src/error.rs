//! The one error type of capsa-vmm.

use std::path::PathBuf;

/// Result alias for capsa-vmm.
pub type Result<T, E = VmmError> = std::result::Result<T, E>;

/// Everything that can go wrong finding, starting or talking to a monitor.
///
/// Variants a user can cause carry the fix in their message, so front ends
/// (CLI, daemon) can print them as they are.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmmError {
    /// A sandbox name breaks the naming rule.
    #[error("invalid sandbox name {name:?}: {problem}. Fix: use 1-63 characters [a-z0-9][a-z0-9_.-]*, e.g. `my-box.1`")]
    InvalidName {
        /// The refused name.
        name: String,
        /// Which part of the rule it breaks.
        problem: &'static str,
    },
    /// The state directory path is too long for the Unix sockets placed in it.
    #[error("the socket path {path} is {len} bytes; Unix sockets allow at most {max}. Fix: set CAPSA_STATE_DIR to a shorter directory (e.g. /tmp/capsa) or use a shorter sandbox name")]
    PathTooLong {
        /// The longest socket path that would be created.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The state root (or its `sandboxes` directory) is not safely ours.
    #[error("state directory {path} is unsafe: {problem}. Fix: use a directory that only you own and can write (e.g. `mkdir -m 700 DIR` and set CAPSA_STATE_DIR=DIR), or remove this one if you did not create it")]
    UnsafeStateRoot {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// No sandbox has this name.
    #[error("no sandbox named {name:?} in {root}. Fix: `capsa ps` lists the sandboxes there (or set CAPSA_STATE_DIR)")]
    NotFound {
        /// The sandbox name.
        name: String,
        /// The state root that was searched.
        root: PathBuf,
    },
    /// A sandbox of this name exists already.
    #[error("a sandbox named {name:?} already exists. Fix: pick another name or remove it with `capsa rm {name}`")]
    AlreadyExists {
        /// The sandbox name.
        name: String,
    },
    /// The sandbox's monitor is gone without recording an exit.
    #[error("sandbox {name:?} is dead (its monitor process is gone). Fix: `capsa rm {name}` cleans it up")]
    Dead {
        /// The sandbox name.
        name: String,
    },
    /// The sandbox has stopped.
    #[error("sandbox {name:?} is stopped. Fix: `capsa start {name}` boots it again, `capsa rm {name}` removes it")]
    Stopped {
        /// The sandbox name.
        name: String,
    },
    /// The sandbox still runs and the request needs it stopped.
    #[error("sandbox {name:?} is running. Fix: stop it first or use --force")]
    Running {
        /// The sandbox name.
        name: String,
    },
    /// The `capsa-vmm` binary was not found.
    #[error("cannot find the capsa-vmm monitor binary (looked at {looked}). Fix: `cargo build -p capsa-vmm`, or set CAPSA_VMM to its path")]
    MonitorNotFound {
        /// Where it was looked for.
        looked: String,
    },
    /// The monitor did not come up or broke its protocol.
    #[error("monitor of {name:?}: {message}. See {log} for its log")]
    Monitor {
        /// The sandbox name.
        name: String,
        /// What failed.
        message: String,
        /// The monitor's log file.
        log: PathBuf,
    },
    /// An RPC to the monitor failed.
    #[error("monitor RPC {call}: {message}")]
    Rpc {
        /// The call that failed.
        call: &'static str,
        /// Why.
        message: String,
    },
    /// A state file is unreadable or malformed.
    #[error("state file {path}: {message}. Fix: remove the sandbox with `capsa rm --force`")]
    BadState {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The VM backend failed.
    #[error(transparent)]
    Core(#[from] capsa_core::Error),
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

impl VmmError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        VmmError::Io {
            context: context.into(),
            source,
        }
    }
}
