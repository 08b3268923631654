//! Base snapshots: `capsa run` and the library's `SandboxBuilder::build`
//! (unless `.fast_start(false)`) boot cold once per spec, then restore.
//!
//! The first sandbox built through [`build`] for a given spec boots cold and
//! is snapshotted right after its agent answers (before any user command
//! runs), into `~/.cache/capsa/snapshots/base-<key>/`. Later builds of the
//! same spec restore that snapshot, with a fresh identity, in a fraction of a
//! boot. The key hashes the spec (minus per-run settings), the kernel and
//! initramfs fingerprints and the capsa version, so a new kernel, bundle or
//! capsa simply makes a new base. Snapshots are written to a temporary
//! directory and renamed into place, so concurrent runs never see (or make)
//! a half-written one; a base that fails to restore is deleted and remade.
//!
//! Sandboxes with disks always boot cold: their disks' content is per run.
//! An image sandbox with the default tmpfs upper is the exception: its only
//! disk is the read-only image, so the key (which holds the spec, hence the
//! image digest and file) names one base per image; a restore checks the
//! image file's identity like any read-only disk's. A disk upper boots cold.

use std::path::{Path, PathBuf};

use capsa_core::{BootSource, FileIdentity, CAPSA_VERSION};
use sha2::{Digest, Sha256};

use crate::{Error, Result, Sandbox, SandboxBuilder};

/// The directory base snapshots live in: `$XDG_CACHE_HOME/capsa/snapshots`
/// (default `~/.cache/capsa/snapshots`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("capsa")
        .join("snapshots")
}

/// The base snapshot directory `builder` maps to (whether or not it exists
/// yet), or `None` if such sandboxes always boot cold (they have disks).
pub async fn dir_for(builder: &SandboxBuilder) -> Result<Option<PathBuf>> {
    Ok(key(builder)
        .await?
        .map(|k| cache_dir().join(format!("base-{k}"))))
}

async fn key(builder: &SandboxBuilder) -> Result<Option<String>> {
    let mut spec = builder.vm_spec().await?;
    let only_image = spec
        .disks
        .iter()
        .all(|d| d.read_only && d.serial.as_deref() == Some(capsa_core::ROOTFS_SERIAL));
    if !only_image {
        return Ok(None);
    }
    spec.console = Default::default();
    let BootSource::LinuxDirect { kernel, initrd, .. } = &spec.boot;
    let (kernel, initrd) = (kernel.clone(), initrd.clone());
    let ids = tokio::task::spawn_blocking(move || {
        let k = FileIdentity::of(&kernel)?;
        let i = initrd.as_deref().map(FileIdentity::of).transpose()?;
        Ok::<_, std::io::Error>((k, i))
    })
    .await
    .map_err(|e| Error::io("fingerprinting the kernel", std::io::Error::other(e)))?
    .map_err(|e| Error::io("fingerprinting the kernel", e))?;
    let mut h = Sha256::new();
    h.update(CAPSA_VERSION.as_bytes());
    // The machine's device layout (the share slots' root ports): a saved state
    // only loads into the same layout.
    h.update(b"layout: share slots 8");
    h.update(
        serde_json::to_vec(&spec)
            .map_err(|e| Error::io("encoding the spec", std::io::Error::other(e)))?,
    );
    h.update(ids.0.fingerprint.as_bytes());
    if let Some(i) = &ids.1 {
        h.update(i.fingerprint.as_bytes());
    }
    let digest = h.finalize();
    Ok(Some(
        digest[..8].iter().map(|b| format!("{b:02x}")).collect(),
    ))
}

/// Builds the sandbox from its base snapshot, making the snapshot on first use.
pub async fn build(mut builder: SandboxBuilder) -> Result<Sandbox> {
    // Shares are no part of a base snapshot (a snapshot cannot hold one):
    // checked first, then hot-plugged into whichever sandbox comes out.
    let mut shares = std::mem::take(&mut builder.shares);
    if shares.is_empty() {
        return build_base(builder).await;
    }
    crate::share::validate_shares(&mut shares)?;
    build_base(builder).await?.add_shares_or_kill(shares).await
}

async fn build_base(builder: SandboxBuilder) -> Result<Sandbox> {
    let Some(dir) = dir_for(&builder).await? else {
        return builder.boot().await;
    };
    if dir.join(capsa_core::SNAPSHOT_META_FILE).is_file() {
        let t = std::time::Instant::now();
        match builder.restore_from(&dir).build().await {
            Ok(sb) => {
                tracing::debug!(dir = %dir.display(), took = ?t.elapsed(), "restored the base snapshot");
                return Ok(sb);
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), "the base snapshot did not restore ({e}); booting cold and remaking it");
                remove(&dir);
            }
        }
    }
    let sb = builder.boot().await?;
    if let Err(e) = save(&sb, &dir).await {
        tracing::warn!(dir = %dir.display(), "could not save a base snapshot: {e}");
    }
    Ok(sb)
}

/// Snapshots `sb` into a temporary sibling of `dir`, then renames it into place.
async fn save(sb: &Sandbox, dir: &Path) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-base-")
        .tempdir_in(parent)
        .map_err(|e| Error::io(format!("creating a directory in {}", parent.display()), e))?;
    // VM level: per-run settings (environment, working directory) stay out.
    sb.vm().snapshot(tmp.path()).await?;
    let tmp = tmp.keep();
    if let Err(e) = std::fs::rename(&tmp, dir) {
        // Another run got there first (the target exists and is not empty): keep theirs.
        tracing::debug!("base snapshot not renamed into place ({e}); keeping the existing one");
        remove(&tmp);
    }
    Ok(())
}

/// Deletes a base snapshot; renamed away first so that a concurrent reader
/// never sees it half deleted.
fn remove(dir: &Path) {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let trash = parent.join(format!(
        ".trash-{}-{}",
        std::process::id(),
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    if std::fs::rename(dir, &trash).is_ok() {
        let _ = std::fs::remove_dir_all(&trash);
    }
}

/// Deletes every base snapshot (e.g. for `capsa image rm`-style clean-ups).
pub fn clear() -> Result<()> {
    let dir = cache_dir();
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("base-")
            || name.starts_with(".tmp-base-")
            || name.starts_with(".trash-")
        {
            remove(&e.path());
        }
    }
    Ok(())
}
