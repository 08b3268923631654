//! Named snapshots: the snapshot counterpart of [`crate::Sandboxes`].
//!
//! ```text
//! <store>/                     $CAPSA_SNAPSHOT_DIR, else $XDG_DATA_HOME/capsa/snapshots,
//!                              else ~/.local/share/capsa/snapshots
//!   <name>/                    one snapshot directory (see crate::Snapshot)
//!     snapshot.json            the backend's SnapshotMeta
//!     sandbox.json             the sandbox's env and workdir
//!     store.json               which sandbox it was taken from
//!     state.bin, ram.bin, ...  the backend's files
//!   .tmp-<pid>-<nanos>-<name>/ a snapshot being written (renamed into place when complete)
//! ```
//!
//! Unlike sandboxes (runtime state, gone at reboot), snapshots are data a
//! user keeps, so they live under the data directory. A snapshot exists iff
//! its directory exists under a valid name, and it only ever appears there
//! complete: it is written to a temporary directory and renamed into place.
//! Names follow the sandbox rule ([`capsa_vmm::validate_name`]).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{Error, Result, Sandbox, Snapshot};

/// The store's own file in a snapshot directory.
const STORE_FILE: &str = "store.json";
/// Largest [`STORE_FILE`] read.
const MAX_STORE_FILE: u64 = 64 << 10;

/// What the store records about a snapshot beyond the backend's metadata.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct StoreRecord {
    /// The sandbox it was taken from.
    #[serde(default)]
    source: Option<String>,
}

/// The VM a snapshot was taken of, in brief (for listings).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecSummary {
    /// vCPUs.
    pub cpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Number of disks.
    pub disks: usize,
}

/// One snapshot in a [`Snapshots`] store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    /// Its name (the directory name).
    pub name: String,
    /// Its directory.
    pub path: PathBuf,
    /// When it was taken (unix seconds; 0 if unreadable).
    pub created_at: u64,
    /// Bytes it takes on disk (RAM is stored sparse).
    pub size_bytes: u64,
    /// The VM it was taken of, when its metadata is readable.
    pub spec: Option<SpecSummary>,
    /// The sandbox it was taken from, when known.
    pub source: Option<String>,
    /// The capsa version that wrote it.
    pub capsa_version: Option<String>,
    /// Why it cannot be used, for a directory whose metadata is unreadable.
    pub problem: Option<String>,
}

/// The named snapshots under one directory.
#[derive(Debug, Clone)]
pub struct Snapshots {
    root: PathBuf,
}

impl Snapshots {
    /// The store at `root`, or at [`Snapshots::default_root`] for `None`.
    pub fn new(root: Option<PathBuf>) -> Self {
        Self {
            root: root.unwrap_or_else(Self::default_root),
        }
    }

    /// `$CAPSA_SNAPSHOT_DIR`; else `$XDG_DATA_HOME/capsa/snapshots`; else
    /// `$HOME/.local/share/capsa/snapshots`; else a per-user directory in `$TMPDIR`.
    pub fn default_root() -> PathBuf {
        let env = |k: &str| {
            std::env::var_os(k)
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
        };
        if let Some(d) = env("CAPSA_SNAPSHOT_DIR") {
            return d;
        }
        if let Some(d) = env("XDG_DATA_HOME") {
            return d.join("capsa").join("snapshots");
        }
        if let Some(h) = env("HOME") {
            return h.join(".local/share/capsa/snapshots");
        }
        use std::os::unix::fs::MetadataExt;
        let uid = std::fs::metadata("/proc/self").map_or(0, |m| m.uid());
        std::env::temp_dir().join(format!("capsa-snapshots-{uid}"))
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the snapshot `name` is (or would be); the name and the store
    /// directory are checked.
    pub fn path(&self, name: &str) -> Result<PathBuf> {
        check_name(name)?;
        self.check()?;
        Ok(self.root.join(name))
    }

    /// Refuses a store another user owns or can write: a planted snapshot
    /// would be restored as the caller's own memory and disks.
    fn check(&self) -> Result<()> {
        capsa_core::check_private_dir(&self.root).map_err(|problem| Error::UnsafeDir {
            what: "snapshot store",
            path: self.root.clone(),
            problem,
        })
    }

    /// Opens the snapshot `name`.
    pub fn get(&self, name: &str) -> Result<Snapshot> {
        let path = self.path(name)?;
        if !path.is_dir() {
            return Err(self.not_found(name));
        }
        Snapshot::open(&path)
    }

    /// Every snapshot, sorted by name. Directories that are not valid names
    /// (including snapshots still being written) are skipped; a snapshot whose
    /// metadata is unreadable is listed with its `problem`.
    pub fn list(&self) -> Result<Vec<SnapshotEntry>> {
        self.check()?;
        let rd = match std::fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("listing {}", self.root.display()), e)),
        };
        let mut out = Vec::new();
        for entry in rd {
            let entry =
                entry.map_err(|e| Error::io(format!("listing {}", self.root.display()), e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if capsa_vmm::validate_name(&name).is_err() || !entry.path().is_dir() {
                continue;
            }
            out.push(entry_of(&name, &entry.path()));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Snapshots `sandbox` as `name` (the sandbox keeps running). The snapshot
    /// is written next to the others under a temporary name and renamed into
    /// place once complete, so a crash never leaves half a snapshot under `name`.
    pub async fn create(&self, name: &str, sandbox: &Sandbox) -> Result<SnapshotEntry> {
        let path = self.path(name)?;
        if path.exists() {
            return Err(Error::SnapshotExists { name: name.into() });
        }
        create_private_dir_all(&self.root)?;
        self.check()?;
        self.clean_stale_tmp();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let tmp = self
            .root
            .join(format!(".tmp-{}-{nanos}-{name}", std::process::id()));
        create_private_dir_all(&tmp)?;
        let written = async {
            sandbox.snapshot(&tmp).await?;
            let rec = StoreRecord {
                source: Some(sandbox.name().to_string()),
            };
            let text = serde_json::to_vec_pretty(&rec)
                .map_err(|e| Error::io("encoding store.json", std::io::Error::other(e)))?;
            std::fs::write(tmp.join(STORE_FILE), text)
                .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
            // A directory that appeared meanwhile is not empty: rename refuses it.
            std::fs::rename(&tmp, &path).map_err(|e| {
                if path.exists() {
                    Error::SnapshotExists { name: name.into() }
                } else {
                    Error::io(format!("moving the snapshot to {}", path.display()), e)
                }
            })
        }
        .await;
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        Ok(entry_of(name, &path))
    }

    /// Removes the snapshot `name`. Sandboxes restored from it keep running
    /// (their memory is their own), but one with disks cannot be booted
    /// again after a stop: its disk overlays sit on the snapshot's frozen disks.
    pub fn remove(&self, name: &str) -> Result<()> {
        let path = self.path(name)?;
        if !path.is_dir() {
            return Err(self.not_found(name));
        }
        // Out of the namespace first, so nobody restores a half-deleted snapshot.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let doomed = self
            .root
            .join(format!(".rm-{}-{nanos}-{name}", std::process::id()));
        std::fs::rename(&path, &doomed)
            .map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
        std::fs::remove_dir_all(&doomed)
            .map_err(|e| Error::io(format!("removing {}", doomed.display()), e))
    }

    fn not_found(&self, name: &str) -> Error {
        Error::SnapshotNotFound {
            name: name.into(),
            root: self.root.clone(),
        }
    }

    /// Removes temporary directories whose writer process is gone.
    fn clean_stale_tmp(&self) {
        let Ok(rd) = std::fs::read_dir(&self.root) else {
            return;
        };
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = n.strip_prefix(".tmp-").or_else(|| n.strip_prefix(".rm-")) else {
                continue;
            };
            let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid {
                if !capsa_vmm::state::process_alive(pid, None) {
                    tracing::info!(dir = %e.path().display(), "removing a stale snapshot directory");
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

fn check_name(name: &str) -> Result<()> {
    capsa_core::check_name(name).map_err(|problem| Error::SnapshotName {
        name: name.chars().take(80).collect(),
        problem,
    })
}

fn entry_of(name: &str, path: &Path) -> SnapshotEntry {
    let rec = read_store_record(path);
    let mut entry = SnapshotEntry {
        name: name.to_string(),
        path: path.to_path_buf(),
        created_at: 0,
        size_bytes: 0,
        spec: None,
        source: rec.source,
        capsa_version: None,
        problem: None,
    };
    match Snapshot::open(path) {
        Ok(s) => {
            let m = s.meta();
            entry.created_at = m.created_at;
            entry.size_bytes = s.size_on_disk();
            entry.spec = Some(SpecSummary {
                cpus: m.spec.cpus,
                memory_mib: m.spec.memory_mib,
                disks: m.spec.disks.len(),
            });
            entry.capsa_version = Some(m.capsa_version.clone());
        }
        Err(e) => entry.problem = Some(e.to_string()),
    }
    entry
}

fn read_store_record(dir: &Path) -> StoreRecord {
    use std::io::Read;
    let mut text = String::new();
    match std::fs::File::open(dir.join(STORE_FILE)) {
        Ok(f) if (&f).take(MAX_STORE_FILE).read_to_string(&mut text).is_ok() => {
            serde_json::from_str(&text).unwrap_or_default()
        }
        _ => StoreRecord::default(),
    }
}

fn create_private_dir_all(path: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_missing_and_listing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Snapshots::new(Some(tmp.path().join("snaps")));
        assert!(store.list().unwrap().is_empty());
        let e = store.get("nosuch").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("nosuch") && msg.contains("capsa snapshot ls"),
            "{msg}"
        );
        let e = store.path("../x").unwrap_err();
        assert!(e.to_string().contains("snapshot name"), "{e}");
        assert!(store.remove("nosuch").is_err());
        // A broken snapshot is listed with its problem; temporaries are not listed.
        std::fs::create_dir_all(store.root().join("broken")).unwrap();
        std::fs::create_dir_all(store.root().join(".tmp-1-2-x")).unwrap();
        let l = store.list().unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].name, "broken");
        assert!(l[0].problem.is_some());
        store.remove("broken").unwrap();
        assert!(store.list().unwrap().is_empty());
        assert!(!store.root().join("broken").exists());
    }
}
