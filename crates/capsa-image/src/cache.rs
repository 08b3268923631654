//! Cache directory layout, locks and hashing helpers.
//!
//! ```text
//! <cache>/bundles/<id>/{bundle.json, vmlinux|bzImage, initrd.img}
//! <cache>/bundles/.<id>.lock            serializes builders of one id
//! <cache>/kernels/<package>_<version>/  fetched Debian kernels (+ .lock)
//! <cache>/vmlinux/<kernel sha256>.elf   extracted kernels, hard-linked into bundles
//! <cache>/hashes/<key>                  file hash memo keyed by (path, size, mtime, ino)
//! ```
//! Everything is written to a temporary name in the same directory and
//! renamed into place, so readers never see half-written files.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::ImageError;

/// The default cache directory: `$XDG_CACHE_HOME/capsa`, else `~/.cache/capsa`.
pub fn default_cache_dir() -> Result<PathBuf, ImageError> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from) {
        // The XDG spec says relative values are invalid and must be ignored.
        if x.is_absolute() {
            return Ok(x.join("capsa"));
        }
    }
    match std::env::var_os("HOME").map(PathBuf::from) {
        Some(h) if h.is_absolute() => Ok(h.join(".cache").join("capsa")),
        _ => Err(ImageError::NoCacheDir),
    }
}

/// The cache directory to use for an optional explicit choice.
pub(crate) fn cache_dir(explicit: Option<&Path>) -> Result<PathBuf, ImageError> {
    match explicit {
        Some(p) => Ok(p.to_path_buf()),
        None => default_cache_dir(),
    }
}

/// Creates a directory and its parents, as an [`ImageError::Cache`].
pub(crate) fn mkdirs(path: &Path) -> Result<(), ImageError> {
    fs::create_dir_all(path).map_err(|e| ImageError::cache(path, e))
}

/// An exclusive `flock` held until dropped (or until the process dies, so a
/// killed holder never wedges others). Works between threads too, because
/// each lock opens its own file description.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Blocks until the lock at `path` (created if missing) is ours.
    pub fn exclusive(path: &Path) -> Result<Self, ImageError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| ImageError::cache(path, e))?;
        loop {
            // SAFETY: flock on a valid, owned fd.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Self { _file: file });
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(ImageError::cache(path, err));
            }
        }
    }
}

/// Lowercase hex of bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// sha256 of bytes, as hex.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn sha256_reader(mut r: impl Read) -> io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(hex(&h.finalize()))
}

/// sha256 of a file, memoized in `<cache>/hashes` by (path, size, mtime,
/// ctime, inode, device) so that cached builds do not re-hash a 60 MB kernel.
pub(crate) fn file_sha256(cache: &Path, path: &Path) -> Result<String, io::Error> {
    let meta = fs::metadata(path)?;
    let stamp = format!(
        "{} {} {} {} {} {} {}",
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
        meta.ino(),
        meta.dev()
    );
    let abs = fs::canonicalize(path)?;
    let key = sha256_hex(abs.as_os_str().as_encoded_bytes());
    let memo = cache.join("hashes").join(&key[..32]);
    if let Ok(text) = fs::read_to_string(&memo) {
        if let Some((s, hash)) = text.trim_end().rsplit_once(' ') {
            if s == stamp && hash.len() == 64 {
                return Ok(hash.to_string());
            }
        }
    }
    let hash = sha256_reader(File::open(path)?)?;
    // A failed memo write only costs a re-hash next time.
    if let Err(e) = write_atomic(&memo, format!("{stamp} {hash}\n").as_bytes()) {
        tracing::debug!("cannot memoize hash of {}: {e}", path.display());
    }
    Ok(hash)
}

/// Writes a file via a temporary file in the same directory and a rename.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    // tempfile creates 0600; cache files are meant to be shared like any download.
    tmp.as_file()
        .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Hard-links `src` to `dst`, copying when linking is impossible (other file system).
pub(crate) fn link_or_copy(src: &Path, dst: &Path) -> io::Result<()> {
    match fs::hard_link(src, dst) {
        Ok(()) => Ok(()),
        Err(e) => {
            tracing::debug!(
                "hard link {} -> {} failed ({e}); copying",
                src.display(),
                dst.display()
            );
            fs::copy(src, dst).map(|_| ())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_memo_follows_changes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        fs::write(&f, b"one").unwrap();
        let h1 = file_sha256(dir.path(), &f).unwrap();
        assert_eq!(h1, sha256_hex(b"one"));
        assert_eq!(file_sha256(dir.path(), &f).unwrap(), h1);
        fs::write(&f, b"two!").unwrap();
        assert_eq!(file_sha256(dir.path(), &f).unwrap(), sha256_hex(b"two!"));
    }

    #[test]
    fn locks_exclude_each_other_across_threads() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("l");
        let counter = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (lock, counter) = (lock.clone(), counter.clone());
                std::thread::spawn(move || {
                    let _l = FileLock::exclusive(&lock).unwrap();
                    let inside = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    assert_eq!(inside, 0, "two holders at once");
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    counter.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn default_cache_dir_prefers_xdg() {
        // Only checks the shape; the environment is shared with other tests.
        if let Ok(d) = default_cache_dir() {
            assert!(d.ends_with("capsa"));
        }
    }
}
