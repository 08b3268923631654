//! Copying a guest tree out to the host, with the guest treated as hostile.
//!
//! A guest root can forge any agent answer, so every name, kind, mode, size
//! and time that arrives here is untrusted: names are checked as single path
//! components, every host file is created beneath the target directory
//! through a capability handle (`cap-std`: no `..`, absolute path or symlink
//! can lead outside it) with no-follow opens, modes lose their special bits,
//! times are clamped, and listings, depth and bytes are bounded.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cap_fs_ext::{FollowSymlinks, OpenOptionsFollowExt};
use cap_std::fs::{Dir, OpenOptions};
use capsa_proto::{DirEntry, FileKind, FileMeta};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{Error, Result};

/// The file operations a copy needs from a sandbox, whoever serves them:
/// the guest agent directly ([`crate::Sandbox`]) or a capsad over HTTP. The
/// tree walks here are written once, against this trait, so every face
/// copies the same way (recursive, bounded, safe against a hostile guest).
#[async_trait::async_trait]
pub trait GuestFs: Send + Sync {
    /// Metadata of `path`, not following a final symlink.
    async fn stat(&self, path: &str) -> Result<FileMeta>;
    /// One page of `path`'s entries after the name `after`, and whether more follow.
    async fn list_page(&self, path: &str, after: Option<&str>) -> Result<(Vec<DirEntry>, bool)>;
    /// Streams the file into `w` and returns its metadata as announced
    /// when it was opened.
    async fn read_file(
        &self,
        path: &str,
        w: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> Result<FileMeta>;
    /// Creates the directory `path` and its parents; `mode` for the last.
    async fn mkdir(&self, path: &str, mode: u32) -> Result<()>;
    /// Streams `r` into `path` (parents created) with `mode` and `mtime`.
    async fn write_file(
        &self,
        path: &str,
        r: &mut (dyn AsyncRead + Unpin + Send),
        mode: u32,
        mtime: Option<SystemTime>,
    ) -> Result<()>;
}

/// [`GuestFs`] straight to a guest agent, each call bounded by `timeout`.
#[derive(Debug, Clone)]
pub struct AgentFs {
    /// The agent.
    pub client: capsa_agent_client::AgentClient,
    /// Deadline of each call.
    pub timeout: Duration,
}

#[async_trait::async_trait]
impl GuestFs for AgentFs {
    async fn stat(&self, path: &str) -> Result<FileMeta> {
        Ok(self.client.stat(path, self.timeout).await?)
    }

    async fn list_page(&self, path: &str, after: Option<&str>) -> Result<(Vec<DirEntry>, bool)> {
        Ok(self.client.list_dir_page(path, after, self.timeout).await?)
    }

    async fn read_file(
        &self,
        path: &str,
        w: &mut (dyn AsyncWrite + Unpin + Send),
    ) -> Result<FileMeta> {
        Ok(self.client.read_file(path, w, self.timeout).await?)
    }

    async fn mkdir(&self, path: &str, mode: u32) -> Result<()> {
        self.client.mkdir(path, true, mode, self.timeout).await?;
        Ok(())
    }

    async fn write_file(
        &self,
        path: &str,
        r: &mut (dyn AsyncRead + Unpin + Send),
        mode: u32,
        mtime: Option<SystemTime>,
    ) -> Result<()> {
        let req = capsa_proto::WriteFileRequest {
            path: path.to_string(),
            mode,
            mtime: mtime.map(crate::sandbox::to_epoch),
            create_parents: true,
        };
        self.client.write_file(req, r, self.timeout).await?;
        Ok(())
    }
}

/// Bounds and choices for [`copy_out`].
#[derive(Debug, Clone)]
pub struct CopyOutOptions {
    /// Keep setuid, setgid and sticky bits from the guest (off: modes are
    /// masked to `0o777`, so a guest cannot plant a setuid file on the host).
    pub keep_special_bits: bool,
    /// The most entries (files, directories, skipped links) in the whole tree.
    pub max_entries: usize,
    /// The deepest directory nesting below the top.
    pub max_depth: usize,
    /// The most file bytes written in all; `None` for no bound.
    pub max_bytes: Option<u64>,
}

impl Default for CopyOutOptions {
    fn default() -> Self {
        Self {
            keep_special_bits: false,
            max_entries: 1_000_000,
            max_depth: 256,
            max_bytes: None,
        }
    }
}

/// The latest modification time accepted from the guest (9999-12-31);
/// later ones are clamped, like times before the epoch.
const MAX_MTIME_SECS: i64 = 253_402_300_799;

/// Copies the host file or directory `host` (recursively) to the guest path
/// `guest`, keeping modes and modification times. The host side is the
/// caller's own; symlinks and special files inside a tree are skipped.
pub async fn copy_in(fs: &dyn GuestFs, host: &Path, guest: &str) -> Result<()> {
    let meta = std::fs::symlink_metadata(host)
        .map_err(|e| Error::io(format!("reading {}", host.display()), e))?;
    if !meta.is_dir() {
        return copy_file_in(fs, host, guest).await;
    }
    // An explicit stack: no recursion depth tied to the tree.
    let mut stack = vec![(host.to_path_buf(), guest.trim_end_matches('/').to_string())];
    while let Some((h, g)) = stack.pop() {
        let m =
            std::fs::metadata(&h).map_err(|e| Error::io(format!("reading {}", h.display()), e))?;
        use std::os::unix::fs::PermissionsExt;
        fs.mkdir(
            if g.is_empty() { "/" } else { &g },
            m.permissions().mode() & 0o7777,
        )
        .await?;
        let rd =
            std::fs::read_dir(&h).map_err(|e| Error::io(format!("listing {}", h.display()), e))?;
        for entry in rd {
            let entry = entry.map_err(|e| Error::io(format!("listing {}", h.display()), e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let (hp, gp) = (entry.path(), format!("{g}/{name}"));
            let ft = entry
                .file_type()
                .map_err(|e| Error::io(format!("reading {}", hp.display()), e))?;
            if ft.is_dir() {
                stack.push((hp, gp));
            } else if ft.is_file() {
                copy_file_in(fs, &hp, &gp).await?;
            } else {
                tracing::warn!(path = %hp.display(), "skipping a symlink or special file");
            }
        }
    }
    Ok(())
}

async fn copy_file_in(fs: &dyn GuestFs, host: &Path, guest: &str) -> Result<()> {
    let meta = std::fs::symlink_metadata(host)
        .map_err(|e| Error::io(format!("reading {}", host.display()), e))?;
    if !meta.is_file() {
        return Err(Error::InvalidArgument(format!(
            "{} is not a regular file or directory (symlinks and devices are not copied)",
            host.display()
        )));
    }
    use std::os::unix::fs::PermissionsExt;
    let mut f = tokio::fs::File::open(host)
        .await
        .map_err(|e| Error::io(format!("opening {}", host.display()), e))?;
    fs.write_file(
        guest,
        &mut f,
        meta.permissions().mode() & 0o7777,
        meta.modified().ok(),
    )
    .await
}

/// Copies the guest file or directory `guest` (recursively) to `host`,
/// keeping modes (masked) and modification times (clamped).
///
/// `host` is the caller's own path and is used as given; everything below
/// it is named by the guest and created strictly inside it. Guest symlinks
/// and special files inside a tree are skipped with a warning.
pub async fn copy_out(
    fs: &dyn GuestFs,
    guest: &str,
    host: &Path,
    opts: &CopyOutOptions,
) -> Result<()> {
    let top = guest.trim_end_matches('/');
    let top = if top.is_empty() { "/" } else { top };
    let meta = fs.stat(top).await?;
    let mut budget = Budget::new(opts);
    match meta.kind {
        FileKind::File => {
            let f = std::fs::File::create(host)
                .map_err(|e| Error::io(format!("creating {}", host.display()), e))?;
            read_into(fs, top, f, &mut budget, opts).await
        }
        FileKind::Dir => {
            std::fs::create_dir_all(host)
                .map_err(|e| Error::io(format!("creating {}", host.display()), e))?;
            let root = Dir::open_ambient_dir(host, cap_std::ambient_authority())
                .map_err(|e| Error::io(format!("opening {}", host.display()), e))?;
            copy_tree(fs, top, &root, meta, &mut budget, opts)
                .await
                .map_err(|e| e.under(host))
        }
        _ => Err(Error::InvalidArgument(format!(
            "{top} is not a regular file or directory"
        ))),
    }
}

/// What is left of the bounds.
struct Budget {
    entries: usize,
    bytes: Option<u64>,
}

impl Budget {
    fn new(opts: &CopyOutOptions) -> Self {
        Self {
            entries: opts.max_entries,
            bytes: opts.max_bytes,
        }
    }

    fn take_entry(&mut self, opts: &CopyOutOptions) -> Result<()> {
        self.entries = self.entries.checked_sub(1).ok_or_else(|| {
            Error::GuestInput(format!(
                "the guest tree has more than {} entries; copy a smaller tree or raise \
                 CopyOutOptions::max_entries",
                opts.max_entries
            ))
        })?;
        Ok(())
    }
}

/// A walk error, with the host target added to I/O messages.
trait Under {
    fn under(self, host: &Path) -> Error;
}

impl Under for Error {
    fn under(self, host: &Path) -> Error {
        match self {
            Error::Io { context, source } => Error::Io {
                context: format!("{context} (below {})", host.display()),
                source,
            },
            e => e,
        }
    }
}

/// Pages through the listing of `g`, each page handed to `each`, with the
/// cursor required to move forward (a hostile listing repeating one page
/// forever is refused; the entry budget bounds the rest).
async fn for_each_page(
    fs: &dyn GuestFs,
    g: &str,
    mut each: impl FnMut(Vec<DirEntry>) -> Result<()>,
) -> Result<()> {
    let mut after: Option<String> = None;
    loop {
        let (entries, more) = fs.list_page(g, after.as_deref()).await?;
        let next = entries.last().map(|e| e.name.clone());
        each(entries)?;
        if !more {
            return Ok(());
        }
        match next {
            Some(n) if after.as_deref().is_none_or(|a| n.as_str() > a) => after = Some(n),
            _ => {
                return Err(Error::GuestInput(format!(
                    "the listing of {g} does not advance; nothing more is read from it"
                )))
            }
        }
    }
}

async fn copy_tree(
    fs: &dyn GuestFs,
    top: &str,
    root: &Dir,
    top_meta: FileMeta,
    budget: &mut Budget,
    opts: &CopyOutOptions,
) -> Result<()> {
    // Directories' own modes and times are applied last, deepest first, so a
    // read-only directory from the guest does not stop its own filling and
    // writing children does not undo its mtime.
    let mut dirs: Vec<(PathBuf, FileMeta)> = vec![(PathBuf::new(), top_meta)];
    let mut stack: Vec<(String, PathBuf, usize)> = vec![(top.to_string(), PathBuf::new(), 0)];
    while let Some((g, rel, depth)) = stack.pop() {
        let dir = open_rel(root, &rel)?;
        // Entries are checked page by page; files are read once the page is
        // accepted (the listing callback cannot await).
        let mut files: Vec<(String, PathBuf, String)> = Vec::new();
        for_each_page(fs, &g, |entries| {
            for e in entries {
                budget.take_entry(opts)?;
                check_name(&e.name)?;
                let gp = if g == "/" {
                    format!("/{}", e.name)
                } else {
                    format!("{g}/{}", e.name)
                };
                let rp = rel.join(&e.name);
                match e.meta.kind {
                    FileKind::Dir => {
                        if depth + 1 > opts.max_depth {
                            return Err(Error::GuestInput(format!(
                                "{gp} is nested more than {} levels deep; raise \
                                 CopyOutOptions::max_depth to copy it",
                                opts.max_depth
                            )));
                        }
                        match dir.create_dir(&e.name) {
                            Ok(()) => {}
                            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
                            Err(err) => {
                                return Err(Error::io(format!("creating {}", rp.display()), err))
                            }
                        }
                        dirs.push((rp.clone(), e.meta));
                        stack.push((gp, rp, depth + 1));
                    }
                    FileKind::File => files.push((gp, rp, e.name)),
                    _ => tracing::warn!(path = %gp, "skipping a guest symlink or special file"),
                }
            }
            Ok(())
        })
        .await?;
        for (gp, rp, name) in files {
            let mut oo = OpenOptions::new();
            oo.write(true).create(true).truncate(true);
            // A symlink already at this name (the host's own, or one raced
            // in) is refused rather than followed.
            oo.follow(FollowSymlinks::No);
            let f = dir
                .open_with(&name, &oo)
                .map_err(|err| Error::io(format!("creating {}", rp.display()), err))?;
            read_into(fs, &gp, f.into_std(), budget, opts).await?;
        }
    }
    for (rel, meta) in dirs.iter().rev() {
        // A read-only descriptor of the directory itself (cap-std's `Dir`
        // handles are path-only and take no fchmod or futimens).
        let mut oo = OpenOptions::new();
        oo.read(true).follow(FollowSymlinks::No);
        let name = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel.as_path()
        };
        let f = root
            .open_with(name, &oo)
            .map_err(|e| Error::io(format!("opening {}", rel.display()), e))?
            .into_std();
        apply_meta(&f, meta, opts)
            .map_err(|e| Error::io(format!("setting {}", rel.display()), e))?;
    }
    Ok(())
}

fn open_rel(root: &Dir, rel: &Path) -> Result<Dir> {
    if rel.as_os_str().is_empty() {
        return root
            .try_clone()
            .map_err(|e| Error::io("duplicating the target directory handle", e));
    }
    // Every component was checked; cap-std refuses any resolution that leaves
    // `root`, so a host symlink in the tree cannot lead outside either.
    root.open_dir(rel)
        .map_err(|e| Error::io(format!("opening {}", rel.display()), e))
}

/// Streams the guest file `g` into `f` within the byte budget, then applies
/// its (masked, clamped) mode and mtime.
async fn read_into(
    fs: &dyn GuestFs,
    g: &str,
    f: std::fs::File,
    budget: &mut Budget,
    opts: &CopyOutOptions,
) -> Result<()> {
    let std_f = f
        .try_clone()
        .map_err(|e| Error::io(format!("duplicating the file handle for {g}"), e))?;
    let mut w = Limited {
        inner: tokio::io::BufWriter::new(tokio::fs::File::from_std(f)),
        left: budget.bytes,
        written: 0,
    };
    let read = fs.read_file(g, &mut w).await;
    let meta = match read {
        // Whoever serves the file, never more than it announced.
        Ok(m) if w.written > m.size => {
            return Err(Error::GuestInput(format!(
                "{g}: {} bytes arrived for a file of {} bytes",
                w.written, m.size
            )))
        }
        Ok(m) => m,
        Err(_) if w.left == Some(0) => {
            return Err(Error::GuestInput(format!(
                "copying {g} exceeded the byte limit of the copy ({} bytes); raise \
                 CopyOutOptions::max_bytes",
                opts.max_bytes.unwrap_or(0)
            )))
        }
        Err(e) => return Err(e),
    };
    if let Some(b) = budget.bytes.as_mut() {
        *b = b.saturating_sub(w.written);
    }
    apply_meta(&std_f, &meta, opts).map_err(|e| Error::io(format!("setting the mode of {g}"), e))
}

/// Mode (masked) and mtime (clamped) from guest metadata onto an open file.
fn apply_meta(f: &std::fs::File, meta: &FileMeta, opts: &CopyOutOptions) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mask = if opts.keep_special_bits {
        0o7777
    } else {
        0o777
    };
    f.set_permissions(std::fs::Permissions::from_mode(meta.mode & mask))?;
    f.set_modified(clamp_mtime(meta.mtime))
}

/// A guest (seconds, nanoseconds) time as a host time in [epoch, 9999].
pub(crate) fn clamp_mtime((s, ns): (i64, u32)) -> SystemTime {
    let s = s.clamp(0, MAX_MTIME_SECS) as u64;
    let ns = if ns < 1_000_000_000 { ns } else { 0 };
    UNIX_EPOCH + Duration::new(s, ns)
}

/// A name from a guest listing must be one real path component.
pub(crate) fn check_name(name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name == "."
        || name == ".."
        || name.len() > 255
        || name.bytes().any(|b| b == b'/' || b == 0);
    if bad {
        return Err(Error::GuestInput(format!(
            "the guest listed an entry named {:?}, which is not a single file name; \
             nothing was written for it",
            name.chars().take(300).collect::<String>()
        )));
    }
    Ok(())
}

/// An `AsyncWrite` that refuses to go past a byte budget.
struct Limited<W> {
    inner: W,
    left: Option<u64>,
    written: u64,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Limited<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let me = &mut *self;
        let n = match me.left {
            Some(0) if !buf.is_empty() => {
                return std::task::Poll::Ready(Err(std::io::Error::other(
                    "the copy's byte limit is reached",
                )))
            }
            Some(left) => buf.len().min(left.min(usize::MAX as u64) as usize),
            None => buf.len(),
        };
        let r = std::pin::Pin::new(&mut me.inner).poll_write(cx, &buf[..n]);
        if let std::task::Poll::Ready(Ok(k)) = &r {
            me.written += *k as u64;
            if let Some(l) = me.left.as_mut() {
                *l -= *k as u64;
            }
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_one_component() {
        for bad in ["", ".", "..", "a/b", "/etc", "x\0y", &"n".repeat(256)] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["a", ".hidden", "..x", "with space", &"n".repeat(255)] {
            assert!(check_name(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn times_are_clamped() {
        assert_eq!(
            clamp_mtime((i64::MAX, 0)),
            UNIX_EPOCH + Duration::from_secs(MAX_MTIME_SECS as u64)
        );
        assert_eq!(clamp_mtime((i64::MIN, 5)), UNIX_EPOCH + Duration::new(0, 5));
        assert_eq!(
            clamp_mtime((10, u32::MAX)),
            UNIX_EPOCH + Duration::from_secs(10)
        );
    }
}
