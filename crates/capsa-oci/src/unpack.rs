//! Applying hostile layer tars, in order, into a staging directory.
//!
//! Every path is resolved with `openat2(RESOLVE_IN_ROOT)` from a directory fd of the staging root,
//! so `..`, absolute symlinks and symlinked parent directories resolve *inside* the root like in a
//! chroot, and the final component is always created with a no-follow `*at` call. Nothing is
//! written outside the staging directory, whatever the tar says.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps};
use tar::EntryType;

use crate::error::OciError;
use crate::spec::Compression;

/// Bounds on what a set of layers may unpack to; the defaults suit large real images.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Total uncompressed tar bytes over all layers (headers included): bounds decompression bombs.
    pub max_unpacked_bytes: u64,
    /// Total tar entries over all layers.
    pub max_entries: u64,
    /// Bytes of headers and extension records (PAX, GNU long names) before one entry.
    pub max_header_bytes: u64,
    /// Length of one path, in bytes, after PAX/GNU long names.
    pub max_path_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_unpacked_bytes: 16 << 30,
            max_entries: 2_000_000,
            max_header_bytes: 1 << 20,
            max_path_bytes: 4096,
        }
    }
}

/// Something in a layer that was deliberately not unpacked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The path as written in the tar (lossy UTF-8).
    pub path: String,
    /// Why.
    pub reason: String,
}

/// What unpacking did.
#[derive(Debug, Clone, Default)]
pub struct StageReport {
    /// Tar entries read.
    pub entries: u64,
    /// Uncompressed tar bytes read.
    pub bytes: u64,
    /// Entries left out (device nodes, `..` paths, broken hardlinks, ...), each also logged as a warning.
    pub skipped: Vec<Skipped>,
    /// Whether uid/gid from the tars were applied (needs root / CAP_CHOWN); when false every file is
    /// owned by the host user and the converters map it to root.
    pub ownership_preserved: bool,
}

/// Why a tar path was refused by [`sanitize_path`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathRefusal {
    /// A `..` component.
    DotDot,
    /// A NUL byte.
    Nul,
    /// Longer than the limit.
    TooLong,
}

/// Turns a tar path into components relative to the image root: leading `/` and `.` components
/// are dropped (absolute paths are relative to the image root); `..` and NUL are refused.
/// An empty result means the root itself.
pub fn sanitize_path(raw: &[u8], max_len: usize) -> Result<Vec<OsString>, PathRefusal> {
    if raw.len() > max_len {
        return Err(PathRefusal::TooLong);
    }
    if raw.contains(&0) {
        return Err(PathRefusal::Nul);
    }
    let mut out = Vec::new();
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err(PathRefusal::DotDot),
            c => out.push(OsString::from_vec(c.to_vec())),
        }
    }
    Ok(out)
}

fn join(comps: &[OsString]) -> PathBuf {
    let mut p = PathBuf::new();
    for c in comps {
        p.push(c);
    }
    p
}

const CHUNK: usize = 256 << 10;
const CHUNKS: usize = 8;

/// Reads `src` to the end in chunks into `tx`; stops when the receiver is gone.
fn pump(mut src: Box<dyn Read + Send + '_>, tx: std::sync::mpsc::SyncSender<io::Result<Vec<u8>>>) {
    loop {
        let mut buf = vec![0u8; CHUNK];
        let mut n = 0;
        // Fill the chunk (decoders return small reads).
        let res = loop {
            match src.read(&mut buf[n..]) {
                Ok(0) => break Ok(()),
                Ok(k) => {
                    n += k;
                    if n == buf.len() {
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        buf.truncate(n);
        let done = n == 0 || res.is_err();
        if n > 0 && tx.send(Ok(buf)).is_err() {
            return;
        }
        if let Err(e) = res {
            let _ = tx.send(Err(e));
            return;
        }
        if done {
            return;
        }
    }
}

/// The reading end of [`pump`].
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(Ok(b)) => {
                    self.buf = b;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0), // Sender done: end of stream.
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Counts uncompressed bytes for the total and per-header bounds.
struct Counter {
    total: Cell<u64>,
    window: Cell<u64>,
    /// Set while the tar crate reads headers and extension records (which it buffers whole), so a
    /// huge PAX/GNU long-name record is cut off while being read, not after.
    window_limit: Cell<Option<u64>>,
}

struct CountingReader<R> {
    inner: R,
    counter: Rc<Counter>,
    max_total: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let total = self.counter.total.get() + n as u64;
        self.counter.total.set(total);
        self.counter
            .window
            .set(self.counter.window.get() + n as u64);
        if total > self.max_total {
            return Err(io::Error::other(LimitHit));
        }
        if let Some(limit) = self.counter.window_limit.get() {
            if self.counter.window.get() > limit {
                return Err(io::Error::other(HeaderLimitHit));
            }
        }
        Ok(n)
    }
}

/// Marker error: the header bound was hit inside the reader.
#[derive(Debug)]
struct HeaderLimitHit;
impl std::fmt::Display for HeaderLimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("tar header size limit reached")
    }
}
impl std::error::Error for HeaderLimitHit {}

/// Marker error: the byte limit was hit inside the reader.
#[derive(Debug)]
struct LimitHit;
impl std::fmt::Display for LimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("unpacked size limit reached")
    }
}
impl std::error::Error for LimitHit {}

fn is_limit_hit(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<LimitHit>())
}

/// Applies layers in order into a staging directory.
pub struct Stager {
    root: PathBuf,
    root_fd: OwnedFd,
    limits: Limits,
    report: StageReport,
    /// Tar mtimes of directories, applied after the last layer (children change them meanwhile).
    dir_mtimes: HashMap<PathBuf, i64>,
    is_root: bool,
}

const RESOLVE: ResolveFlags = ResolveFlags::IN_ROOT
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

impl Stager {
    /// Gives the entry `name` in `parent` the tar's owner (not following a
    /// final symlink); only root can, so unprivileged staging keeps ours.
    fn chown_entry(
        &self,
        parent: &OwnedFd,
        name: &OsStr,
        uid: u64,
        gid: u64,
    ) -> Result<(), EntryError> {
        if self.is_root {
            rustix::fs::chownat(
                parent,
                name,
                Some(rustix::fs::Uid::from_raw(uid as u32)),
                Some(rustix::fs::Gid::from_raw(gid as u32)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| EntryError::Fatal(e.into()))?;
        }
        Ok(())
    }

    /// Starts unpacking into `root`, which must exist and should be empty.
    pub fn new(root: &Path, limits: Limits) -> Result<Self, OciError> {
        let root_fd = rustix::fs::open(
            root,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        )
        .map_err(|e| OciError::io("opening staging directory", root, e.into()))?;
        // Probe openat2 once so an old kernel gets a clear error rather than odd failures.
        match rustix::fs::openat2(
            &root_fd,
            ".",
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE,
        ) {
            Ok(_) => {}
            Err(rustix::io::Errno::NOSYS) => return Err(OciError::NoOpenat2),
            Err(e) => return Err(OciError::io("probing openat2 in", root, e.into())),
        }
        let is_root = rustix::process::geteuid().is_root();
        Ok(Stager {
            root: root.to_path_buf(),
            root_fd,
            limits,
            report: StageReport {
                ownership_preserved: is_root,
                ..StageReport::default()
            },
            dir_mtimes: HashMap::new(),
            is_root,
        })
    }

    /// Applies one layer blob (compressed as stated) on top of what is already staged.
    /// `name` (the layer digest) is used in messages.
    pub fn apply_layer<R: Read + Send>(
        &mut self,
        blob: R,
        compression: Compression,
        name: &str,
    ) -> Result<(), OciError> {
        let bad = |source: io::Error| OciError::BadLayer {
            layer: name.to_string(),
            compression: compression.name(),
            source,
        };
        let decoded: Box<dyn Read + Send> = match compression {
            Compression::None => Box::new(blob),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(blob)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(blob).map_err(bad)?),
        };
        // Reading, hashing and decompressing run on a second thread, overlapping with the writes.
        // The channel is bounded, so it runs at most CHUNKS * CHUNK bytes ahead.
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(CHUNKS);
            scope.spawn(move || pump(decoded, tx));
            self.apply_decoded(
                ChannelReader {
                    rx,
                    buf: Vec::new(),
                    pos: 0,
                },
                name,
                &bad,
            )
        })
    }

    fn apply_decoded(
        &mut self,
        decoded: ChannelReader,
        name: &str,
        bad: &dyn Fn(io::Error) -> OciError,
    ) -> Result<(), OciError> {
        let counter = Rc::new(Counter {
            total: Cell::new(self.report.bytes),
            window: Cell::new(0),
            window_limit: Cell::new(None),
        });
        let reader = CountingReader {
            inner: decoded,
            counter: counter.clone(),
            max_total: self.limits.max_unpacked_bytes,
        };
        let mut archive = tar::Archive::new(reader);
        let mut touched: HashSet<PathBuf> = HashSet::new();
        let limit_err = |limits: &Limits| OciError::LimitExceeded {
            what: "the unpacked image",
            limit: limits.max_unpacked_bytes,
            field: "max_unpacked_bytes",
            context: format!("layer {name}"),
        };
        let mut entries = archive.entries().map_err(bad)?;
        loop {
            counter.window.set(0);
            // Headers, records and block padding; +1024 for the end-of-archive blocks.
            counter
                .window_limit
                .set(Some(self.limits.max_header_bytes.saturating_add(1024)));
            let next = entries.next();
            counter.window_limit.set(None);
            let header_err = || OciError::LimitExceeded {
                what: "a tar header with its PAX/GNU extension records",
                limit: self.limits.max_header_bytes,
                field: "max_header_bytes",
                context: format!("layer {name}"),
            };
            if counter.window.get() > self.limits.max_header_bytes.saturating_add(1024) {
                return Err(header_err());
            }
            if let Some(Err(e)) = &next {
                if e.get_ref().is_some_and(|i| i.is::<HeaderLimitHit>()) {
                    return Err(header_err());
                }
            }
            let mut entry = match next {
                None => break,
                Some(Ok(e)) => e,
                Some(Err(e)) if is_limit_hit(&e) => return Err(limit_err(&self.limits)),
                Some(Err(e)) => return Err(bad(e)),
            };
            self.report.entries += 1;
            if self.report.entries > self.limits.max_entries {
                return Err(OciError::LimitExceeded {
                    what: "the number of tar entries",
                    limit: self.limits.max_entries,
                    field: "max_entries",
                    context: format!("layer {name}"),
                });
            }
            match self.apply_entry(&mut entry, &mut touched) {
                Ok(()) => {}
                Err(EntryError::Fatal(e)) if is_limit_hit(&e) => {
                    return Err(limit_err(&self.limits))
                }
                Err(EntryError::Fatal(e)) => return Err(bad(e)),
                Err(EntryError::Skip(path, reason)) => {
                    tracing::warn!(layer = name, path = %path, "skipped layer entry: {reason}");
                    self.report.skipped.push(Skipped { path, reason });
                }
            }
            // Drain unread data here so that only headers count against the header bound.
            if let Err(e) = io::copy(&mut entry, &mut io::sink()) {
                if is_limit_hit(&e) {
                    return Err(limit_err(&self.limits));
                }
                return Err(bad(e));
            }
        }
        // Read to the end of the compressed stream so trailing garbage is bounded too.
        let mut rest = archive.into_inner();
        if let Err(e) = io::copy(&mut rest, &mut io::sink()) {
            if is_limit_hit(&e) {
                return Err(limit_err(&self.limits));
            }
            return Err(bad(e));
        }
        self.report.bytes = counter.total.get();
        Ok(())
    }

    /// Finishes: sets directory mtimes (deterministically) and returns the report.
    pub fn finish(mut self) -> Result<StageReport, OciError> {
        let root_fd = self
            .root_fd
            .try_clone()
            .map_err(|e| OciError::io("dup", &self.root, e))?;
        fix_dir_times(root_fd.as_fd(), Path::new(""), &self.dir_mtimes, 0)
            .map_err(|e| OciError::io("setting directory times in", &self.root, e))?;
        self.report.skipped.shrink_to_fit();
        Ok(self.report)
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        touched: &mut HashSet<PathBuf>,
    ) -> Result<(), EntryError> {
        let raw_path = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        let skip = |reason: String| Err(EntryError::Skip(shown.clone(), reason));
        let comps = match sanitize_path(&raw_path, self.limits.max_path_bytes) {
            Ok(c) => c,
            Err(PathRefusal::DotDot) => return skip("path has a `..` component".into()),
            Err(PathRefusal::Nul) => return skip("path has a NUL byte".into()),
            Err(PathRefusal::TooLong) => {
                return skip(format!(
                    "path longer than {} bytes",
                    self.limits.max_path_bytes
                ))
            }
        };
        let header = entry.header();
        let kind = header.entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            return Ok(());
        }
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let uid = header.uid().unwrap_or(0);
        let gid = header.gid().unwrap_or(0);
        let mtime = header.mtime().unwrap_or(0).min(i64::MAX as u64) as i64;

        let Some((name, parent_comps)) = comps.split_last() else {
            // The root directory itself.
            if kind == EntryType::Directory {
                let fd = self.root_fd.try_clone().map_err(EntryError::Fatal)?;
                self.set_meta(fd.as_fd(), uid, gid, mode, true)?;
                self.dir_mtimes.insert(PathBuf::new(), mtime);
            }
            return Ok(());
        };
        let rel = join(&comps);
        let parent_rel = join(parent_comps);

        // Whiteouts.
        let name_bytes = name.as_bytes();
        if let Some(hidden) = name_bytes.strip_prefix(b".wh.") {
            let parent = match self.open_dir(&parent_rel, false) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(()), // Nothing to hide.
                Err(e) => return skip(format!("whiteout parent unusable: {e}")),
            };
            if hidden == b".wh..opq" {
                clear_untouched(parent.as_fd(), &parent_rel, touched, 0)
                    .map_err(EntryError::Fatal)?;
            } else if hidden.starts_with(b".wh.") {
                // Other aufs metadata (.wh..wh.plnk, ...): not part of the image.
            } else if matches!(hidden, b"" | b"." | b"..") {
                // `.wh..` would name the parent's parent: outside the root at the top.
                return skip("whiteout of `.`, `..` or nothing".into());
            } else {
                let target = parent_rel.join(OsStr::from_bytes(hidden));
                // A whiteout hides lower layers only, never what this same layer added.
                if !touched.contains(&target) {
                    remove_all_at(parent.as_fd(), OsStr::from_bytes(hidden), 0)
                        .map_err(EntryError::Fatal)?;
                }
            }
            return Ok(());
        }

        let is_dir = kind == EntryType::Directory;
        let creatable = matches!(
            kind,
            EntryType::Regular
                | EntryType::Continuous
                | EntryType::GNUSparse
                | EntryType::Directory
                | EntryType::Symlink
                | EntryType::Link
                | EntryType::Fifo
        );
        if !creatable {
            let reason = match kind {
                EntryType::Char | EntryType::Block => {
                    "device node (a guest gets its devices from devtmpfs)".to_string()
                }
                other => format!("unsupported tar entry type {other:?}"),
            };
            return skip(reason);
        }

        let parent = match self.open_dir(&parent_rel, true) {
            Ok(Some(p)) => p,
            Ok(None) => return skip("parent directory cannot be created".into()),
            Err(e) => return skip(format!("parent directory unusable: {e}")),
        };
        // Record the path and its ancestors so an opaque marker or whiteout later in this same
        // layer does not remove them.
        let mut p = rel.clone();
        while touched.insert(p.clone()) {
            if !p.pop() || p.as_os_str().is_empty() {
                break;
            }
        }

        // Replace whatever is there, except a directory over a directory (merge).
        match rustix::fs::statat(&parent, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => {
                let existing_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
                if !(is_dir && existing_dir) {
                    remove_all_at(parent.as_fd(), name, 0).map_err(EntryError::Fatal)?;
                }
            }
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(EntryError::Fatal(e.into())),
        }

        let xattrs = collect_xattrs(entry);
        match kind {
            EntryType::Directory => {
                match rustix::fs::mkdirat(&parent, name.as_os_str(), Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(EntryError::Fatal(e.into())),
                }
                let fd = rustix::fs::openat(
                    &parent,
                    name.as_os_str(),
                    OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| EntryError::Fatal(e.into()))?;
                self.set_meta(fd.as_fd(), uid, gid, mode, true)?;
                self.set_xattrs(fd.as_fd(), &xattrs, &shown);
                self.dir_mtimes.insert(rel, mtime);
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let fd = rustix::fs::openat(
                    &parent,
                    name.as_os_str(),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| EntryError::Fatal(e.into()))?;
                let mut file = std::fs::File::from(fd);
                io::copy(entry, &mut file).map_err(EntryError::Fatal)?;
                let fd = OwnedFd::from(file);
                self.set_meta(fd.as_fd(), uid, gid, mode, false)?;
                self.set_xattrs(fd.as_fd(), &xattrs, &shown);
                let ts = Timespec {
                    tv_sec: mtime,
                    tv_nsec: 0,
                };
                rustix::fs::futimens(
                    &fd,
                    &Timestamps {
                        last_access: ts,
                        last_modification: ts,
                    },
                )
                .map_err(|e| EntryError::Fatal(e.into()))?;
            }
            EntryType::Symlink => {
                let Some(target) = entry.link_name_bytes() else {
                    return skip("symlink without a target".into());
                };
                if target.contains(&0) || target.len() > self.limits.max_path_bytes {
                    return skip("symlink target has a NUL byte or is too long".into());
                }
                // Kept verbatim: it is only ever resolved inside the guest's root (or here, in-root).
                rustix::fs::symlinkat(OsStr::from_bytes(&target), &parent, name.as_os_str())
                    .map_err(|e| EntryError::Fatal(e.into()))?;
                self.chown_entry(&parent, name.as_os_str(), uid, gid)?;
                let ts = Timespec {
                    tv_sec: mtime,
                    tv_nsec: 0,
                };
                rustix::fs::utimensat(
                    &parent,
                    name.as_os_str(),
                    &Timestamps {
                        last_access: ts,
                        last_modification: ts,
                    },
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| EntryError::Fatal(e.into()))?;
            }
            EntryType::Link => {
                let Some(target) = entry.link_name_bytes() else {
                    return skip("hardlink without a target".into());
                };
                let tcomps = match sanitize_path(&target, self.limits.max_path_bytes) {
                    Ok(c) => c,
                    Err(r) => return skip(format!("hardlink target refused: {r:?}")),
                };
                let Some((tname, tparent)) = tcomps.split_last() else {
                    return skip("hardlink to the root directory".into());
                };
                let tparent_fd = match self.open_dir(&join(tparent), false) {
                    Ok(Some(fd)) => fd,
                    _ => return skip("hardlink target does not exist in the image".into()),
                };
                match rustix::fs::linkat(
                    &tparent_fd,
                    tname.as_os_str(),
                    &parent,
                    name.as_os_str(),
                    AtFlags::empty(),
                ) {
                    Ok(()) => {}
                    Err(rustix::io::Errno::NOENT) => {
                        return skip("hardlink target does not exist in the image".into())
                    }
                    Err(rustix::io::Errno::PERM) => return skip("hardlink to a directory".into()),
                    Err(e) => return Err(EntryError::Fatal(e.into())),
                }
            }
            EntryType::Fifo => {
                rustix::fs::mknodat(
                    &parent,
                    name.as_os_str(),
                    FileType::Fifo,
                    Mode::from_raw_mode(0o600),
                    0,
                )
                .map_err(|e| EntryError::Fatal(e.into()))?;
                let fd = rustix::fs::openat(
                    &parent,
                    name.as_os_str(),
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| EntryError::Fatal(e.into()))?;
                // fchmod/fchown do not work on O_PATH fds; go through the parent instead.
                drop(fd);
                self.chown_entry(&parent, name.as_os_str(), uid, gid)?;
                rustix::fs::chmodat(
                    &parent,
                    name.as_os_str(),
                    Mode::from_raw_mode(mode),
                    AtFlags::empty(),
                )
                .map_err(|e| EntryError::Fatal(e.into()))?;
            }
            _ => unreachable!("filtered above"),
        }
        Ok(())
    }

    /// Opens a directory of the staged tree, resolving symlinks inside the root; with `create`,
    /// missing components are made (0755, root-owned) on the way.
    fn open_dir(&self, rel: &Path, create: bool) -> io::Result<Option<OwnedFd>> {
        let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC;
        let rel_or_dot: &Path = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        match rustix::fs::openat2(&self.root_fd, rel_or_dot, flags, Mode::empty(), RESOLVE) {
            Ok(fd) => return Ok(Some(fd)),
            Err(rustix::io::Errno::NOENT) if create => {}
            Err(rustix::io::Errno::NOENT) | Err(rustix::io::Errno::NOTDIR) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        // Resolve each prefix from the staging root, so a symlinked component resolves as in a chroot.
        let mut cur = self.root_fd.try_clone()?;
        let mut prefix = PathBuf::new();
        for comp in rel.components() {
            let c = comp.as_os_str();
            prefix.push(c);
            match rustix::fs::openat2(&self.root_fd, &prefix, flags, Mode::empty(), RESOLVE) {
                Ok(fd) => cur = fd,
                Err(rustix::io::Errno::NOENT) => {
                    match rustix::fs::mkdirat(&cur, c, Mode::from_raw_mode(0o755)) {
                        Ok(()) => {}
                        // A dangling symlink is in the way: do not create through it.
                        Err(rustix::io::Errno::EXIST) => return Ok(None),
                        Err(e) => return Err(e.into()),
                    }
                    cur = rustix::fs::openat(&cur, c, flags | OFlags::NOFOLLOW, Mode::empty())?;
                }
                Err(rustix::io::Errno::NOTDIR) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Some(cur))
    }

    fn set_meta(
        &mut self,
        fd: BorrowedFd<'_>,
        uid: u64,
        gid: u64,
        mode: u32,
        _dir: bool,
    ) -> Result<(), EntryError> {
        if self.is_root {
            let (Ok(u), Ok(g)) = (u32::try_from(uid), u32::try_from(gid)) else {
                return Err(EntryError::Skip(
                    String::new(),
                    "uid/gid out of range".into(),
                ));
            };
            rustix::fs::fchown(
                fd,
                Some(rustix::fs::Uid::from_raw(u)),
                Some(rustix::fs::Gid::from_raw(g)),
            )
            .map_err(|e| EntryError::Fatal(e.into()))?;
        }
        // After chown, which clears set-id bits.
        rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))
            .map_err(|e| EntryError::Fatal(e.into()))?;
        Ok(())
    }

    fn set_xattrs(&mut self, fd: BorrowedFd<'_>, xattrs: &[(OsString, Vec<u8>)], path: &str) {
        for (k, v) in xattrs {
            if let Err(e) =
                rustix::fs::fsetxattr(fd, k.as_os_str(), v, rustix::fs::XattrFlags::empty())
            {
                let reason = format!("xattr {} not kept: {e}", k.to_string_lossy());
                tracing::warn!(path, "{reason}");
                self.report.skipped.push(Skipped {
                    path: path.to_string(),
                    reason,
                });
            }
        }
    }
}

enum EntryError {
    /// Leave this entry out, with a warning.
    Skip(String, String),
    /// Abort the layer.
    Fatal(io::Error),
}

/// `SCHILY.xattr.*` PAX records; the namespaces a filesystem image can carry.
fn collect_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> Vec<(OsString, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(Some(exts)) = entry.pax_extensions() else {
        return out;
    };
    for ext in exts.flatten() {
        let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
            continue;
        };
        let keep = [&b"user."[..], b"trusted.", b"security."]
            .iter()
            .any(|p| name.starts_with(p));
        if keep && !name.contains(&0) && out.len() < 64 {
            out.push((
                OsString::from_vec(name.to_vec()),
                ext.value_bytes().to_vec(),
            ));
        }
    }
    out
}

const MAX_DEPTH: usize = 2048;

/// Removes `name` under `parent` without following any symlink; directories recursively.
fn remove_all_at(parent: BorrowedFd<'_>, name: &OsStr, depth: usize) -> io::Result<()> {
    let st = match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return rustix::fs::unlinkat(parent, name, AtFlags::empty()).map_err(Into::into);
    }
    if depth > MAX_DEPTH {
        return Err(io::Error::other("directory tree too deep"));
    }
    let dir = rustix::fs::openat(
        parent,
        name,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for child in list_dir(dir.as_fd())? {
        remove_all_at(dir.as_fd(), &child, depth + 1)?;
    }
    rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR).map_err(Into::into)
}

fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    let mut d = rustix::fs::Dir::read_from(dir)?;
    while let Some(ent) = d.read() {
        let ent = ent?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(OsString::from_vec(n.to_vec()));
        }
    }
    names.sort();
    Ok(names)
}

/// Opaque directory: removes everything below `dir` this layer did not write.
fn clear_untouched(
    dir: BorrowedFd<'_>,
    rel: &Path,
    touched: &HashSet<PathBuf>,
    depth: usize,
) -> io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(io::Error::other("directory tree too deep"));
    }
    for child in list_dir(dir)? {
        let child_rel = rel.join(&child);
        if !touched.contains(&child_rel) {
            remove_all_at(dir, &child, 0)?;
            continue;
        }
        if let Ok(sub) = rustix::fs::openat(
            dir,
            child.as_os_str(),
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            clear_untouched(sub.as_fd(), &child_rel, touched, depth + 1)?;
        }
    }
    Ok(())
}

/// Sets every directory's mtime (tar value or 0), children first, so the tree is deterministic.
fn fix_dir_times(
    dir: BorrowedFd<'_>,
    rel: &Path,
    mtimes: &HashMap<PathBuf, i64>,
    depth: usize,
) -> io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(io::Error::other("directory tree too deep"));
    }
    for child in list_dir(dir)? {
        if let Ok(sub) = rustix::fs::openat(
            dir,
            child.as_os_str(),
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            fix_dir_times(sub.as_fd(), &rel.join(&child), mtimes, depth + 1)?;
        }
    }
    let t = Timespec {
        tv_sec: mtimes.get(rel).copied().unwrap_or(0),
        tv_nsec: 0,
    };
    rustix::fs::futimens(
        dir,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
    )?;
    Ok(())
}
