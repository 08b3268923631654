//! File requests: write, read, stat, list, mkdir, remove.
//!
//! These run on blocking sockets with receive/send timeouts (set by the
//! connection handler), so a host that stops mid-transfer costs one thread
//! for at most the idle timeout.

use std::collections::BinaryHeap;
use std::ffi::OsString;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use capsa_proto::{
    check_path, AgentError, AgentFrame, ClientFrame, DirEntry, ErrorKind, FileKind, FileMeta,
    ProtoError, WriteFileRequest, CHUNK, LIST_PAGE, MAX_FRAME, MAX_ITEMS,
};

use super::frame::FrameReader;
use super::{send, Fail};

fn invalid(message: impl Into<String>) -> AgentError {
    AgentError {
        kind: ErrorKind::InvalidInput,
        message: message.into(),
    }
}

fn checked(path: &str) -> Result<&Path, Fail> {
    check_path(path).map_err(|e| Fail::Reply(invalid(e.to_string())))?;
    Ok(Path::new(path))
}

fn io_fail(context: &str, path: &Path, e: &io::Error) -> Fail {
    Fail::Reply(AgentError::io(&format!("{context} {}", path.display()), e))
}

/// A request path made ready for `std::fs` calls. Without an image root it
/// is the path itself; with one, it goes through a directory fd opened with
/// `openat2(RESOLVE_IN_ROOT)` (`/proc/self/fd/N/...`), so the image's
/// absolute symlinks and `..` stay inside the image. The fd lives as long as this.
struct Target {
    path: PathBuf,
    _fd: Option<std::os::fd::OwnedFd>,
}

/// `path` with its last component left for the call (lstat, unlink, rename,
/// mkdir act on the entry, not on a symlink's target).
fn entry(path: &Path) -> Result<Target, Fail> {
    match crate::rootfs::root() {
        None => Ok(Target {
            path: path.to_path_buf(),
            _fd: None,
        }),
        // "/" or a path ending in "..": no entry name to leave unresolved.
        Some(_) if path.file_name().is_none() => resolved(path),
        Some(r) => r
            .entry(path)
            .map(|(fd, p)| Target {
                path: p,
                _fd: Some(fd),
            })
            .map_err(|e| io_fail("resolve", path, &e)),
    }
}

/// `path` with every component resolved (symlinks followed, inside the root).
fn resolved(path: &Path) -> Result<Target, Fail> {
    match crate::rootfs::root() {
        None => Ok(Target {
            path: path.to_path_buf(),
            _fd: None,
        }),
        Some(r) => r
            .resolved(path)
            .map(|(fd, p)| Target {
                path: p,
                _fd: Some(fd),
            })
            .map_err(|e| io_fail("resolve", path, &e)),
    }
}

/// `mkdir -p` that resolves each step inside the image root (if any).
fn create_dir_all(p: &Path, mode: u32) -> Result<(), Fail> {
    if crate::rootfs::root().is_none() {
        return fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(p)
            .map_err(|e| io_fail("mkdir", p, &e));
    }
    let mut prefix = PathBuf::from("/");
    for c in p.components().skip(1) {
        prefix.push(c);
        let t = entry(&prefix)?;
        match fs::DirBuilder::new().mode(mode).create(&t.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_fail("mkdir", &prefix, &e)),
        }
    }
    Ok(())
}

/// Protocol metadata of a file.
pub(crate) fn meta_of(m: &Metadata) -> FileMeta {
    let ft = m.file_type();
    let kind = if ft.is_file() {
        FileKind::File
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_symlink() {
        FileKind::Symlink
    } else {
        FileKind::Other
    };
    FileMeta {
        kind,
        size: m.len(),
        mode: m.mode() & 0o7777,
        // The kernel keeps nanoseconds in 0..1e9; clamp anyway, never panic.
        mtime: (m.mtime(), m.mtime_nsec().clamp(0, 999_999_999) as u32),
    }
}

/// `Stat`: `lstat`.
pub(super) fn stat(path: &str) -> Result<AgentFrame, Fail> {
    let p = checked(path)?;
    let t = entry(p)?;
    let m = fs::symlink_metadata(&t.path).map_err(|e| io_fail("stat", p, &e))?;
    Ok(AgentFrame::Meta(meta_of(&m)))
}

/// `Mkdir`: like `mkdir` / `mkdir -p`. The mode is applied exactly (not
/// filtered by the agent's umask) to the directory it creates.
pub(super) fn mkdir(path: &str, parents: bool, mode: u32) -> Result<AgentFrame, Fail> {
    let p = checked(path)?;
    let t = entry(p)?;
    let existed = parents && fs::symlink_metadata(&t.path).is_ok();
    if parents && crate::rootfs::root().is_some() {
        create_dir_all(p, mode & 0o7777)?;
    } else {
        fs::DirBuilder::new()
            .recursive(parents)
            .mode(mode & 0o7777)
            .create(&t.path)
            .map_err(|e| io_fail("mkdir", p, &e))?;
    }
    let t = entry(p)?;
    if !existed {
        fs::set_permissions(&t.path, fs::Permissions::from_mode(mode & 0o7777))
            .map_err(|e| io_fail("chmod", p, &e))?;
    }
    let m = fs::symlink_metadata(&t.path).map_err(|e| io_fail("stat", p, &e))?;
    Ok(AgentFrame::Done(Some(meta_of(&m))))
}

/// `Mount`: the virtio-fs device `tag` at `path` (created, like `mkdir -p`,
/// if missing). `nodev`, and `nosuid` so a share cannot carry setuid programs in.
/// In an image sandbox `path` is inside the image root, where commands run,
/// resolved there (an image's symlinks cannot aim the mount outside it).
pub(super) fn mount_virtiofs(tag: &str, path: &str, read_only: bool) -> Result<AgentFrame, Fail> {
    let p = checked(path)?;
    if tag.is_empty()
        || tag.len() > capsa_proto::MAX_MOUNT_TAG
        || !tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(Fail::Reply(invalid(
            "mount tag must be 1 to 36 of [A-Za-z0-9._-]",
        )));
    }
    if p.components().count() <= 1 {
        return Err(Fail::Reply(invalid("refusing to mount over /")));
    }
    create_dir_all(p, 0o755)?;
    // In an image root: /proc/self/fd/N of the directory, opened inside it.
    let t = resolved(p)?;
    let c = |s: &[u8]| {
        std::ffi::CString::new(s).map_err(|_| Fail::Reply(invalid("NUL in mount argument")))
    };
    let (src, dst, fstype) = (
        c(tag.as_bytes())?,
        c(t.path.as_os_str().as_bytes())?,
        c(b"virtiofs")?,
    );
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if read_only {
        flags |= libc::MS_RDONLY;
    }
    // A hot-plugged device is probed a moment after the host's device_add
    // returns; until then the kernel knows no such tag (EINVAL). Bounded wait.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        // SAFETY: NUL-terminated strings that outlive the call; no data argument.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                fstype.as_ptr(),
                flags,
                std::ptr::null(),
            )
        };
        if rc == 0 {
            return Ok(AgentFrame::Done(None));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) || std::time::Instant::now() > deadline {
            return Err(io_fail(&format!("mount virtiofs tag {tag} on"), p, &e));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// `Unmount`: detaches the mount at `path` (lazily, so a busy file or a shell
/// sitting in it does not block the host's detach).
pub(super) fn unmount(path: &str) -> Result<AgentFrame, Fail> {
    let p = checked(path)?;
    // Inside the image root, as `Mount` put it there.
    let t = resolved(p)?;
    let dst = std::ffi::CString::new(t.path.as_os_str().as_bytes())
        .map_err(|_| Fail::Reply(invalid("NUL in path")))?;
    // SAFETY: a NUL-terminated string that outlives the call.
    let rc = unsafe { libc::umount2(dst.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        return Err(io_fail("unmount", p, &io::Error::last_os_error()));
    }
    Ok(AgentFrame::Done(None))
}

/// `Remove`: a file, a symlink (not its target), an empty directory, or with
/// `recursive` a whole tree (std's `remove_dir_all` does not follow symlinks).
pub(super) fn remove(path: &str, recursive: bool) -> Result<AgentFrame, Fail> {
    let p = checked(path)?;
    if p.components().count() <= 1 {
        return Err(Fail::Reply(invalid("refusing to remove /")));
    }
    // "/..", "/tmp/../" and the like are the root too (in an image root,
    // `entry` refuses a path whose last component is not a name).
    if crate::rootfs::root().is_some() && p.file_name().is_none() {
        return Err(Fail::Reply(invalid("refusing to remove /")));
    }
    let t = entry(p)?;
    let m = fs::symlink_metadata(&t.path).map_err(|e| io_fail("remove", p, &e))?;
    if m.is_dir() && fs::canonicalize(&t.path).is_ok_and(|c| c == Path::new("/")) {
        return Err(Fail::Reply(invalid("refusing to remove /")));
    }
    let r = if m.is_dir() {
        if recursive {
            fs::remove_dir_all(&t.path)
        } else {
            fs::remove_dir(&t.path)
        }
    } else {
        fs::remove_file(&t.path)
    };
    r.map_err(|e| io_fail("remove", p, &e))?;
    Ok(AgentFrame::Done(None))
}

/// One name read from a directory, ordered by its (lossy UTF-8) protocol name.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Name {
    key: String,
    raw: OsString,
}

/// Reads up to `limit` names sorting after `after`, smallest first, keeping
/// only `limit` names in memory whatever the directory's size. Returns them
/// and whether more names exist.
fn names_after(dir: &Path, after: Option<&str>, limit: usize) -> io::Result<(Vec<Name>, bool)> {
    let mut heap: BinaryHeap<Name> = BinaryHeap::with_capacity(limit + 1);
    let mut more = false;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let raw = entry.file_name();
        // Non-UTF-8 names are reported lossily (U+FFFD); the protocol has strings.
        let key = String::from_utf8_lossy(raw.as_bytes()).into_owned();
        if after.is_some_and(|a| key.as_str() <= a) {
            continue;
        }
        heap.push(Name { key, raw });
        if heap.len() > limit {
            heap.pop();
            more = true;
        }
    }
    Ok((heap.into_sorted_vec(), more))
}

fn entries(dir: &Path, names: Vec<Name>) -> Vec<DirEntry> {
    names
        .into_iter()
        .filter_map(|n| {
            // An entry removed since readdir is skipped, not an error.
            let m = fs::symlink_metadata(dir.join(&n.raw)).ok()?;
            Some(DirEntry {
                name: n.key,
                meta: meta_of(&m),
            })
        })
        .collect()
}

/// `ListDir`: all entries in one frame, sorted by name; a directory with more
/// than [`MAX_ITEMS`] entries (or too many bytes of names for one frame) is
/// refused with `InvalidInput`, pointing at `ListDirPage`.
pub(super) fn list_dir(path: &str) -> Result<AgentFrame, Fail> {
    let p = checked(path)?;
    let t = resolved(p)?;
    let (names, more) =
        names_after(&t.path, None, MAX_ITEMS).map_err(|e| io_fail("list", p, &e))?;
    let too_big = || {
        Fail::Reply(invalid(format!(
            "{path} has more entries than fit one ListDir reply ({MAX_ITEMS} entries, \
             {MAX_FRAME} bytes); use ListDirPage"
        )))
    };
    if more {
        return Err(too_big());
    }
    let frame = AgentFrame::Entries(entries(&t.path, names));
    match capsa_proto::encode(&frame) {
        Ok(_) => Ok(frame),
        Err(_) => Err(too_big()),
    }
}

/// `ListDirPage`: up to [`LIST_PAGE`] entries after `after`.
pub(super) fn list_dir_page(path: &str, after: Option<&str>) -> Result<AgentFrame, Fail> {
    let p = checked(path)?;
    let t = resolved(p)?;
    let (names, more) =
        names_after(&t.path, after, LIST_PAGE).map_err(|e| io_fail("list", p, &e))?;
    Ok(AgentFrame::EntriesPage {
        entries: entries(&t.path, names),
        more,
    })
}

/// `ReadFile`: `Meta`, then `Data` chunks, then `End`. Only regular files:
/// a device or FIFO could stream forever or block the thread.
pub(super) fn read_file<S: Write>(conn: &mut S, path: &str) -> Result<(), Fail> {
    let p = checked(path)?;
    let t = resolved(p)?;
    let mut f = File::open(&t.path).map_err(|e| io_fail("open", p, &e))?;
    let m = f.metadata().map_err(|e| io_fail("stat", p, &e))?;
    if !m.is_file() {
        return Err(Fail::Reply(invalid(format!(
            "{path} is not a regular file"
        ))));
    }
    send(conn, &AgentFrame::Meta(meta_of(&m)))?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_fail("read", p, &e)),
        };
        send(conn, &AgentFrame::Data(buf[..n].to_vec()))?;
    }
    send(conn, &AgentFrame::End)
}

/// Removes the temporary file unless the write completed.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Makes temp names unique within the agent process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// `WriteFile`: `Ready`, then `Data`* `End` from the host, then `Done(meta)`.
///
/// The content goes to a temporary file in the target's directory which is
/// renamed over the target at the end, so readers never see a half-written
/// file and a failed or abandoned transfer leaves the old file in place.
pub(super) fn write_file<S: Read + Write>(
    conn: &mut S,
    rd: &mut FrameReader,
    req: WriteFileRequest,
) -> Result<(), Fail> {
    let p = checked(&req.path)?;
    let (Some(dir), Some(name)) = (p.parent(), p.file_name()) else {
        return Err(Fail::Reply(invalid(format!(
            "{} does not name a file",
            req.path
        ))));
    };
    if let Some((_, nsec)) = req.mtime {
        if nsec >= 1_000_000_000 {
            return Err(Fail::Reply(invalid("mtime nanoseconds out of range")));
        }
    }
    if req.create_parents {
        create_dir_all(dir, 0o755)?;
    }
    let dir_t = resolved(dir)?;
    let target = dir_t.path.join(name);
    let tmp_path = dir_t.path.join(format!(
        ".capsa-tmp-{}-{}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp_path)
        .map_err(|e| io_fail("create", p, &e))?;
    let mut tmp = TempFile {
        path: tmp_path,
        keep: false,
    };
    send(conn, &AgentFrame::Ready)?;
    loop {
        match rd.read_blocking(conn) {
            Ok(ClientFrame::Data(data)) => {
                file.write_all(&data).map_err(|e| io_fail("write", p, &e))?;
            }
            Ok(ClientFrame::End) => break,
            Ok(other) => {
                return Err(Fail::Reply(invalid(format!(
                    "unexpected {} frame during a file upload",
                    super::client_frame_name(&other)
                ))))
            }
            Err(ProtoError::TooLarge(n)) => {
                return Err(Fail::Reply(invalid(format!(
                    "frame of {n} bytes is too large"
                ))))
            }
            Err(ProtoError::Malformed(m)) => {
                return Err(Fail::Reply(invalid(format!("malformed frame: {m}"))))
            }
            // Closed, timed out or broken: nobody to answer.
            Err(_) => return Err(Fail::Gone),
        }
    }
    file.set_permissions(fs::Permissions::from_mode(req.mode & 0o7777))
        .map_err(|e| io_fail("chmod", p, &e))?;
    if let Some((sec, nsec)) = req.mtime {
        let t = libc::timespec {
            tv_sec: sec as libc::time_t,
            tv_nsec: nsec as libc::c_long,
        };
        let times = [t, t];
        // SAFETY: valid fd and a two-element timespec array.
        if unsafe { libc::futimens(file.as_raw_fd(), times.as_ptr()) } != 0 {
            return Err(io_fail("set mtime of", p, &io::Error::last_os_error()));
        }
    }
    drop(file);
    fs::rename(&tmp.path, &target).map_err(|e| io_fail("rename onto", p, &e))?;
    tmp.keep = true;
    let m = fs::symlink_metadata(&target).map_err(|e| io_fail("stat", p, &e))?;
    send(conn, &AgentFrame::Done(Some(meta_of(&m))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paging_keeps_order_and_bounds() {
        let dir = std::env::temp_dir().join(format!("capsa-page-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        for i in 0..25 {
            fs::write(dir.join(format!("f{i:03}")), b"").unwrap();
        }
        let mut after: Option<String> = None;
        let mut seen = Vec::new();
        loop {
            let (names, more) = names_after(&dir, after.as_deref(), 10).unwrap();
            assert!(names.len() <= 10);
            seen.extend(names.iter().map(|n| n.key.clone()));
            after = names.last().map(|n| n.key.clone());
            if !more {
                break;
            }
        }
        let want: Vec<String> = (0..25).map(|i| format!("f{i:03}")).collect();
        assert_eq!(seen, want);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn remove_refuses_root() {
        assert!(
            matches!(remove("/", true), Err(Fail::Reply(e)) if e.kind == ErrorKind::InvalidInput)
        );
        assert!(
            matches!(remove("relative", true), Err(Fail::Reply(e)) if e.kind == ErrorKind::InvalidInput)
        );
    }
}
