//! The container's root filesystem: containerd's snapshotter mounts are
//! mounted on `<bundle>/rootfs` (as runc does), converted once into a
//! read-only EROFS image with capsa's converter (`capsa_oci::mkfs`), and
//! unmounted again. The guest sees that image over virtio-blk under a
//! per-sandbox tmpfs upper: capsa's own image path, not virtio-fs.
//!
//! Cache: an overlay snapshot whose upper directory is still empty (a fresh
//! container) is just its lower chain, so the image is keyed by a hash of the
//! `lowerdir=` list and shared by every container on that chain. Anything
//! else (a native snapshot, a non-empty upper) gets an image of its own,
//! named after the sandbox and removed with it.

use std::path::{Path, PathBuf};

use capsa_core::{ImageRunConfig, RootfsFormat, RootfsSpec, UpperSpec};
use containerd_shim::protos::api::Mount;
use sha2::{Digest, Sha256};

use crate::error::{Result, ShimError};

/// Environment variable naming the image cache directory.
pub const CACHE_ENV: &str = "CAPSA_SHIM_ROOTFS_CACHE";
/// Most snapshotter mounts taken.
const MAX_MOUNTS: usize = 16;
/// Longest mount option list (bytes) taken.
const MAX_OPTION_BYTES: usize = 64 << 10;

/// The cache directory: `$CAPSA_SHIM_ROOTFS_CACHE`, else
/// `$XDG_CACHE_HOME/capsa/containerd-rootfs` (`~/.cache/...`).
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(CACHE_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("capsa").join("containerd-rootfs")
}

/// The per-sandbox image (uncached snapshots) of `sandbox`.
pub fn private_image(sandbox: &str) -> PathBuf {
    cache_dir()
        .join("containers")
        .join(format!("{sandbox}.erofs"))
}

/// How an image for these mounts is found again.
#[derive(Debug, PartialEq, Eq)]
pub enum CacheKey {
    /// Shared by every snapshot on this lower chain (hex sha256).
    Chain(String),
    /// This container's own.
    Private,
}

/// The cache key of a snapshot's mounts (see the module docs).
pub fn cache_key(mounts: &[Mount]) -> CacheKey {
    let [m] = mounts else {
        return CacheKey::Private;
    };
    if m.type_ != "overlay" {
        return CacheKey::Private;
    }
    let mut lower = None;
    for o in &m.options {
        if let Some(v) = o.strip_prefix("lowerdir=") {
            lower = Some(v);
        } else if let Some(v) = o.strip_prefix("upperdir=") {
            let empty = std::fs::read_dir(v).is_ok_and(|mut d| d.next().is_none());
            if !empty {
                return CacheKey::Private;
            }
        }
    }
    match lower {
        Some(l) => {
            let mut h = Sha256::new();
            h.update(b"overlay-lowerdir\0");
            h.update(l.as_bytes());
            CacheKey::Chain(hex(&h.finalize()))
        }
        None => CacheKey::Private,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn check_mounts(mounts: &[Mount]) -> Result<()> {
    if mounts.len() > MAX_MOUNTS {
        return Err(ShimError::Rootfs {
            message: format!("{} rootfs mounts (at most {MAX_MOUNTS})", mounts.len()),
            fix: "use a snapshotter that gives one mount (overlayfs or native)".into(),
        });
    }
    for m in mounts {
        let bytes: usize = m.options.iter().map(String::len).sum();
        if bytes > MAX_OPTION_BYTES || m.type_.len() > 64 || m.source.len() > 4096 {
            return Err(ShimError::Rootfs {
                message: "a rootfs mount with oversized fields".into(),
                fix: "use fewer image layers".into(),
            });
        }
        if !matches!(
            m.type_.as_str(),
            "overlay" | "bind" | "rbind" | "ext4" | "xfs" | "erofs"
        ) {
            return Err(ShimError::Rootfs {
                message: format!("rootfs mount type {:?} is not supported", m.type_),
                fix: "use the overlayfs or native snapshotter".into(),
            });
        }
    }
    Ok(())
}

/// Builds (or finds) the read-only image of the container root described by
/// `mounts` (mounted on `<bundle>/rootfs` meanwhile; empty: that directory
/// already holds the root) and returns the root filesystem spec of a
/// sandbox named `sandbox` with `memory_mib` of RAM, and whether the image
/// is shared by its layer chain (worth a base snapshot) or this container's.
pub fn prepare(
    bundle: &Path,
    mounts: &[Mount],
    sandbox: &str,
    memory_mib: u64,
) -> Result<(RootfsSpec, bool)> {
    check_mounts(mounts)?;
    let key = cache_key(mounts);
    let (out, digest_src) = match &key {
        CacheKey::Chain(k) => (cache_dir().join(format!("{k}.erofs")), k.clone()),
        CacheKey::Private => (private_image(sandbox), format!("private:{sandbox}")),
    };
    let hit = matches!(key, CacheKey::Chain(_)) && out.is_file();
    if hit {
        tracing::info!(image = %out.display(), "root filesystem image from the cache");
    } else {
        let target = bundle.join("rootfs");
        std::fs::create_dir_all(&target)
            .map_err(|e| ShimError::io(format!("creating {}", target.display()), e))?;
        for m in mounts {
            containerd_shim::mount::mount_rootfs(
                Some(m.type_.as_str()),
                Some(m.source.as_str()),
                &m.options,
                &target,
            )
            .map_err(|e| ShimError::Rootfs {
                message: format!(
                    "mounting the {} snapshot on {}: {e}",
                    m.type_,
                    target.display()
                ),
                fix: "run the shim as root under containerd, with the overlay module loaded".into(),
            })?;
        }
        let built = build(&target, &out, &digest_src);
        if !mounts.is_empty() {
            unmount(&target);
        }
        built?;
    }
    let digest = {
        let mut h = Sha256::new();
        h.update(digest_src.as_bytes());
        format!("sha256:{}", hex(&h.finalize()))
    };
    let shared = matches!(key, CacheKey::Chain(_));
    let spec = RootfsSpec {
        image: out,
        format: RootfsFormat::Erofs,
        digest,
        upper: UpperSpec::Tmpfs {
            size_mib: RootfsSpec::default_tmpfs_mib(memory_mib),
        },
        config: ImageRunConfig::default(),
    };
    Ok((spec, shared))
}

/// Converts `tree` into `out` through a temp file (concurrent shims never
/// see a half-written image).
fn build(tree: &Path, out: &Path, key: &str) -> Result<()> {
    let dir = out.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .map_err(|e| ShimError::io(format!("creating {}", dir.display()), e))?;
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        out.file_name().and_then(|n| n.to_str()).unwrap_or("image")
    ));
    let opts = capsa_oci::MkfsOptions {
        format: capsa_oci::FsFormat::Erofs,
        uuid: capsa_oci::mkfs::uuid_from(Sha256::digest(key.as_bytes()).as_slice()),
        timestamp: 0,
        // SAFETY: geteuid has no preconditions.
        ownership_preserved: unsafe { libc::geteuid() } == 0,
    };
    let started = std::time::Instant::now();
    if let Err(e) = capsa_oci::mkfs::build(tree, &tmp, &opts) {
        let _ = std::fs::remove_file(&tmp);
        return Err(ShimError::Rootfs {
            message: format!("converting {}: {e}", tree.display()),
            fix: "install erofs-utils (mkfs.erofs)".into(),
        });
    }
    std::fs::rename(&tmp, out)
        .map_err(|e| ShimError::io(format!("renaming to {}", out.display()), e))?;
    tracing::info!(image = %out.display(), elapsed = ?started.elapsed(), "root filesystem image built");
    Ok(())
}

/// Unmounts everything under `<bundle>/rootfs` (best effort: logged).
pub fn unmount(target: &Path) {
    let Some(t) = target.to_str() else { return };
    if let Err(e) = containerd_shim::mount::umount_recursive(Some(t), libc::MNT_DETACH) {
        tracing::warn!(target = t, "unmounting the rootfs: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(opts: &[&str]) -> Mount {
        Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options: opts.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn keys_follow_the_lower_chain() {
        let up = tempfile::tempdir().unwrap();
        let u = format!("upperdir={}", up.path().display());
        let a = cache_key(&[overlay(&["index=off", &u, "lowerdir=/s/2/fs:/s/1/fs"])]);
        let b = cache_key(&[overlay(&["lowerdir=/s/2/fs:/s/1/fs"])]);
        let c = cache_key(&[overlay(&["lowerdir=/s/3/fs:/s/1/fs"])]);
        assert!(matches!(a, CacheKey::Chain(_)));
        assert_eq!(a, b);
        assert_ne!(a, c);
        std::fs::write(up.path().join("f"), b"x").unwrap();
        assert_eq!(
            cache_key(&[overlay(&[&u, "lowerdir=/s/1/fs"])]),
            CacheKey::Private
        );
        let bind = Mount {
            type_: "bind".into(),
            source: "/x".into(),
            ..Default::default()
        };
        assert_eq!(cache_key(&[bind]), CacheKey::Private);
        assert_eq!(cache_key(&[]), CacheKey::Private);
        assert!(check_mounts(&[Mount {
            type_: "nfs".into(),
            ..Default::default()
        }])
        .is_err());
    }
}
