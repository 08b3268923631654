//! The wire types of the API (requests, responses, stream items) and the
//! validation every input goes through before it reaches the library.
//!
//! These types are shared by the server and [`crate::client`], and the
//! OpenAPI document is generated from them, so the three cannot drift.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ErrorCode};
use axum::http::StatusCode;

/// Longest sandbox name (it becomes a directory and part of socket paths).
pub const MAX_NAME_LEN: usize = capsa_core::MAX_NAME_LEN;
/// Longest guest path accepted.
pub const MAX_GUEST_PATH: usize = 4096;
/// Most environment variables in one request.
pub const MAX_ENV: usize = 1024;
/// Most argv entries in one exec.
pub const MAX_ARGV: usize = 4096;
/// Most disks per sandbox.
pub const MAX_DISKS: usize = 16;

/// Lifecycle state of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// Booting; the agent does not answer yet.
    Starting,
    /// Up; exec and files work.
    Running,
    /// Paused (vCPUs stopped).
    Paused,
    /// Shut down; `start` boots it again.
    Stopped,
    /// Its monitor died without recording an exit; only `DELETE` applies.
    Dead,
}

/// A sandbox as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SandboxInfo {
    /// Unique name.
    pub name: String,
    /// Current state.
    pub state: SandboxState,
    /// Host directory holding its state (console log, sockets), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// PID of its monitor process, when one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor_pid: Option<u32>,
    /// PID of its VMM (QEMU) process, when one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm_pid: Option<u32>,
    /// Creation time, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<u64>,
    /// The VM spec it runs with (free-form; see capsa-core's `VmSpec`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub spec: Option<serde_json::Value>,
    /// How its VM last ended, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub exit: Option<serde_json::Value>,
    /// The warm pool it belongs (or belonged) to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// `ready` (idle in its pool) or `acquired` (handed out), for pool members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_state: Option<String>,
}

/// Accelerator choice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// KVM when it really works here, TCG otherwise.
    #[default]
    Auto,
    /// KVM or fail.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl From<AccelChoice> for capsa::Accel {
    fn from(a: AccelChoice) -> Self {
        match a {
            AccelChoice::Auto => capsa::Accel::Auto,
            AccelChoice::Kvm => capsa::Accel::Kvm,
            AccelChoice::Tcg => capsa::Accel::Tcg,
        }
    }
}

/// A host disk image to attach (virtio-blk).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskRequest {
    /// Absolute host path of a raw or qcow2 image (format detected from its header).
    pub path: String,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// Body of `POST /v1/sandboxes`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandboxRequest {
    /// Name (`[a-z0-9][a-z0-9_.-]*`, at most 63 bytes); generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// vCPUs (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 64)]
    pub cpus: Option<u32>,
    /// Guest RAM in MiB (default 512).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 128, maximum = 1048576)]
    pub memory_mib: Option<u64>,
    /// Environment for every command run in it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Default working directory of commands (absolute guest path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Accelerator (default auto).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<AccelChoice>,
    /// Disks to attach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskRequest>,
    /// Boot it now (default true); `false` only records it, stopped.
    #[serde(default = "yes")]
    pub start: bool,
    /// Restore it from this named snapshot (see `GET /v1/snapshots`) instead
    /// of booting; the snapshot fixes cpus, memory, disks and accel, so those
    /// must be absent. `start: false` is refused with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_snapshot: Option<String>,
    /// The network: `{"policy": {"mode": "public"|"deny", "rules": [...]}}`
    /// (see capsa-core's `NetworkSpec`); absent means no NIC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub network: Option<capsa_core::NetworkSpec>,
}

impl CreateSandboxRequest {
    /// The library builder for this request's spec, named `name`; both
    /// backends boot from it, so a field means the same everywhere.
    pub fn builder(&self, name: &str) -> capsa::SandboxBuilder {
        let mut b = capsa::Capsa::sandbox().name(name);
        if let Some(c) = self.cpus {
            b = b.cpus(c);
        }
        if let Some(m) = self.memory_mib {
            b = b.memory_mb(m);
        }
        for (k, v) in &self.env {
            b = b.env(k, v);
        }
        if let Some(w) = &self.workdir {
            b = b.workdir(w);
        }
        if let Some(a) = self.accel {
            b = b.accel(a.into());
        }
        for d in &self.disks {
            let mut spec = capsa::DiskSpec::new(&d.path);
            spec.read_only = d.read_only;
            b = b.disk(spec);
        }
        b.network(self.network.clone())
    }
}

fn yes() -> bool {
    true
}

/// Largest pool accepted (each member is a running VM).
pub const MAX_POOL_SIZE: usize = 32;
/// Longest pool name: members are named `<pool>-<8 hex digits>`, within [`MAX_NAME_LEN`].
pub const MAX_POOL_NAME_LEN: usize = MAX_NAME_LEN - 9;

/// A named snapshot in the daemon's snapshot store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotInfo {
    /// Its name.
    pub name: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: u64,
    /// Bytes on disk.
    pub size_bytes: u64,
    /// vCPUs of the VM it was taken from, when readable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Guest RAM in MiB, when readable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// The sandbox it was taken from, when recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// capsa version that wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capsa_version: Option<String>,
    /// Why it cannot be restored here, if it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Body of `POST /v1/sandboxes/{name}/snapshot`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotRequest {
    /// Name of the new snapshot (the sandbox naming rule).
    pub snapshot: String,
}

/// Body of `POST /v1/pools`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePoolRequest {
    /// Pool name (the sandbox naming rule, at most 54 bytes); members are `<name>-<hex>`.
    pub name: String,
    /// How many members to keep restored and ready (1 to 32).
    #[schema(minimum = 1, maximum = 32)]
    pub size: usize,
    /// vCPUs of each member (default 1; not with `snapshot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 64)]
    pub cpus: Option<u32>,
    /// Guest RAM of each member in MiB (default 512; not with `snapshot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 128, maximum = 1048576)]
    pub memory_mib: Option<u64>,
    /// Restore members from this named snapshot instead of a base snapshot
    /// of a freshly booted sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

/// A warm pool as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PoolInfo {
    /// Pool name.
    pub name: String,
    /// Target number of ready members.
    pub size: usize,
    /// Members restored and idle, ready to hand out.
    pub ready: usize,
    /// Members being restored now.
    pub starting: usize,
    /// Members handed out since the daemon started.
    pub acquired_total: u64,
    /// Members restored since the daemon started (adopted ones excluded).
    pub restored_total: u64,
    /// Restores that failed since the daemon started.
    pub failed_total: u64,
    /// vCPUs of each member, when the pool sets them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Guest RAM of each member, when the pool sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// The named snapshot members come from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// `preparing` (making its base snapshot), `ready` or `failing`.
    pub status: String,
    /// The last restore error, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Body of `POST /v1/pools/{name}/acquire`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AcquireRequest {
    /// Name for the sandbox. Absent (the fast path): a ready member is
    /// handed over under its own name `<pool>-<hex>`. Present: a member is
    /// restored fresh under this name from the pool's snapshot (a restore's
    /// time, not a handover's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Body of `POST /v1/sandboxes/{name}/exec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments (the program is looked up in the guest's PATH).
    pub argv: Vec<String>,
    /// Extra environment (over the sandbox's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory (absolute guest path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Bytes for stdin, base64; stdin is closed after them. Absent: empty stdin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Kill the command after this many milliseconds (reported as `timed_out`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Run on a pseudo-terminal (stderr merges into stdout).
    #[serde(default)]
    pub tty: bool,
    /// Terminal rows with `tty` (default 24).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u16>,
    /// Terminal columns with `tty` (default 80).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cols: Option<u16>,
}

/// One line of the NDJSON stream an exec answers with. The last line is
/// `exit` or `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ExecEvent {
    /// Bytes the command wrote to stdout (base64).
    Stdout {
        /// Base64 of the bytes.
        data: String,
    },
    /// Bytes the command wrote to stderr (base64).
    Stderr {
        /// Base64 of the bytes.
        data: String,
    },
    /// The command ended.
    Exit {
        /// Exit code, if it exited.
        code: Option<i32>,
        /// Signal, if one killed it.
        signal: Option<i32>,
        /// Whether `timeout_ms` killed it.
        timed_out: bool,
    },
    /// The exec failed after the response started.
    Error {
        /// Stable code, as in error bodies.
        code: ErrorCode,
        /// What went wrong.
        message: String,
    },
}

/// Metadata of a file written to the guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FileInfo {
    /// Guest path.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
}

/// Answer of `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok` when the daemon answers.
    pub status: String,
    /// capsad's version.
    pub version: String,
    /// Which backend serves sandboxes (`monitor` or `in-process`).
    pub backend: String,
    /// Number of sandboxes known.
    pub sandboxes: usize,
}

/// One server-sent event of `GET /v1/events` (the SSE `data:` field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A sandbox appeared or changed state.
    State {
        /// Sandbox name.
        name: String,
        /// Its new state.
        state: SandboxState,
    },
    /// A sandbox disappeared.
    Removed {
        /// Sandbox name.
        name: String,
    },
    /// A pool handed out a member (or one was restored for an acquire).
    Acquired {
        /// Pool name.
        pool: String,
        /// The sandbox handed out.
        name: String,
    },
    /// The daemon performed an action on a sandbox.
    Action {
        /// Sandbox name.
        name: String,
        /// `create`, `start`, `stop`, `kill` or `delete`.
        action: String,
        /// Whether it succeeded.
        ok: bool,
    },
}

/// Query of `DELETE /v1/sandboxes/{name}`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Kill it first if it runs (otherwise a running sandbox is a conflict).
    #[serde(default)]
    pub force: Option<bool>,
}

/// Query of the file endpoints.
#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FileQuery {
    /// Absolute guest path without `..`.
    pub path: String,
    /// Octal permission bits for uploads and mkdir (default `0644`, `0755` for mkdir).
    #[serde(default)]
    pub mode: Option<String>,
    /// Modification time for uploads, in seconds since the epoch (default: now).
    #[serde(default)]
    pub mtime: Option<i64>,
}

/// Query of `GET /v1/sandboxes/{name}/files/list`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Absolute guest directory without `..`.
    pub path: String,
    /// Continue after this entry name (the last one of the previous page).
    #[serde(default)]
    pub after: Option<String>,
}

/// Metadata of a guest file, as the guest reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FileStat {
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds of the modification time.
    pub mtime_nanos: u32,
}

impl FileStat {
    /// The API form of the agent's metadata.
    pub fn of(m: &capsa::FileMeta) -> Self {
        Self {
            kind: match m.kind {
                capsa::FileKind::File => "file",
                capsa::FileKind::Dir => "dir",
                capsa::FileKind::Symlink => "symlink",
                capsa::FileKind::Other => "other",
            }
            .into(),
            size: m.size,
            mode: m.mode,
            mtime: m.mtime.0,
            mtime_nanos: m.mtime.1,
        }
    }

    /// Back to the library's metadata (an unknown kind is `Other`).
    pub fn meta(&self) -> capsa::FileMeta {
        capsa::FileMeta {
            kind: match self.kind.as_str() {
                "file" => capsa::FileKind::File,
                "dir" => capsa::FileKind::Dir,
                "symlink" => capsa::FileKind::Symlink,
                _ => capsa::FileKind::Other,
            },
            size: self.size,
            mode: self.mode,
            mtime: (self.mtime, self.mtime_nanos),
        }
    }
}

/// One entry of a guest directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DirEntryInfo {
    /// File name (one path component).
    pub name: String,
    /// Its metadata.
    pub stat: FileStat,
}

/// One page of a guest directory listing, sorted by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DirPage {
    /// The entries.
    pub entries: Vec<DirEntryInfo>,
    /// Whether more follow (ask again with `after` = the last name).
    pub more: bool,
}

/// Query of `GET /v1/sandboxes/{name}/console`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ConsoleQuery {
    /// Keep the response open and stream new output.
    #[serde(default)]
    pub follow: Option<bool>,
}

/// Checks a sandbox name: it becomes a directory name, so no separators,
/// no `..`, nothing hidden, bounded length.
pub fn validate_name(name: &str) -> Result<(), ApiError> {
    capsa_core::check_name(name).map_err(|why| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidName,
            format!("invalid sandbox name {:?}: {why}", truncate(name, 80)),
        )
        .fix(capsa_core::NAME_RULE)
    })
}

/// Checks a guest path: absolute, no `..` component, no NUL, bounded.
pub fn validate_guest_path(what: &str, path: &str) -> Result<(), ApiError> {
    let bad = |why: &str| {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidPath,
            format!("invalid {what} {:?}: {why}", truncate(path, 120)),
        )
        .fix("give an absolute guest path such as /work/file.txt, without `..`"))
    };
    if !path.starts_with('/') {
        return bad("it is not absolute");
    }
    if path.len() > MAX_GUEST_PATH {
        return bad("it is too long");
    }
    if path.contains('\0') {
        return bad("it contains a NUL byte");
    }
    if path.split('/').any(|c| c == "..") {
        return bad("it contains `..`");
    }
    Ok(())
}

/// Checks environment entries: keys non-empty without `=` or NUL; values without NUL.
pub fn validate_env(env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if env.len() > MAX_ENV {
        return Err(ApiError::bad_request(format!(
            "{} environment variables; at most {MAX_ENV} are accepted",
            env.len()
        )));
    }
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(ApiError::bad_request(format!(
                "invalid environment variable {:?}",
                truncate(k, 80)
            ))
            .fix("names must be non-empty without `=`; names and values without NUL bytes"));
        }
    }
    Ok(())
}

/// Parses an octal mode string like `0644` or `755`.
pub fn parse_mode(s: &str) -> Result<u32, ApiError> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o7777 && !digits.is_empty() && digits.len() <= 5 => Ok(m),
        _ => Err(ApiError::bad_request(format!(
            "invalid mode {:?}: not octal permission bits",
            truncate(s, 20)
        ))
        .fix("give octal permission bits such as 0644 or 0755")),
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        s.to_string()
    } else {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "sb-1", "a.b_c", &"x".repeat(63)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "..",
            "a/b",
            ".hidden",
            "a..b",
            "-x",
            "é",
            &"x".repeat(64),
            "a b",
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths() {
        assert!(validate_guest_path("path", "/a/b").is_ok());
        for bad in ["a", "/a/../b", "/..", "", "/a\0"] {
            assert!(validate_guest_path("path", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0644").unwrap(), 0o644);
        assert_eq!(parse_mode("755").unwrap(), 0o755);
        for bad in ["", "9", "77777", "0o", "-1", "12345678901"] {
            assert!(parse_mode(bad).is_err(), "{bad}");
        }
    }
}
