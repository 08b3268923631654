//! Sandboxes on OCI images: resolving an image reference through the image
//! store (`capsa-oci`) into a [`RootfsSpec`], the upper layer choice, and the
//! image's `User` resolved in the image's own `/etc/passwd` and `/etc/group`.

use std::path::{Path, PathBuf};

use capsa_core::{ImageRunConfig, RootfsFormat, RootfsSpec, UpperSpec};

use crate::{Error, Result};

/// Environment variable naming the image store directory (default: the
/// store's own default, `~/.cache/capsa/images`).
pub const IMAGE_STORE_ENV: &str = "CAPSA_IMAGE_STORE";
/// Largest `/etc/passwd` or `/etc/group` read from an image.
pub const MAX_ACCOUNT_FILE: usize = 4 << 20;
/// Most lines of an account file looked at.
const MAX_ACCOUNT_LINES: usize = 100_000;

/// The writable layer of an image sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upper {
    /// A tmpfs capped at this many MiB (default: half the guest's RAM).
    Tmpfs {
        /// Cap in MiB.
        size_mib: u64,
    },
    /// An ext4 disk at `path`, created with `size_mib` if missing (kept
    /// otherwise, so a named sandbox's writes persist across restarts).
    Disk {
        /// Host path of the disk image.
        path: PathBuf,
        /// Size when created.
        size_mib: u64,
    },
}

/// The image store: `$CAPSA_IMAGE_STORE`, else `capsa-oci`'s default.
pub fn store() -> Result<capsa_oci::Store> {
    let s = match std::env::var_os(IMAGE_STORE_ENV).filter(|v| !v.is_empty()) {
        Some(dir) => capsa_oci::Store::open(PathBuf::from(dir)),
        None => capsa_oci::Store::open_default(),
    };
    s.map_err(image_err)
}

fn image_err(e: capsa_oci::OciError) -> Error {
    Error::Oci(e)
}

/// Resolves `reference` (name, digest or unique digest prefix) in the image
/// store, converting it to EROFS on first use, into the spec of a root
/// filesystem with `upper` (a missing disk upper is created here).
pub async fn resolve(
    reference: &str,
    memory_mib: u64,
    upper: Option<&Upper>,
) -> Result<RootfsSpec> {
    let reference = reference.to_string();
    let upper = upper.cloned();
    tokio::task::spawn_blocking(move || resolve_blocking(&reference, memory_mib, upper.as_ref()))
        .await
        .map_err(|e| Error::io("resolving the image", std::io::Error::other(e)))?
}

fn resolve_blocking(reference: &str, memory_mib: u64, upper: Option<&Upper>) -> Result<RootfsSpec> {
    let store = store()?;
    let rec = store.find(reference).map_err(image_err)?;
    let rootfs = store
        .rootfs(
            &rec,
            capsa_oci::FsFormat::Erofs,
            capsa_oci::Limits::default(),
        )
        .map_err(image_err)?;
    let c = &rec.config;
    let config = ImageRunConfig {
        env: c.env.clone().unwrap_or_default(),
        working_dir: c.working_dir.clone().filter(|w| !w.is_empty()),
        user: c.user.clone().filter(|u| !u.is_empty()),
        entrypoint: c.entrypoint.clone().unwrap_or_default(),
        cmd: c.cmd.clone().unwrap_or_default(),
    };
    let upper = match upper {
        None => UpperSpec::Tmpfs {
            size_mib: RootfsSpec::default_tmpfs_mib(memory_mib),
        },
        Some(Upper::Tmpfs { size_mib }) => UpperSpec::Tmpfs {
            size_mib: *size_mib,
        },
        Some(Upper::Disk { path, size_mib }) => {
            make_upper_disk(path, *size_mib)?;
            UpperSpec::Disk { path: path.clone() }
        }
    };
    Ok(RootfsSpec {
        image: rootfs.image.path,
        format: RootfsFormat::Erofs,
        digest: rec.digest.as_str().to_string(),
        upper,
        config,
    })
}

/// Creates an ext4 upper disk of `size_mib` at `path` unless one exists.
fn make_upper_disk(path: &Path, size_mib: u64) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    if !(1..=capsa_core::MAX_DISK_UPPER_MIB).contains(&size_mib) {
        return Err(Error::InvalidArgument(format!(
            "a disk upper of {size_mib} MiB; fix: ask for 1 MiB to 1 TiB, e.g. --disk-upper 1G"
        )));
    }
    let tmp = path.with_extension("tmp-upper");
    let f = std::fs::File::create(&tmp)
        .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
    f.set_len(size_mib << 20)
        .map_err(|e| Error::io(format!("sizing {}", tmp.display()), e))?;
    drop(f);
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^has_journal", "-E", "root_owner=0:0"])
        .arg(&tmp)
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::InvalidArgument(format!(
                "mkfs.ext4 failed on {}: {}",
                tmp.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            )));
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(
                "running mkfs.ext4 for the disk upper (fix: install e2fsprogs)",
                e,
            ));
        }
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(format!("creating {}", path.display()), e))
}

/// An image's `User`, resolved: the ids a command runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups: every `/etc/group` entry listing the user's name
    /// (Docker's rule), at most [`capsa_proto::MAX_GROUPS`].
    pub groups: Vec<u32>,
}

/// Resolves an OCI `User` (`user`, `uid`, `user:group`, `uid:gid`, ...)
/// against the image's `/etc/passwd` and `/etc/group` contents (hostile
/// input: bounded, never panics). Docker's rules: a numeric uid not in
/// `passwd` gets gid 0; a name must exist; the user's supplementary groups
/// are the groups that list its name.
pub fn resolve_user(spec: &str, passwd: &[u8], group: &[u8]) -> Result<ResolvedUser> {
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let bad = |what: String| {
        Error::InvalidArgument(format!(
            "image user {spec:?}: {what}; fix: use a numeric uid[:gid], or add the user to the image's /etc/passwd"
        ))
    };
    let entry = |name: Option<&str>, uid: Option<u32>| {
        lines(passwd).find_map(|f| {
            let id = f.get(2)?.parse::<u32>().ok()?;
            let gid = f.get(3)?.parse::<u32>().ok()?;
            let hit = name.is_some_and(|n| f.first() == Some(&n)) || uid == Some(id);
            hit.then(|| (id, gid, f.first().map(|n| n.to_string())))
        })
    };
    let (uid, primary, name) = match user.parse::<u32>() {
        Ok(uid) => entry(None, Some(uid)).map_or((uid, 0, None), |(_, g, n)| (uid, g, n)),
        Err(_) if user.is_empty() => return Err(bad("empty user".into())),
        Err(_) => entry(Some(user), None)
            .ok_or_else(|| bad(format!("no user {user:?} in /etc/passwd")))?,
    };
    let gid = match grp {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lines(group)
                .find_map(|f| (f.first() == Some(&g)).then(|| f.get(2)?.parse::<u32>().ok())?)
                .ok_or_else(|| bad(format!("no group {g:?} in /etc/group")))?,
        },
    };
    let mut groups = Vec::new();
    if let Some(name) = name.filter(|n| !n.is_empty()) {
        for f in lines(group) {
            let listed = f
                .get(3)
                .is_some_and(|m| m.split(',').any(|m| m.trim() == name));
            if let (true, Some(Ok(g))) = (listed, f.get(2).map(|g| g.parse::<u32>())) {
                if !groups.contains(&g) && groups.len() < capsa_proto::MAX_GROUPS {
                    groups.push(g);
                }
            }
        }
    }
    Ok(ResolvedUser { uid, gid, groups })
}

/// The `:`-separated fields of each line of an account file, bounded.
fn lines(text: &[u8]) -> impl Iterator<Item = Vec<&str>> {
    let text = &text[..text.len().min(MAX_ACCOUNT_FILE)];
    text.split(|&b| b == b'\n')
        .take(MAX_ACCOUNT_LINES)
        .filter_map(|l| std::str::from_utf8(l).ok())
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(':').take(8).collect())
}

/// The environment of a command in an image sandbox: the image's `Env`,
/// then the sandbox's, then the command's (later entries win in the agent).
pub(crate) fn image_env(config: &ImageRunConfig) -> Vec<(String, String)> {
    config.env_pairs()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &[u8] = b"root:x:0:0:root:/root:/bin/sh\n# comment\nbad line\napp:x:1000:1001::/home/app:/bin/sh\nweird:x:notanumber:1\n";
    const GROUP: &[u8] =
        b"root:x:0:\nstaff:x:50:app\nwheel:x:60:bob, app\nother:x:70:application\n";

    fn ids(spec: &str, passwd: &[u8], group: &[u8]) -> (u32, u32, Vec<u32>) {
        let u = resolve_user(spec, passwd, group).unwrap();
        (u.uid, u.gid, u.groups)
    }

    #[test]
    fn users_resolve_like_docker() {
        assert_eq!(ids("app", PASSWD, GROUP), (1000, 1001, vec![50, 60]));
        assert_eq!(ids("1000", PASSWD, GROUP), (1000, 1001, vec![50, 60]));
        assert_eq!(ids("4242", PASSWD, GROUP), (4242, 0, vec![]));
        assert_eq!(ids("app:staff", PASSWD, GROUP), (1000, 50, vec![50, 60]));
        assert_eq!(ids("root", PASSWD, GROUP), (0, 0, vec![]));
        assert_eq!(ids("7:9", b"", b""), (7, 9, vec![]));
        let e = resolve_user("nobody", PASSWD, GROUP)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no user") && e.contains("fix:"), "{e}");
        assert!(resolve_user("app:nogroup", PASSWD, GROUP).is_err());
        assert!(resolve_user("weird", PASSWD, GROUP).is_err());
        assert!(resolve_user("", PASSWD, GROUP).is_err());
        // Garbage never panics.
        let junk: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        let _ = resolve_user("x", &junk, &junk);
    }
}
