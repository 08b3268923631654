//! What a VM snapshot is, independent of the backend that made it.
//!
//! A snapshot is a directory: the backend's files (saved device state, guest
//! RAM, frozen disk bases) plus [`SNAPSHOT_META_FILE`], a [`SnapshotMeta`]
//! in JSON. The metadata names everything a restore depends on outside the
//! directory (the capsa version, the backend and its version, the kernel and
//! initramfs, read-only disks), so a restore on another machine or after an
//! upgrade fails with a clear error instead of resuming a guest whose kernel
//! image changed underneath it.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Accel, BootSource, DiskFormat, Error, Result, VmSpec};

/// Version of the snapshot directory layout; bumped on any incompatible change.
pub const SNAPSHOT_FORMAT: u32 = 1;
/// Name of the metadata file in a snapshot directory.
pub const SNAPSHOT_META_FILE: &str = "snapshot.json";
/// The capsa version snapshots are stamped with (all capsa crates share it).
pub const CAPSA_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Largest metadata file read (it is a few KiB; a bigger one is not ours).
const MAX_META_BYTES: u64 = 1 << 20;
/// Bytes hashed at each of the start, middle and end of a file for its fingerprint.
const SAMPLE: u64 = 64 * 1024;

/// Describes one snapshot directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotMeta {
    /// [`SNAPSHOT_FORMAT`] of the writer.
    pub format: u32,
    /// [`CAPSA_VERSION`] of the writer.
    pub capsa_version: String,
    /// Backend that wrote it, e.g. `qemu`.
    pub backend: String,
    /// The backend's own version (a saved device state only loads into the
    /// same VMM version and machine type).
    pub backend_version: String,
    /// The accelerator the VM ran on (CPU state differs between them).
    pub accel: Accel,
    /// The VM's spec as it was started (disk paths are the originals).
    pub spec: VmSpec,
    /// The kernel the guest booted; its image is in the saved RAM.
    pub kernel: FileIdentity,
    /// The initramfs, if any.
    pub initrd: Option<FileIdentity>,
    /// Seconds since the epoch at which the snapshot was taken.
    pub created_at: u64,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The disks, in spec order.
    pub disks: Vec<SnapshotDisk>,
    /// Backend files in the directory (names, not paths), for listing and checks.
    pub files: Vec<String>,
}

/// A disk as frozen in a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotDisk {
    /// The image the VM used when the snapshot was taken.
    pub original: PathBuf,
    /// Format of the image.
    pub format: DiskFormat,
    /// Attached read-only.
    pub read_only: bool,
    /// For writable disks: the frozen copy inside the snapshot directory (a
    /// file name); every restore writes to its own overlay on top of it.
    pub base: Option<String>,
    /// For read-only disks: the image is used in place and must be unchanged
    /// (the guest's page cache in the saved RAM may hold its blocks).
    pub identity: Option<FileIdentity>,
}

/// A cheap fingerprint of a file: size plus a SHA-256 of three 64 KiB
/// samples (start, middle, end). Reading a whole 66 MiB kernel on every
/// restore would cost more than the restore; bundles are content-addressed,
/// so a different build differs in size or in these samples.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileIdentity {
    /// Where the file was.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Modification time (nanoseconds since the epoch), informational.
    pub mtime_ns: u128,
    /// Hex SHA-256 over the size and the samples.
    pub fingerprint: String,
}

impl FileIdentity {
    /// Fingerprints the file at `path`.
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let mut f = std::fs::File::open(path)?;
        let m = f.metadata()?;
        let size = m.len();
        let mut h = Sha256::new();
        h.update(size.to_le_bytes());
        let mut buf = vec![0u8; SAMPLE as usize];
        for start in [
            0,
            size.saturating_sub(SAMPLE) / 2,
            size.saturating_sub(SAMPLE),
        ] {
            f.seek(SeekFrom::Start(start))?;
            let n = read_up_to(&mut f, &mut buf)?;
            h.update(&buf[..n]);
        }
        let mtime_ns = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Ok(Self {
            path: path.to_path_buf(),
            size,
            mtime_ns,
            fingerprint: hex(&h.finalize()),
        })
    }

    /// Whether `path` holds the same content as recorded (by fingerprint).
    pub fn matches(&self, path: &Path) -> std::io::Result<bool> {
        let now = Self::of(path)?;
        Ok(now.size == self.size && now.fingerprint == self.fingerprint)
    }
}

fn read_up_to(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl SnapshotMeta {
    /// Metadata for `spec` as of now, without disks or files (the backend fills those).
    pub fn new(backend: &str, backend_version: &str, accel: Accel, spec: &VmSpec) -> Result<Self> {
        let BootSource::LinuxDirect { kernel, initrd, .. } = &spec.boot;
        let ident = |p: &Path| {
            FileIdentity::of(p).map_err(|e| Error::io(format!("fingerprinting {}", p.display()), e))
        };
        Ok(Self {
            format: SNAPSHOT_FORMAT,
            capsa_version: CAPSA_VERSION.to_string(),
            backend: backend.to_string(),
            backend_version: backend_version.to_string(),
            accel,
            spec: spec.clone(),
            kernel: ident(kernel)?,
            initrd: initrd.as_deref().map(ident).transpose()?,
            created_at: std::time::SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            memory_mib: spec.memory_mib,
            disks: Vec::new(),
            files: Vec::new(),
        })
    }

    /// Reads `dir`/[`SNAPSHOT_META_FILE`].
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(SNAPSHOT_META_FILE);
        let f = std::fs::File::open(&path).map_err(|e| {
            snapshot_error(
                dir,
                format!("cannot read {}: {e}", path.display()),
                "pass the directory a snapshot was saved to (it holds snapshot.json)",
            )
        })?;
        let mut text = String::new();
        f.take(MAX_META_BYTES)
            .read_to_string(&mut text)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        // Check the format before the full parse, so that a future layout gets
        // "made by a newer capsa", not a serde error about a field.
        let format = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("format").and_then(|f| f.as_u64()));
        match format {
            Some(f) if f == u64::from(SNAPSHOT_FORMAT) => {}
            Some(f) => {
                return Err(snapshot_error(
                    dir,
                    format!("snapshot format {f}; this capsa reads format {SNAPSHOT_FORMAT}"),
                    "recreate the snapshot with this capsa version",
                ))
            }
            None => {
                return Err(snapshot_error(
                    dir,
                    format!("{} is not capsa snapshot metadata", path.display()),
                    "recreate the snapshot",
                ))
            }
        }
        serde_json::from_str(&text).map_err(|e| {
            snapshot_error(
                dir,
                format!("corrupt {}: {e}", path.display()),
                "recreate the snapshot",
            )
        })
    }

    /// Writes `dir`/[`SNAPSHOT_META_FILE`] (through a temporary file and a rename).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(SNAPSHOT_META_FILE);
        let tmp = dir.join(".snapshot.json.tmp");
        let text = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::io("encoding snapshot metadata", std::io::Error::other(e)))?;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }

    /// Checks that this host can restore the snapshot in `dir`: same capsa
    /// version, same kernel and initramfs content, read-only disks unchanged,
    /// the backend's files present. Backend and accelerator checks are the
    /// backend's (see `Hypervisor::restore`).
    pub fn check_host(&self, dir: &Path) -> Result<()> {
        if self.capsa_version != CAPSA_VERSION {
            return Err(mismatch(
                dir,
                "capsa version",
                &self.capsa_version,
                CAPSA_VERSION,
                "snapshots hold guest state of one capsa version: recreate the snapshot with this capsa",
            ));
        }
        let BootSource::LinuxDirect { kernel, initrd, .. } = &self.spec.boot;
        check_file(dir, "kernel", &self.kernel, kernel)?;
        match (&self.initrd, initrd) {
            (Some(id), Some(p)) => check_file(dir, "initrd", id, p)?,
            (None, None) => {}
            _ => {
                return Err(snapshot_error(
                    dir,
                    "the metadata's initrd and spec disagree".into(),
                    "recreate the snapshot",
                ))
            }
        }
        for (i, d) in self.disks.iter().enumerate() {
            match (&d.base, &d.identity) {
                (Some(base), _) => {
                    if !dir.join(base).is_file() {
                        return Err(snapshot_error(
                            dir,
                            format!("disk {i}'s frozen base {base} is missing"),
                            "copy the whole snapshot directory, or recreate the snapshot",
                        ));
                    }
                }
                (None, Some(id)) => check_file(dir, "read-only disk", id, &d.original)?,
                (None, None) => {
                    return Err(snapshot_error(
                        dir,
                        format!("disk {i} has neither a base nor an identity"),
                        "recreate the snapshot",
                    ))
                }
            }
        }
        for f in &self.files {
            if !dir.join(f).is_file() {
                return Err(snapshot_error(
                    dir,
                    format!("{f} is missing"),
                    "copy the whole snapshot directory, or recreate the snapshot",
                ));
            }
        }
        Ok(())
    }

    /// Checks that the snapshot was made from a VM described like `want`
    /// (same boot files and command line, vCPUs, memory, disks, vsock).
    /// Console settings and the accelerator request are per run and ignored.
    pub fn check_spec(&self, dir: &Path, want: &VmSpec) -> Result<()> {
        let norm = |s: &VmSpec| {
            let mut s = s.clone();
            s.console = Default::default();
            s.accel = Accel::Auto;
            for d in &mut s.disks {
                d.format = None;
            }
            s
        };
        let (have, want) = (norm(&self.spec), norm(want));
        if have == want {
            return Ok(());
        }
        let field = if have.boot != want.boot {
            "boot (kernel, initrd or command line)"
        } else if have.cpus != want.cpus {
            "vCPUs"
        } else if have.memory_mib != want.memory_mib {
            "memory"
        } else if have.disks != want.disks {
            "disks"
        } else {
            "vsock"
        };
        let show = |s: &VmSpec| match field {
            "vCPUs" => s.cpus.to_string(),
            "memory" => format!("{} MiB", s.memory_mib),
            "disks" => format!("{:?}", s.disks.iter().map(|d| &d.path).collect::<Vec<_>>()),
            "vsock" => format!("{:?}", s.vsock),
            _ => format!("{:?}", s.boot),
        };
        Err(mismatch(
            dir,
            field,
            &show(&have),
            &show(&want),
            "restore a snapshot taken from this spec, or take a new snapshot",
        ))
    }
}

fn check_file(dir: &Path, what: &str, id: &FileIdentity, path: &Path) -> Result<()> {
    match id.matches(path) {
        Ok(true) => Ok(()),
        Ok(false) => Err(mismatch(
            dir,
            what,
            &format!("{} ({} bytes, fingerprint {:.12})", id.path.display(), id.size, id.fingerprint),
            &format!("{} with other content", path.display()),
            &format!("the guest in the snapshot runs the {what} it booted: restore with that {what} at {}, or recreate the snapshot", path.display()),
        )),
        Err(e) => Err(snapshot_error(
            dir,
            format!("cannot read the {what} {}: {e}", path.display()),
            &format!("put the {what} the snapshot was taken with back at that path, or recreate the snapshot"),
        )),
    }
}

fn snapshot_error(dir: &Path, problem: String, fix: &str) -> Error {
    Error::Snapshot {
        path: dir.to_path_buf(),
        problem,
        fix: fix.to_string(),
    }
}

fn mismatch(dir: &Path, what: &str, snapshot: &str, here: &str, fix: &str) -> Error {
    Error::SnapshotMismatch {
        path: dir.to_path_buf(),
        what: what.to_string(),
        snapshot: snapshot.to_string(),
        here: here.to_string(),
        fix: fix.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, VmSpec, SnapshotMeta) {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("vmlinux");
        std::fs::write(&k, vec![1u8; 300_000]).unwrap();
        let spec = VmSpec::linux(&k, None);
        let meta = SnapshotMeta::new("qemu", "QEMU 7.2", Accel::Tcg, &spec).unwrap();
        (d, spec, meta)
    }

    #[test]
    fn round_trip_and_checks() {
        let (d, spec, meta) = setup();
        meta.write(d.path()).unwrap();
        let back = SnapshotMeta::read(d.path()).unwrap();
        assert_eq!(back, meta);
        back.check_host(d.path()).unwrap();
        back.check_spec(d.path(), &spec).unwrap();
        let mut other = spec.clone();
        other.memory_mib = 1024;
        let e = back.check_spec(d.path(), &other).unwrap_err();
        assert!(e.to_string().contains("memory"), "{e}");
        assert!(e.fix().is_some());
    }

    #[test]
    fn changed_kernel_is_refused() {
        let (d, spec, meta) = setup();
        let BootSource::LinuxDirect { kernel, .. } = &spec.boot;
        let mut bytes = std::fs::read(kernel).unwrap();
        bytes[299_999] = 2;
        std::fs::write(kernel, bytes).unwrap();
        let e = meta.check_host(d.path()).unwrap_err();
        assert!(matches!(e, Error::SnapshotMismatch { .. }), "{e}");
        assert!(e.to_string().contains("kernel"), "{e}");
    }

    #[test]
    fn other_version_and_format_are_refused() {
        let (d, _spec, mut meta) = setup();
        meta.capsa_version = "0.0.0-other".into();
        let e = meta.check_host(d.path()).unwrap_err();
        assert!(e.to_string().contains("capsa version"), "{e}");
        meta.format = 99;
        meta.write(d.path()).unwrap();
        let e = SnapshotMeta::read(d.path()).unwrap_err();
        assert!(e.to_string().contains("format 99"), "{e}");
        std::fs::write(d.path().join(SNAPSHOT_META_FILE), b"[1,2]").unwrap();
        assert!(SnapshotMeta::read(d.path()).is_err());
        let e = SnapshotMeta::read(&d.path().join("nope")).unwrap_err();
        assert!(e.fix().is_some());
    }
}
