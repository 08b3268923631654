//! The capsa agent protocol: how the host talks to `capsa-init` in agent mode.
//!
//! Transport: one vsock stream connection per operation (an exec, a file
//! transfer, an info call). Connections are cheap, and one per operation means
//! no multiplexing layer, natural back-pressure per stream (vsock credit), and
//! a dead operation cannot wedge the others.
//!
//! Framing: every frame is a 4-byte little-endian length followed by a
//! [postcard](https://docs.rs/postcard) encoded message. Lengths are checked
//! against [`MAX_FRAME`] before any allocation, so a hostile peer cannot make
//! the other side allocate more than that per frame. The first frame on a
//! connection is [`ClientFrame::Open`], which carries [`PROTOCOL_VERSION`];
//! the agent refuses other versions with [`ErrorKind::VersionMismatch`].
//!
//! Conversation shapes (C = client/host, A = agent/guest):
//! - info: C `Open(Info)` -> A `Info`.
//! - exec: C `Open(Exec)` -> A `Started{pid}`; then C may send `Stdin`,
//!   `StdinEof`, `Signal`, `Resize` while A sends `Stdout`/`Stderr` as produced
//!   and finally `Exited`.
//! - write file: C `Open(WriteFile)` -> A `Ready`; C `Data`* `End` -> A `Done(meta)`.
//! - read file: C `Open(ReadFile)` -> A `Meta(meta)` then `Data`* `End`.
//! - fs calls (stat, list, mkdir, remove): C `Open(..)` -> A one reply frame.
//! - paged listing: C `Open(ListDirPage{after})` -> A `EntriesPage{entries, more}`;
//!   the client repeats with `after` = the last name until `more` is false.
//! - set identity (after a snapshot restore): C `Open(SetIdentity)` -> A `Done(None)`.
//! - any request may be answered by A `Error` instead.
//!
//! Variants are only ever appended to the enums (postcard encodes the variant
//! index), so a peer of the same [`PROTOCOL_VERSION`] that predates a variant
//! still decodes every frame it can itself ask for.
#![deny(missing_docs)]

use std::io::{Read, Write};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Version of this protocol; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 2;
/// The vsock port the guest agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// Largest frame either side accepts (bytes after the length prefix).
pub const MAX_FRAME: usize = 1 << 20;
/// Size of data chunks for streams and files; well below [`MAX_FRAME`].
pub const CHUNK: usize = 128 * 1024;
/// Most argv entries, env entries and list-dir entries per message.
pub const MAX_ITEMS: usize = 4096;
/// Entries per [`AgentFrame::EntriesPage`]. Chosen so that a page of names of
/// the longest length Linux allows (255 bytes) still fits one [`MAX_FRAME`].
pub const LIST_PAGE: usize = 2048;
/// The line the guest agent prints on the console once it listens on
/// [`AGENT_PORT`] (after the init's ready marker); the host may wait for it.
/// It is printed again whenever the agent re-creates its listening socket
/// (e.g. after a vsock transport reset).
pub const AGENT_LISTENING_MARKER: &str = "capsa-agent: listening";

/// Frames sent by the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientFrame {
    /// First frame of every connection.
    Open {
        /// Must equal [`PROTOCOL_VERSION`].
        version: u32,
        /// What the connection is for.
        request: Request,
    },
    /// Bytes for the process's stdin.
    Stdin(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Closes the process's stdin.
    StdinEof,
    /// Sends a signal to the process (its process group).
    Signal(i32),
    /// Resizes the process's PTY.
    Resize(PtySize),
    /// A chunk of file content.
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    /// End of file content.
    End,
}

/// What a connection asks the agent to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Agent and guest facts.
    Info,
    /// Run a process.
    Exec(ExecRequest),
    /// Create or replace a file with streamed content.
    WriteFile(WriteFileRequest),
    /// Stream a file's content back.
    ReadFile {
        /// Absolute guest path.
        path: String,
    },
    /// Metadata of a path (not following a final symlink).
    Stat {
        /// Absolute guest path.
        path: String,
    },
    /// Entries of a directory.
    ListDir {
        /// Absolute guest path.
        path: String,
    },
    /// Create a directory.
    Mkdir {
        /// Absolute guest path.
        path: String,
        /// Create missing parents (`mkdir -p`).
        parents: bool,
        /// Permission bits.
        mode: u32,
    },
    /// Remove a file or directory.
    Remove {
        /// Absolute guest path.
        path: String,
        /// Remove a directory and everything below it.
        recursive: bool,
    },
    /// One page of a directory's entries, sorted by name: at most
    /// [`LIST_PAGE`] entries whose names sort after `after`.
    ///
    /// [`Request::ListDir`] answers in one frame and so refuses directories
    /// with more than [`MAX_ITEMS`] entries; this request lists any directory.
    ListDirPage {
        /// Absolute guest path.
        path: String,
        /// Last name of the previous page (`None` for the first page).
        after: Option<String>,
    },
    /// Gives a restored clone its own identity, so that clones of one
    /// snapshot are not twins (same hostname, machine id, RNG state, and a
    /// wall clock stuck at the snapshot's instant).
    SetIdentity(IdentityRequest),
    /// Mounts the virtio-fs device tagged `tag` at `path` (made if missing).
    Mount {
        /// The device's tag (at most [`MAX_MOUNT_TAG`] bytes).
        tag: String,
        /// Absolute guest path.
        path: String,
        /// Mount read-only (the host enforces read-only shares regardless).
        read_only: bool,
    },
    /// Unmounts what is mounted at `path` (lazily: busy files do not block it).
    Unmount {
        /// Absolute guest path.
        path: String,
    },
}

/// Longest mount tag ([`Request::Mount`]); virtio-fs allows 36 bytes.
pub const MAX_MOUNT_TAG: usize = 36;

/// Most bytes of host entropy in one [`IdentityRequest`] (the kernel's CRNG
/// needs 32; more only costs time).
pub const MAX_ENTROPY: usize = 512;
/// Longest hostname (Linux `HOST_NAME_MAX`).
pub const MAX_HOSTNAME: usize = 64;

/// A fresh identity for a guest; every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IdentityRequest {
    /// New hostname (RFC 1123 characters, at most [`MAX_HOSTNAME`] bytes).
    pub hostname: Option<String>,
    /// New `/etc/machine-id`: 32 lowercase hex digits, not all zero.
    pub machine_id: Option<String>,
    /// Host randomness mixed into the guest's RNG (credited), then the CRNG
    /// is reseeded; at most [`MAX_ENTROPY`] bytes.
    #[serde(with = "serde_bytes")]
    pub entropy: Vec<u8>,
    /// Wall-clock time to set (seconds, nanoseconds since the epoch).
    pub realtime: Option<(i64, u32)>,
}

impl IdentityRequest {
    /// Checks protocol limits; the agent calls this before acting.
    pub fn validate(&self) -> Result<(), ProtoError> {
        if let Some(h) = &self.hostname {
            if !valid_hostname(h) {
                return Err(ProtoError::Invalid(format!(
                    "hostname of {} bytes: use 1-{MAX_HOSTNAME} letters, digits, '-' or '.', not starting with '-' or '.'",
                    h.len()
                )));
            }
        }
        if let Some(m) = &self.machine_id {
            let hex = m.len() == 32 && m.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            if !hex || m.bytes().all(|b| b == b'0') {
                return Err(ProtoError::Invalid(
                    "machine id must be 32 lowercase hex digits, not all zero".into(),
                ));
            }
        }
        if self.entropy.len() > MAX_ENTROPY {
            return Err(ProtoError::Invalid(format!(
                "{} bytes of entropy (at most {MAX_ENTROPY})",
                self.entropy.len()
            )));
        }
        if let Some((_, ns)) = self.realtime {
            if ns >= 1_000_000_000 {
                return Err(ProtoError::Invalid(
                    "realtime nanoseconds out of range".into(),
                ));
            }
        }
        Ok(())
    }
}

/// RFC 1123 host names (letters, digits, `-`, `.`), as `sethostname` expects.
pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= MAX_HOSTNAME
        && !h.starts_with(['-', '.'])
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// A process to run in the guest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH` if it has no `/`.
    pub argv: Vec<String>,
    /// Environment; replaces the agent's default environment entries of the same name.
    pub env: Vec<(String, String)>,
    /// Working directory (default `/`).
    pub cwd: Option<String>,
    /// Run as this uid (default root).
    pub uid: Option<u32>,
    /// Run as this gid (default root).
    pub gid: Option<u32>,
    /// Whether the host will stream stdin; if not, stdin is `/dev/null`.
    pub stdin: bool,
    /// Run on a PTY of this size (stdout and stderr merge into `Stdout`).
    pub pty: Option<PtySize>,
    /// Kill the process (SIGKILL to its group) after this many milliseconds.
    pub timeout_ms: Option<u64>,
    /// Supplementary groups (at most [`MAX_GROUPS`]); empty drops them all.
    pub groups: Vec<u32>,
}

/// Most supplementary groups an exec may ask for.
pub const MAX_GROUPS: usize = 64;

/// Terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// A file to write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WriteFileRequest {
    /// Absolute guest path.
    pub path: String,
    /// Permission bits.
    pub mode: u32,
    /// Modification time to set once written (seconds, nanoseconds since the epoch).
    pub mtime: Option<(i64, u32)>,
    /// Create missing parent directories.
    pub create_parents: bool,
}

/// Frames sent by the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentFrame {
    /// Reply to [`Request::Info`].
    Info(AgentInfo),
    /// The process started.
    Started {
        /// Its guest pid.
        pid: u32,
    },
    /// Output on stdout (or the PTY).
    Stdout(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Output on stderr.
    Stderr(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The process ended; the last frame of an exec.
    Exited(ExitStatus),
    /// Ready to receive file content.
    Ready,
    /// Metadata (reply to `Stat`, or the header of a `ReadFile`).
    Meta(FileMeta),
    /// Directory entries.
    Entries(Vec<DirEntry>),
    /// A chunk of file content.
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    /// End of file content.
    End,
    /// The request succeeded (file written, directory made, path removed).
    Done(Option<FileMeta>),
    /// The request failed.
    Error(AgentError),
    /// Reply to [`Request::ListDirPage`].
    EntriesPage {
        /// Entries sorted by name (byte order).
        entries: Vec<DirEntry>,
        /// Whether more entries follow (ask again with `after` = the last name).
        more: bool,
    },
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal number, if a signal killed it.
    pub signal: Option<i32>,
    /// Whether the agent killed it because its timeout passed.
    pub timed_out: bool,
}

impl ExitStatus {
    /// Whether the process exited with code 0 (and was not killed).
    pub fn success(&self) -> bool {
        self.code == Some(0) && self.signal.is_none() && !self.timed_out
    }
}

/// Facts about the agent and the guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Agent (capsa-init) version.
    pub agent_version: String,
    /// Protocol version it speaks.
    pub protocol: u32,
    /// Guest kernel release (`uname -r`).
    pub kernel: String,
    /// Guest hostname.
    pub hostname: String,
    /// Seconds since guest boot.
    pub uptime_secs: f64,
    /// Total guest memory in KiB.
    pub mem_total_kib: u64,
    /// Available guest memory in KiB.
    pub mem_available_kib: u64,
    /// Online CPUs.
    pub cpus: u32,
}

/// File metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    /// What kind of file.
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time (seconds, nanoseconds since the epoch).
    pub mtime: (i64, u32),
}

/// Kinds of file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Anything else (device, socket, fifo).
    Other,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// File name (not the full path).
    pub name: String,
    /// Its metadata.
    pub meta: FileMeta,
}

/// An error reported by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct AgentError {
    /// The class of error.
    pub kind: ErrorKind,
    /// Details for people.
    pub message: String,
}

/// Classes of agent errors, stable across versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The path or program does not exist.
    NotFound,
    /// Not permitted (permissions, read-only file system).
    PermissionDenied,
    /// Something exists where it should not.
    AlreadyExists,
    /// The request is malformed (relative path, empty argv, ...).
    InvalidInput,
    /// The client speaks another protocol version.
    VersionMismatch,
    /// The agent is at its limit (connections, processes).
    Busy,
    /// Any other I/O error.
    Io,
}

impl ErrorKind {
    /// Maps an OS error to a kind.
    pub fn from_io(e: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::NotFound => ErrorKind::NotFound,
            K::PermissionDenied | K::ReadOnlyFilesystem => ErrorKind::PermissionDenied,
            K::AlreadyExists => ErrorKind::AlreadyExists,
            K::InvalidInput | K::InvalidFilename => ErrorKind::InvalidInput,
            _ if e.raw_os_error() == Some(30) => ErrorKind::PermissionDenied, // EROFS
            _ => ErrorKind::Io,
        }
    }
}

impl AgentError {
    /// Builds an error from an OS error with context.
    pub fn io(context: &str, e: &std::io::Error) -> Self {
        Self {
            kind: ErrorKind::from_io(e),
            message: format!("{context}: {e}"),
        }
    }
}

/// Framing and decoding failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// The peer announced a frame longer than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The frame's bytes are not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A message breaks a protocol limit (too many items, empty argv, ...).
    #[error("invalid message: {0}")]
    Invalid(String),
    /// The connection closed between frames.
    #[error("connection closed")]
    Closed,
    /// I/O failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes one frame (length prefix + message).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtoError> {
    let body = postcard::to_stdvec(msg).map_err(|e| ProtoError::Malformed(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(ProtoError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes one frame body (without the length prefix).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, ProtoError> {
    postcard::from_bytes(body).map_err(|e| ProtoError::Malformed(e.to_string()))
}

fn check_len(len: u32) -> Result<usize, ProtoError> {
    let len = len as usize;
    if len > MAX_FRAME {
        return Err(ProtoError::TooLarge(len));
    }
    Ok(len)
}

/// Writes one frame to a blocking writer.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), ProtoError> {
    w.write_all(&encode(msg)?)?;
    Ok(())
}

/// Reads one frame from a blocking reader; [`ProtoError::Closed`] on a clean EOF between frames.
pub fn read_frame<T: DeserializeOwned>(r: &mut impl Read) -> Result<T, ProtoError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ProtoError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = check_len(u32::from_le_bytes(len))?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    decode(&body)
}

/// Async framing for the host side.
#[cfg(feature = "tokio")]
pub mod asynch {
    use super::*;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// Writes one frame.
    pub async fn write_frame<T: Serialize>(
        w: &mut (impl AsyncWrite + Unpin),
        msg: &T,
    ) -> Result<(), ProtoError> {
        w.write_all(&encode(msg)?).await?;
        Ok(())
    }

    /// Reads one frame; [`ProtoError::Closed`] on a clean EOF between frames.
    pub async fn read_frame<T: DeserializeOwned>(
        r: &mut (impl AsyncRead + Unpin),
    ) -> Result<T, ProtoError> {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ProtoError::Closed)
            }
            Err(e) => return Err(e.into()),
        }
        let len = check_len(u32::from_le_bytes(len))?;
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).await?;
        decode(&body)
    }
}

impl ExecRequest {
    /// Checks protocol limits; the agent calls this before acting.
    pub fn validate(&self) -> Result<(), ProtoError> {
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(ProtoError::Invalid("argv is empty".into()));
        }
        if self.argv.len() > MAX_ITEMS || self.env.len() > MAX_ITEMS {
            return Err(ProtoError::Invalid(format!(
                "more than {MAX_ITEMS} argv or env entries"
            )));
        }
        if self.groups.len() > MAX_GROUPS {
            return Err(ProtoError::Invalid(format!(
                "{} supplementary groups (at most {MAX_GROUPS})",
                self.groups.len()
            )));
        }
        let nul = |s: &str| s.contains('\0');
        if self.argv.iter().any(|a| nul(a))
            || self
                .env
                .iter()
                .any(|(k, v)| nul(k) || nul(v) || k.is_empty() || k.contains('='))
            || self.cwd.as_deref().is_some_and(nul)
        {
            return Err(ProtoError::Invalid("NUL byte or bad env name".into()));
        }
        Ok(())
    }
}

/// Checks a guest path from the wire: absolute, no NUL.
pub fn check_path(p: &str) -> Result<(), ProtoError> {
    if !p.starts_with('/') || p.contains('\0') || p.len() > 4096 {
        return Err(ProtoError::Invalid(format!(
            "path {p:?} must be absolute, without NUL, at most 4096 bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let f = ClientFrame::Open {
            version: PROTOCOL_VERSION,
            request: Request::Exec(ExecRequest {
                argv: vec!["ls".into(), "-l".into()],
                env: vec![("A".into(), "b".into())],
                pty: Some(PtySize { rows: 24, cols: 80 }),
                timeout_ms: Some(1000),
                ..Default::default()
            }),
        };
        let bytes = encode(&f).unwrap();
        let back: ClientFrame = read_frame(&mut &bytes[..]).unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut bytes = (u32::MAX).to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        assert!(matches!(
            read_frame::<ClientFrame>(&mut &bytes[..]),
            Err(ProtoError::TooLarge(_))
        ));
    }

    #[test]
    fn truncated_and_garbage() {
        let bytes = encode(&AgentFrame::Stdout(vec![1; 100])).unwrap();
        assert!(read_frame::<AgentFrame>(&mut &bytes[..50]).is_err());
        assert!(matches!(
            read_frame::<AgentFrame>(&mut &[][..]),
            Err(ProtoError::Closed)
        ));
        let mut seed = 7u64;
        for _ in 0..20000 {
            let len = (seed % 64) as usize;
            let mut body = Vec::with_capacity(len);
            for _ in 0..len {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                body.push((seed >> 33) as u8);
            }
            let _ = decode::<ClientFrame>(&body);
            let _ = decode::<AgentFrame>(&body);
        }
    }

    #[test]
    fn hostile_vec_length_does_not_allocate_wildly() {
        // A Data frame claiming 2^60 bytes in a 10-byte body must fail, not allocate.
        let body = [5u8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(decode::<ClientFrame>(&body).is_err());
    }

    #[test]
    fn appended_variants_round_trip_and_worst_case_page_fits() {
        let f = ClientFrame::Open {
            version: PROTOCOL_VERSION,
            request: Request::ListDirPage {
                path: "/".into(),
                after: Some("x".into()),
            },
        };
        assert_eq!(
            read_frame::<ClientFrame>(&mut &encode(&f).unwrap()[..]).unwrap(),
            f
        );
        let meta = FileMeta {
            kind: FileKind::File,
            size: u64::MAX,
            mode: 0o7777,
            mtime: (i64::MIN, 999_999_999),
        };
        let entries = (0..LIST_PAGE)
            .map(|i| DirEntry {
                name: format!("{i:0>255}"),
                meta,
            })
            .collect();
        let page = AgentFrame::EntriesPage {
            entries,
            more: true,
        };
        let bytes = encode(&page).expect("a full page of 255-byte names fits MAX_FRAME");
        assert_eq!(read_frame::<AgentFrame>(&mut &bytes[..]).unwrap(), page);
        // Existing variants keep their indices (wire compatibility).
        assert_eq!(postcard::to_stdvec(&AgentFrame::End).unwrap(), vec![9]);
        assert_eq!(postcard::to_stdvec(&ClientFrame::End).unwrap(), vec![6]);
        // Mount and Unmount come after SetIdentity (index 9).
        let m = postcard::to_stdvec(&Request::Mount {
            tag: "t".into(),
            path: "/w".into(),
            read_only: true,
        })
        .unwrap();
        assert_eq!(m[0], 10);
        let u = postcard::to_stdvec(&Request::Unmount { path: "/w".into() }).unwrap();
        assert_eq!(u[0], 11);
        for r in [
            Request::Mount {
                tag: "capsa-0123".into(),
                path: "/work".into(),
                read_only: false,
            },
            Request::Unmount {
                path: "/work".into(),
            },
        ] {
            let f = ClientFrame::Open {
                version: PROTOCOL_VERSION,
                request: r,
            };
            assert_eq!(
                read_frame::<ClientFrame>(&mut &encode(&f).unwrap()[..]).unwrap(),
                f
            );
        }
    }

    #[test]
    fn identity_validation() {
        let ok = IdentityRequest {
            hostname: Some("clone-1".into()),
            machine_id: Some("0123456789abcdef0123456789abcdef".into()),
            entropy: vec![7; 64],
            realtime: Some((1, 2)),
        };
        ok.validate().unwrap();
        let f = ClientFrame::Open {
            version: PROTOCOL_VERSION,
            request: Request::SetIdentity(ok.clone()),
        };
        assert_eq!(
            read_frame::<ClientFrame>(&mut &encode(&f).unwrap()[..]).unwrap(),
            f
        );
        for bad in [
            IdentityRequest {
                hostname: Some("-x".into()),
                ..ok.clone()
            },
            IdentityRequest {
                hostname: Some("a".repeat(65)),
                ..ok.clone()
            },
            IdentityRequest {
                machine_id: Some("0".repeat(32)),
                ..ok.clone()
            },
            IdentityRequest {
                machine_id: Some("ABCDEF".repeat(6)[..32].to_string()),
                ..ok.clone()
            },
            IdentityRequest {
                entropy: vec![0; MAX_ENTROPY + 1],
                ..ok.clone()
            },
            IdentityRequest {
                realtime: Some((0, 1_000_000_000)),
                ..ok.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn exit_status_success() {
        let ok = ExitStatus {
            code: Some(0),
            signal: None,
            timed_out: false,
        };
        assert!(ok.success());
        assert!(!ExitStatus {
            code: Some(1),
            ..ok
        }
        .success());
        assert!(!ExitStatus {
            code: None,
            signal: Some(9),
            timed_out: true
        }
        .success());
    }

    #[test]
    fn exec_validation() {
        assert!(ExecRequest::default().validate().is_err());
        let ok = ExecRequest {
            argv: vec!["true".into()],
            ..Default::default()
        };
        ok.validate().unwrap();
        let bad = ExecRequest {
            argv: vec!["a\0b".into()],
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        assert!(check_path("relative").is_err());
        check_path("/abs").unwrap();
    }
}
