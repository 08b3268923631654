//! The wire types of the API (requests, responses, stream items) and the
//! validation every input goes through before it reaches the library.
//!
//! These types are shared by capsad, its client and the local service, and the
//! OpenAPI document is generated from them, so the three cannot drift.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::StatusCode;
use crate::error::{ApiError, ErrorCode};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub spec: Option<serde_json::Value>,
    /// How its VM last ended, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub exit: Option<serde_json::Value>,
    /// The warm pool it belongs (or belonged) to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// `ready` (idle in its pool) or `acquired` (handed out), for pool members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_state: Option<String>,
    /// Who manages it besides capsa (its `owner` label), e.g.
    /// `containerd-shim` for a containerd task's VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// Accelerator choice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DiskRequest {
    /// Absolute host path of a raw or qcow2 image (format detected from its header).
    pub path: String,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
    /// The path is a host block device, attached on purpose. Only the
    /// host's own user may ask (capsad refuses it with `path_not_allowed`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_device: bool,
}

/// A host directory to mount in the guest (virtio-fs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ShareRequest {
    /// Absolute host path of a directory below one of the daemon's `--allow-disk-dir` directories.
    pub host: String,
    /// Absolute, normalized guest path to mount it at.
    pub guest: String,
    /// Read-only (enforced on the host).
    #[serde(default)]
    pub read_only: bool,
}

/// A persistent upper layer on a host disk image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DiskUpperRequest {
    /// Absolute host path of the ext4 image (created when missing).
    pub path: String,
    /// Its size when created, in MiB.
    pub size_mib: u64,
}

/// Body of `POST /v1/sandboxes`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateSandboxRequest {
    /// Name (`[a-z0-9][a-z0-9_.-]*`, at most 63 bytes); generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// vCPUs (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 64))]
    pub cpus: Option<u32>,
    /// Guest RAM in MiB (default 512).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 128, maximum = 1048576))]
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
    /// Host directories to mount (at most 8).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<ShareRequest>,
    /// Run commands inside this OCI image from the image store (a name,
    /// digest or unique digest prefix, see `capsa image ls`); its Env,
    /// WorkingDir and User apply to every exec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// With `image`: cap of the sandbox's tmpfs upper layer in MiB (default
    /// half its RAM, at most its RAM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmpfs_upper_mib: Option<u64>,
    /// With `image`: a persistent ext4 upper layer on this host disk image
    /// (created when missing), instead of a tmpfs. The host's own user only
    /// (capsad refuses it with `path_not_allowed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_upper: Option<DiskUpperRequest>,
    /// The network: `{"policy": {"mode": "public"|"deny", "rules": [...]}}`
    /// (see capsa-core's `NetworkSpec`); absent means no NIC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub network: Option<capsa_core::NetworkSpec>,
    /// A framebuffer display with a tablet and a keyboard (even width
    /// 320-3840, height 200-2160), for the screen endpoints; absent is headless.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<ScreenInfo>,
    /// Boot it now (default true); `false` only records it, stopped.
    #[serde(default = "yes")]
    pub start: bool,
    /// Restore it from this named snapshot (see `GET /v1/snapshots`) instead
    /// of booting; the snapshot fixes cpus, memory, disks and accel, so those
    /// must be absent. `start: false` is refused with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_snapshot: Option<String>,
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
            spec.allow_device = d.allow_device;
            b = b.disk(spec);
        }
        for s in self.shares_spec() {
            b = b.share_spec(s);
        }
        if let Some(i) = &self.image {
            b = b.image(i);
        }
        if let Some(size_mib) = self.tmpfs_upper_mib {
            b = b.upper(capsa::rootfs::Upper::Tmpfs { size_mib });
        }
        if let Some(d) = &self.disk_upper {
            b = b.upper(capsa::rootfs::Upper::Disk {
                path: d.path.clone().into(),
                size_mib: d.size_mib,
            });
        }
        b.network(self.network.clone())
            .display_spec(self.display_spec())
    }

    /// The display as a core spec.
    pub fn display_spec(&self) -> Option<capsa_core::DisplaySpec> {
        self.display
            .as_ref()
            .map(|d| capsa_core::DisplaySpec::new(d.width, d.height))
    }

    /// The shares as library specs.
    pub fn shares_spec(&self) -> Vec<capsa::ShareSpec> {
        self.shares.iter().map(ShareRequest::spec).collect()
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotRequest {
    /// Name of the new snapshot (the sandbox naming rule).
    pub snapshot: String,
}

/// Body of `POST /v1/pools`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreatePoolRequest {
    /// Pool name (the sandbox naming rule, at most 54 bytes); members are `<name>-<hex>`.
    pub name: String,
    /// How many members to keep restored and ready (1 to 32).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 32))]
    pub size: usize,
    /// vCPUs of each member (default 1; not with `snapshot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 64))]
    pub cpus: Option<u32>,
    /// Guest RAM of each member in MiB (default 512; not with `snapshot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 128, maximum = 1048576))]
    pub memory_mib: Option<u64>,
    /// Restore members from this named snapshot instead of a base snapshot
    /// of a freshly booted sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Members run commands inside this OCI image (the image store); the
    /// base snapshot is then the image's (not with `snapshot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// A warm pool as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// Keep stdin open for input sent while the command runs (the
    /// WebSocket's binary frames); `stdin` is ignored then.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interactive: bool,
    /// Terminal rows with `tty` (default 24).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u16>,
    /// Terminal columns with `tty` (default 80).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cols: Option<u16>,
}

/// One line of the NDJSON stream an exec answers with. The last line is
/// `exit` or `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FileInfo {
    /// Guest path.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
}

/// Answer of `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// A sandbox's network decided a flow or a DNS question (polled from its
    /// decision log while anyone listens; see `GET .../network/log`).
    Network {
        /// Sandbox name.
        name: String,
        /// The decision, with its reason (capsa-core's `NetDecision`).
        #[cfg_attr(feature = "openapi", schema(value_type = Object))]
        decision: capsa_core::NetDecision,
    },
}

/// Query of `DELETE /v1/sandboxes/{name}`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct DeleteQuery {
    /// Kill it first if it runs (otherwise a running sandbox is a conflict).
    #[serde(default)]
    pub force: Option<bool>,
}

/// Query of `DELETE /v1/sandboxes/{name}/shares`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct ShareQuery {
    /// The guest path the share is mounted at.
    pub guest: String,
}

impl ShareRequest {
    /// The library spec of this share.
    pub fn spec(&self) -> capsa::ShareSpec {
        capsa::ShareSpec::new(
            &self.host,
            &self.guest,
            if self.read_only {
                capsa::ShareMode::ReadOnly
            } else {
                capsa::ShareMode::ReadWrite
            },
        )
    }

    /// The request form of a library spec.
    pub fn of(s: &capsa::ShareSpec) -> Self {
        Self {
            host: s.host.display().to_string(),
            guest: s.guest.clone(),
            read_only: s.read_only(),
        }
    }
}

/// Query of the file endpoints.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
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
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct ListQuery {
    /// Absolute guest directory without `..`.
    pub path: String,
    /// Continue after this entry name (the last one of the previous page).
    #[serde(default)]
    pub after: Option<String>,
}

/// Metadata of a guest file, as the guest reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DirEntryInfo {
    /// File name (one path component).
    pub name: String,
    /// Its metadata.
    pub stat: FileStat,
}

/// One page of a guest directory listing, sorted by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DirPage {
    /// The entries.
    pub entries: Vec<DirEntryInfo>,
    /// Whether more follow (ask again with `after` = the last name).
    pub more: bool,
}

/// Query of `GET /v1/sandboxes/{name}/console`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct ConsoleQuery {
    /// Keep the response open and stream new output.
    #[serde(default)]
    pub follow: Option<bool>,
}

/// Query of `POST /v1/sandboxes/{name}/stop`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct StopQuery {
    /// Seconds the guest gets to shut down before it is killed (0-3600;
    /// default 10).
    #[serde(default)]
    pub grace_secs: Option<f64>,
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

/// An image in the image store (OCI images from a registry, a tarball or a
/// Debian build), as every face shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageInfo {
    /// Digest of the image's manifest: its identity (`sha256:...`).
    pub digest: String,
    /// Short id: the first 12 hex digits of the digest.
    pub id: String,
    /// Names pointing at it (`repo:tag`).
    pub names: Vec<String>,
    /// Sum of its blobs' sizes in bytes.
    pub size_bytes: u64,
    /// Number of layers.
    pub layers: usize,
    /// `User` of its config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `Env` of its config (`KEY=VALUE`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// `Entrypoint` of its config.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    /// `Cmd` of its config.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    /// `WorkingDir` of its config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
}

/// Query naming one image (`GET`/`DELETE /v1/images/one`): a name
/// (`repo:tag`), a digest, or a unique digest prefix.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct ImageQuery {
    /// The image: `repo:tag`, `sha256:...`, or a unique prefix of the digest.
    pub image: String,
}

/// Longest image reference accepted.
pub const MAX_IMAGE_REF: usize = 512;

/// Checks an image reference before it reaches the store.
pub fn validate_image_ref(r: &str) -> Result<(), ApiError> {
    if r.is_empty() || r.len() > MAX_IMAGE_REF || r.chars().any(|c| c.is_control() || c == ' ') {
        return Err(ApiError::bad_request(format!(
            "image reference {:?} is empty, longer than {MAX_IMAGE_REF} bytes, or has spaces or control characters",
            r.chars().take(80).collect::<String>()
        ))
        .fix("name an image as REPOSITORY[:TAG], sha256:DIGEST, or a digest prefix (`capsa image ls`)"));
    }
    Ok(())
}

/// Body of `POST /v1/images/pull`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PullRequest {
    /// `[REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST]`.
    pub reference: String,
    /// Registries (`host` or `host:port`) spoken to over plain HTTP although
    /// not on loopback (loopback registries need no entry).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub insecure_registries: Vec<String>,
    /// Never contact a registry: the image must already be in the store.
    #[serde(default)]
    pub offline: bool,
    /// Root filesystem format to convert to: `erofs` (default), `ext4`,
    /// `erofs-lz4hc`, or `none` (store only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub convert: Option<String>,
}

/// How a finished pull went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PullResult {
    /// The image in the store.
    pub image: ImageInfo,
    /// Nothing was downloaded (but at most the manifest's digest).
    pub cached: bool,
    /// Whether a registry was contacted.
    pub asked_registry: bool,
    /// Blob bytes downloaded.
    pub downloaded_bytes: u64,
    /// The converted root filesystem image, unless `convert` was `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<String>,
    /// Whether the conversion ran now (false: it was cached).
    pub converted: bool,
}

/// One line of the NDJSON stream a pull answers with; the last is `done`
/// or `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum PullEvent {
    /// The manifest is known.
    Resolved {
        /// Manifest digest.
        digest: String,
        /// Layers in the image.
        layers: usize,
        /// Layers already in the store.
        cached_layers: usize,
        /// Bytes still to download.
        download_bytes: u64,
    },
    /// Bytes of blobs arrived (a running total is the client's to keep).
    Bytes {
        /// How many arrived since the last event.
        bytes: u64,
    },
    /// A layer is being unpacked for the root filesystem.
    Unpacking {
        /// Its index, from 0.
        index: usize,
        /// Layers in all.
        count: usize,
    },
    /// The root filesystem image is being built.
    Mkfs {
        /// Its format.
        format: String,
    },
    /// The pull ended well.
    Done(PullResult),
    /// The pull failed.
    Error {
        /// Stable code, as in error bodies.
        code: ErrorCode,
        /// What went wrong.
        message: String,
        /// What to do about it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fix: Option<String>,
    },
}

/// A sandbox's network policy (`GET`/`PUT /v1/sandboxes/{name}/network`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicyBody {
    /// `{"mode": "public"|"deny", "rules": [...]}` (see capsa-core's
    /// `NetworkPolicy`; first matching rule wins).
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub policy: capsa_core::NetworkPolicy,
}

/// A sandbox's latest network decisions, oldest first (bounded).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NetworkLog {
    /// Each decision with its reason (see capsa-core's `NetDecision`).
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<Object>))]
    pub decisions: Vec<capsa_core::NetDecision>,
}

/// A host port forwarded into a sandbox (`/v1/sandboxes/{name}/ports`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PortForwardBody {
    /// Host IPv4 address to listen on (default 127.0.0.1: only this host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
    /// Host port (1-65535).
    pub host_port: u16,
    /// Guest port (1-65535).
    pub guest_port: u16,
}

impl PortForwardBody {
    /// The library's forward, checked (a bad address or port 0 is refused with the fix).
    pub fn forward(&self) -> Result<capsa_core::PortForward, crate::ApiError> {
        let ip = self.host_ip.as_deref().unwrap_or("127.0.0.1");
        capsa_core::PortForward::parse(&format!("{ip}:{}:{}", self.host_port, self.guest_port))
            .map_err(|e| crate::ApiError::bad_request(e.to_string()))
    }

    /// The wire form of a library forward.
    pub fn of(f: &capsa_core::PortForward) -> Self {
        Self {
            host_ip: Some(f.host_ip.to_string()),
            host_port: f.host_port,
            guest_port: f.guest_port,
        }
    }
}

/// Which forward to remove (`DELETE /v1/sandboxes/{name}/ports`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct PortQuery {
    /// The forwarded host port.
    pub host_port: u16,
    /// Its host address (default 127.0.0.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
}

/// Whether a viewer may send input (`GET /v1/sandboxes/{name}/screen/vnc`
/// and `.../screen/view`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct ScreenViewQuery {
    /// Pass the viewer's keyboard and pointer to the guest (default false:
    /// view only, enforced by the server, which drops the viewer's input
    /// messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<bool>,
}

/// A sandbox's display (`GET /v1/sandboxes/{name}/screen`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ScreenInfo {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// A rectangle of the screen, in screen pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ScreenRegion {
    /// Left edge.
    pub x: u32,
    /// Top edge.
    pub y: u32,
    /// Width (at least 1).
    pub width: u32,
    /// Height (at least 1).
    pub height: u32,
}

/// How to take a screenshot (all optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ScreenshotRequest {
    /// Only this part of the screen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<ScreenRegion>,
    /// Downscale (keeping the aspect ratio) to at most this width.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub max_width: Option<u32>,
    /// The encoding: `png` (default), `jpeg` or `webp` (lossless).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ScreenshotFormat>,
    /// JPEG quality, 1..=100 (default 80); refused for png and webp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 100))]
    pub quality: Option<u8>,
}

/// A screenshot's encoding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ScreenshotFormat {
    /// PNG (lossless, fast).
    #[default]
    Png,
    /// JPEG (lossy, smallest).
    Jpeg,
    /// WebP, lossless.
    Webp,
}

impl From<ScreenshotFormat> for capsa::ImageFormat {
    fn from(f: ScreenshotFormat) -> Self {
        match f {
            ScreenshotFormat::Png => capsa::ImageFormat::Png,
            ScreenshotFormat::Jpeg => capsa::ImageFormat::Jpeg,
            ScreenshotFormat::Webp => capsa::ImageFormat::Webp,
        }
    }
}

impl From<capsa::ImageFormat> for ScreenshotFormat {
    fn from(f: capsa::ImageFormat) -> Self {
        match f {
            capsa::ImageFormat::Png => ScreenshotFormat::Png,
            capsa::ImageFormat::Jpeg => ScreenshotFormat::Jpeg,
            capsa::ImageFormat::Webp => ScreenshotFormat::Webp,
        }
    }
}

impl ScreenshotRequest {
    /// The library's options.
    pub fn options(&self) -> capsa::ShotOptions {
        capsa::ShotOptions {
            region: self.region.map(|r| capsa::screen::Region {
                x: r.x,
                y: r.y,
                width: r.width,
                height: r.height,
            }),
            max_width: self.max_width,
            format: self.format.unwrap_or_default().into(),
            quality: self.quality,
        }
    }
}

/// A screenshot: an image (base64 in JSON) and how its pixels map back to the
/// screen: screen x = `x + image_x / scale`, screen y = `y + image_y / scale`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ScreenshotBody {
    /// Image format: `png`, `jpeg` or `webp`.
    pub format: ScreenshotFormat,
    /// The image, base64 (standard alphabet, padded).
    pub data: String,
    /// Image width.
    pub width: u32,
    /// Image height.
    pub height: u32,
    /// Image pixels per screen pixel (1 unless downscaled).
    pub scale: f64,
    /// Left edge of the captured region on the screen.
    pub x: u32,
    /// Top edge of the captured region on the screen.
    pub y: u32,
    /// The screen's width.
    pub screen_width: u32,
    /// The screen's height.
    pub screen_height: u32,
}

impl ScreenshotBody {
    /// The wire form of a library screenshot.
    pub fn of(s: &capsa::Screenshot) -> Self {
        use base64::Engine as _;
        Self {
            format: s.format.into(),
            data: base64::engine::general_purpose::STANDARD.encode(&s.data),
            width: s.width,
            height: s.height,
            scale: s.scale,
            x: s.x,
            y: s.y,
            screen_width: s.screen_width,
            screen_height: s.screen_height,
        }
    }

    /// The decoded image bytes.
    pub fn bytes(&self) -> Result<Vec<u8>, ApiError> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(&self.data)
            .map_err(|e| ApiError::bad_request(format!("screenshot data is not base64: {e}")))
    }
}

/// A batch of screen actions (`POST /v1/sandboxes/{name}/screen/actions`),
/// performed in order; the whole batch is checked before anything is sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ScreenActionsRequest {
    /// At most 256 actions, each an object tagged by `action`:
    /// `{"action":"move","x":..,"y":..}`,
    /// `{"action":"click","x":..,"y":..,"button":"left|middle|right","count":1-3}`,
    /// `{"action":"button_down"|"button_up","button":..}`,
    /// `{"action":"drag","path":[[x,y],...]}`,
    /// `{"action":"scroll","direction":"up|down|left|right","amount":1-100,"x":..,"y":..}`,
    /// `{"action":"key","keys":"ctrl+c"}` (X keysym or CUA names),
    /// `{"action":"type","text":"..."}` (US layout; untypable characters are refused),
    /// `{"action":"wait","ms":..}` (at most 10000, 30000 per batch).
    /// Coordinates are screen pixels.
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<Object>))]
    pub actions: Vec<capsa::ScreenAction>,
    /// Take a screenshot this many milliseconds (at most 10000) after the
    /// last action and return it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(maximum = 10000))]
    pub screenshot_after_ms: Option<u64>,
    /// How to take that screenshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub screenshot: Option<ScreenshotRequest>,
}

/// What a batch of actions answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ScreenActionsResponse {
    /// Actions performed.
    pub performed: usize,
    /// The screenshot asked for with `screenshot_after_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub screenshot: Option<ScreenshotBody>,
}
