//! Host paths that come from someone other than the host's user: which
//! directories a state root may be, and which files an API client may hand
//! to a VM.
//!
//! A string check cannot decide this (symlinks, `..`, devices, other users'
//! directories), so each check looks at the file system itself.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Checks that `dir` (if it exists) is a directory that only the caller
/// controls: not a symlink, owned by the effective user, not writable by
/// group or others. Returns the problem in words otherwise.
///
/// A directory another local user created first (in `/tmp`, say) could hold
/// planted sockets or state files; capsa refuses to use it.
pub fn check_private_dir(dir: &Path) -> Result<(), String> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot inspect it: {e}")),
    };
    if meta.file_type().is_symlink() {
        return Err("it is a symbolic link".into());
    }
    if !meta.is_dir() {
        return Err("it is not a directory".into());
    }
    // SAFETY: geteuid cannot fail and touches no memory.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid {
        return Err(format!(
            "it is owned by uid {}, not by you (uid {euid})",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "it is writable by group or others (mode {:o})",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// The directories whose regular files an API client may attach (disks,
/// and later shares and images): everything else on the host is refused.
#[derive(Debug, Clone, Default)]
pub struct HostPathPolicy {
    /// Canonical (symlink-free) allowed directories.
    allowed: Vec<PathBuf>,
}

/// Why a host path was refused by a [`HostPathPolicy`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct PathRefusal {
    /// The path as given.
    pub path: String,
    /// What is wrong with it.
    pub problem: String,
}

impl HostPathPolicy {
    /// A policy allowing files below `dirs`. Directories that do not exist
    /// (yet) are kept as given, so files created in them later are allowed.
    pub fn new(dirs: impl IntoIterator<Item = PathBuf>) -> Self {
        let mut allowed: Vec<PathBuf> = dirs
            .into_iter()
            .filter(|d| d.is_absolute())
            .map(|d| std::fs::canonicalize(&d).unwrap_or(d))
            .collect();
        allowed.sort();
        allowed.dedup();
        Self { allowed }
    }

    /// The allowed directories, for messages.
    pub fn allowed(&self) -> &[PathBuf] {
        &self.allowed
    }

    /// The allowed directories as one comma-separated string.
    pub fn describe(&self) -> String {
        if self.allowed.is_empty() {
            return "none".into();
        }
        self.allowed
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Checks `path` names a directory at or below an allowed directory once
    /// every symlink is resolved (a share's host side); returns the resolved
    /// path, to be used from then on.
    pub fn check_dir(&self, path: &str) -> Result<PathBuf, PathRefusal> {
        self.check(path, "no such directory", "sharing", |ft| {
            (!ft.is_dir()).then(|| "it is not a directory".to_string())
        })
    }

    /// Checks `path` names a regular file below an allowed directory once
    /// every symlink is resolved; returns that resolved path, which is what
    /// should be used from then on (a symlink swapped in later is not followed).
    pub fn check_file(&self, path: &str) -> Result<PathBuf, PathRefusal> {
        self.check(path, "no such file", "attaching", |ft| {
            if ft.is_block_device() || ft.is_char_device() {
                Some("it is a device; only regular image files can be attached".into())
            } else {
                (!ft.is_file()).then(|| "it is not a regular file".to_string())
            }
        })
    }

    /// The one walk of both checks: absolute, resolved, of the right kind
    /// (`wrong_kind` says why not), below an allowed directory.
    fn check(
        &self,
        path: &str,
        missing: &str,
        purpose: &str,
        wrong_kind: impl Fn(std::fs::FileType) -> Option<String>,
    ) -> Result<PathBuf, PathRefusal> {
        let refuse = |problem: String| PathRefusal {
            path: path.chars().take(4096).collect(),
            problem,
        };
        let p = Path::new(path);
        if path.contains('\0') || !p.is_absolute() {
            return Err(refuse("not an absolute path".into()));
        }
        let real = std::fs::canonicalize(p).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => refuse(missing.into()),
            _ => refuse(format!("cannot resolve it: {e}")),
        })?;
        let meta =
            std::fs::metadata(&real).map_err(|e| refuse(format!("cannot inspect it: {e}")))?;
        if let Some(problem) = wrong_kind(meta.file_type()) {
            return Err(refuse(problem));
        }
        if !self.allowed.iter().any(|d| real.starts_with(d)) {
            let via = if real != p {
                format!(" (it resolves to {})", real.display())
            } else {
                String::new()
            };
            return Err(refuse(format!(
                "it is outside the directories allowed for {purpose}{via}: {}",
                self.describe()
            )));
        }
        Ok(real)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_below_allowed_dirs() {
        let t = tempfile::tempdir().unwrap();
        let ok = t.path().join("ok");
        let out = tempfile::tempdir().unwrap();
        std::fs::create_dir(&ok).unwrap();
        std::fs::write(ok.join("disk.img"), b"x").unwrap();
        std::fs::write(out.path().join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(out.path().join("secret"), ok.join("link")).unwrap();
        std::os::unix::fs::symlink("../../../../../../../../etc/shadow", ok.join("dots")).unwrap();
        let pol = HostPathPolicy::new([ok.clone()]);
        let s = |p: &Path| p.display().to_string();
        assert!(pol.check_file(&s(&ok.join("disk.img"))).is_ok());
        for bad in [
            s(&ok.join("link")),
            s(&ok.join("dots")),
            s(&out.path().join("secret")),
            format!("{}/../{}", s(&ok), "x"),
            "/etc/shadow".into(),
            "/dev/null".into(),
            "relative.img".into(),
            s(&ok),
        ] {
            let e = pol.check_file(&bad).unwrap_err();
            assert!(!e.problem.is_empty(), "{bad}");
        }
        let e = pol.check_file("/etc/shadow").unwrap_err();
        assert!(e.to_string().contains(&s(&ok)), "names the allow-list: {e}");
    }

    #[test]
    fn private_dirs() {
        let t = tempfile::tempdir().unwrap();
        assert!(check_private_dir(t.path()).is_ok());
        assert!(check_private_dir(&t.path().join("missing")).is_ok());
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(check_private_dir(t.path())
            .unwrap_err()
            .contains("writable"));
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let l = t.path().join("l");
        std::os::unix::fs::symlink(t.path(), &l).unwrap();
        assert!(check_private_dir(&l).unwrap_err().contains("symbolic"));
    }
}
