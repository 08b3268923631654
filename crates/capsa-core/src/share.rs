//! Shared directories: a host directory mounted in the guest over virtio-fs.
//!
//! A [`ShareSpec`] is plain data like the rest of the spec; [`ShareSpec::validate`]
//! checks it against the host before anything starts (the host directory
//! exists and is a directory, the guest path is absolute and normalized, the
//! tag is short and plain).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Longest virtio-fs tag (the device's config space holds 36 bytes).
pub const MAX_SHARE_TAG: usize = 36;
/// Longest guest mount path accepted.
pub const MAX_SHARE_GUEST_PATH: usize = 1024;
/// Most shares one VM may have at once (the backend reserves a hot-plug slot for each).
pub const MAX_SHARES: usize = 8;

/// Whether the guest may write to a share. Enforced on the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShareMode {
    /// The guest reads and writes; what it creates belongs to the host directory's owner.
    #[default]
    ReadWrite,
    /// The guest reads only, even as root after a `mount -o remount,rw`.
    ReadOnly,
}

/// A host directory mounted at a guest path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareSpec {
    /// The host directory (absolute).
    pub host: PathBuf,
    /// Where the guest mounts it (absolute, normalized).
    pub guest: String,
    /// Read-only or read-write.
    #[serde(default)]
    pub mode: ShareMode,
    /// The virtio-fs tag; `None` derives one from the guest path ([`ShareSpec::tag`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

impl ShareSpec {
    /// A share of `host` at `guest`.
    pub fn new(host: impl Into<PathBuf>, guest: impl Into<String>, mode: ShareMode) -> Self {
        Self {
            host: host.into(),
            guest: guest.into(),
            mode,
            tag: None,
        }
    }

    /// Whether the share is read-only.
    pub fn read_only(&self) -> bool {
        self.mode == ShareMode::ReadOnly
    }

    /// The virtio-fs tag the guest mounts: the given one, else `capsa-` and
    /// 16 hex digits of the guest path's SHA-256 (unique per guest path, so
    /// per VM, and within the 36-byte limit).
    pub fn tag(&self) -> String {
        match &self.tag {
            Some(t) => t.clone(),
            None => {
                let d = Sha256::digest(self.guest.as_bytes());
                let hex: String = d[..8].iter().map(|b| format!("{b:02x}")).collect();
                format!("capsa-{hex}")
            }
        }
    }

    /// Parses the CLI form `HOST:GUEST[:ro|:rw]`. The host path is made
    /// absolute against the current directory (so `-v .:/work` works).
    pub fn parse_cli(s: &str) -> Result<Self> {
        let bad = |problem: String| {
            Error::invalid(
                "share",
                problem,
                "write HOST:GUEST or HOST:GUEST:ro, e.g. -v \"$PWD:/work\" or -v /data:/data:ro",
            )
        };
        let (rest, mode) = if let Some(r) = s.strip_suffix(":ro") {
            (r, ShareMode::ReadOnly)
        } else if let Some(r) = s.strip_suffix(":rw") {
            (r, ShareMode::ReadWrite)
        } else {
            (s, ShareMode::ReadWrite)
        };
        let Some((host, guest)) = rest.rsplit_once(':') else {
            return Err(bad(format!(
                "{s:?} has no ':' between host and guest paths"
            )));
        };
        if host.is_empty() || guest.is_empty() {
            return Err(bad(format!("{s:?} has an empty host or guest path")));
        }
        let host = Path::new(host);
        let host = if host.is_absolute() {
            host.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|e| Error::io("reading the current directory", e))?
                .join(host)
        };
        Ok(Self::new(host, guest, mode))
    }

    /// Checks the share without touching the host: guest path and tag.
    pub fn check_shape(&self) -> Result<()> {
        check_guest_path(&self.guest)?;
        let tag = self.tag();
        if tag.is_empty()
            || tag.len() > MAX_SHARE_TAG
            || !tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(Error::invalid(
                "share",
                format!(
                    "tag {:?} is not 1 to {MAX_SHARE_TAG} letters, digits, '-', '_' or '.'",
                    tag.chars().take(64).collect::<String>()
                ),
                "leave the tag out (capsa derives one from the guest path) or shorten it",
            ));
        }
        Ok(())
    }

    /// Checks the share against the host: [`ShareSpec::check_shape`], and the
    /// host path is an existing directory (symlinks are resolved, and the
    /// resolved path is kept, so a symlink swapped in later is not followed).
    pub fn validate(&mut self) -> Result<()> {
        self.check_shape()?;
        let fix = "create the directory first, or point the share at an existing directory";
        if !self.host.is_absolute() {
            return Err(Error::invalid(
                "share",
                format!("host path {} is not absolute", self.host.display()),
                "give an absolute host path",
            ));
        }
        let real = std::fs::canonicalize(&self.host).map_err(|e| {
            Error::invalid(
                "share",
                format!("host directory {}: {e}", self.host.display()),
                fix,
            )
        })?;
        let meta = std::fs::metadata(&real).map_err(|e| {
            Error::invalid(
                "share",
                format!("host directory {}: {e}", self.host.display()),
                fix,
            )
        })?;
        if !meta.is_dir() {
            return Err(Error::invalid(
                "share",
                format!(
                    "host path {} is not a directory",
                    self.host.display()
                ),
                "share a directory (to put one file in the guest, share its directory or use `capsa cp`)",
            ));
        }
        self.host = real;
        Ok(())
    }
}

/// Checks a guest mount path: absolute, normalized (no `.`, `..`, `//` or
/// trailing `/`), not `/` itself, bounded, no NUL.
pub fn check_guest_path(p: &str) -> Result<()> {
    let bad = |problem: String| {
        Error::invalid(
            "share",
            problem,
            "give an absolute, normalized guest path such as /work (not /, no '.', '..', '//' or trailing '/')",
        )
    };
    let shown: String = p.chars().take(64).collect();
    if p.len() > MAX_SHARE_GUEST_PATH || p.contains('\0') {
        return Err(bad(format!(
            "guest path {shown:?}... is longer than {MAX_SHARE_GUEST_PATH} bytes or holds NUL"
        )));
    }
    if !p.starts_with('/') {
        return Err(bad(format!("guest path {shown:?} is not absolute")));
    }
    if p == "/" {
        return Err(bad("a share cannot be mounted over the guest's /".into()));
    }
    if p.ends_with('/')
        || p[1..]
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad(format!("guest path {shown:?} is not normalized")));
    }
    Ok(())
}

/// Checks a list of shares together: each one, at most [`MAX_SHARES`], and
/// no two at the same guest path or tag.
pub(crate) fn validate_all(shares: &mut [ShareSpec]) -> Result<()> {
    if shares.len() > MAX_SHARES {
        return Err(Error::invalid(
            "share",
            format!("{} shares asked for", shares.len()),
            format!("share at most {MAX_SHARES} directories (share a common parent instead)"),
        ));
    }
    for s in shares.iter_mut() {
        s.validate()?;
    }
    check_distinct(shares, None)
}

/// Refuses a share (`new`, or among `shares`) whose guest path or tag is already taken.
pub fn check_distinct(shares: &[ShareSpec], new: Option<&ShareSpec>) -> Result<()> {
    let all: Vec<&ShareSpec> = shares.iter().chain(new).collect();
    for (i, a) in all.iter().enumerate() {
        for b in &all[..i] {
            if a.guest == b.guest || a.tag() == b.tag() {
                return Err(Error::invalid(
                    "share",
                    format!("two shares at guest path {}", a.guest),
                    "give each share its own guest path (or remove the old one first: `capsa share rm`)",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_forms() {
        let s = ShareSpec::parse_cli("/a/b:/work:ro").unwrap();
        assert_eq!(s.host, PathBuf::from("/a/b"));
        assert_eq!(s.guest, "/work");
        assert!(s.read_only());
        let s = ShareSpec::parse_cli("/a:/w").unwrap();
        assert_eq!(s.mode, ShareMode::ReadWrite);
        let s = ShareSpec::parse_cli("rel:/w:rw").unwrap();
        assert!(s.host.is_absolute());
        assert!(ShareSpec::parse_cli("/only").is_err());
        assert!(ShareSpec::parse_cli(":/w").is_err());
    }

    #[test]
    fn guest_paths() {
        for ok in ["/work", "/a/b-c/d.e"] {
            check_guest_path(ok).unwrap();
        }
        for bad in [
            "", "work", "/", "/a/", "/a//b", "/a/./b", "/a/../b", "/..", "/a\0",
        ] {
            let e = check_guest_path(bad).unwrap_err();
            assert!(e.to_string().contains("Fix:"), "{bad:?}: {e}");
        }
        check_guest_path(&format!("/{}", "a".repeat(MAX_SHARE_GUEST_PATH))).unwrap_err();
    }

    #[test]
    fn tags() {
        let s = ShareSpec::new("/x", "/work", ShareMode::ReadWrite);
        let t = s.tag();
        assert!(t.len() <= MAX_SHARE_TAG && t.starts_with("capsa-"), "{t}");
        assert_ne!(
            t,
            ShareSpec::new("/x", "/work2", ShareMode::ReadWrite).tag()
        );
        let mut long = s.clone();
        long.tag = Some("x".repeat(MAX_SHARE_TAG + 1));
        assert!(long.check_shape().is_err());
        long.tag = Some("a,b".into());
        assert!(long.check_shape().is_err());
    }

    #[test]
    fn host_must_be_a_directory() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        let mut s = ShareSpec::new(&f, "/w", ShareMode::ReadOnly);
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("not a directory") && e.contains("Fix:"), "{e}");
        let mut s = ShareSpec::new(t.path().join("missing"), "/w", ShareMode::ReadOnly);
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("missing") && e.contains("Fix:"), "{e}");
        let link = t.path().join("link");
        std::os::unix::fs::symlink(t.path(), &link).unwrap();
        let mut s = ShareSpec::new(&link, "/w", ShareMode::ReadOnly);
        s.validate().unwrap();
        assert_eq!(s.host, std::fs::canonicalize(t.path()).unwrap());
    }

    #[test]
    fn distinct_and_bounded() {
        let t = tempfile::tempdir().unwrap();
        let mut two = vec![
            ShareSpec::new(t.path(), "/w", ShareMode::ReadOnly),
            ShareSpec::new(t.path(), "/w", ShareMode::ReadWrite),
        ];
        assert!(validate_all(&mut two).is_err());
        let mut many: Vec<_> = (0..=MAX_SHARES)
            .map(|i| ShareSpec::new(t.path(), format!("/w{i}"), ShareMode::ReadOnly))
            .collect();
        assert!(validate_all(&mut many).is_err());
        many.pop();
        validate_all(&mut many).unwrap();
    }
}
