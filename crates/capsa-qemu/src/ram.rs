//! Guest RAM as a capsa-owned memfd, and sparse copies of it.
//!
//! QEMU 7.2's migration stream writes every page of a 256 MiB guest and the
//! receiving side touches every page of a shared memfd while loading it (a
//! read fault on a memfd hole allocates), which costs ~0.35 s under load.
//! capsa instead keeps the RAM itself: a snapshot copies the data pages of
//! the memfd into a sparse file, and a restore copies them back into a fresh
//! memfd (in-kernel, `sendfile`), while QEMU migrates only device state
//! (`x-ignore-shared`). Untouched and all-zero pages stay holes on both sides.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Granularity of zero detection (the guest's page size).
const PAGE: usize = 4096;
/// Bytes copied per read while scanning for zero pages.
const BUF: usize = 1 << 20;
static ZERO: [u8; PAGE] = [0; PAGE];

/// A new, empty memfd of `bytes` bytes (all holes).
pub fn create_memfd(bytes: u64) -> io::Result<File> {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned below.
    let fd = unsafe { libc::memfd_create(c"capsa-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(bytes)?;
    Ok(f)
}

/// The data extents (`[start, end)`) of `f`, up to `len`: holes are skipped.
fn extents(f: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut off: i64 = 0;
    while (off as u64) < len {
        // SAFETY: lseek on an fd we own.
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `off`
            }
            if e.raw_os_error() == Some(libc::EINVAL) && off == 0 {
                // No SEEK_DATA support: treat the file as one extent.
                return Ok(vec![(0, len)]);
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 {
            len as i64
        } else {
            hole.min(len as i64)
        };
        if end > data {
            out.push((data as u64, end as u64));
        }
        off = end.max(data + 1);
    }
    Ok(out)
}

/// Saves the data pages of `ram` (of `len` bytes) to a new sparse file at
/// `dst`; returns the bytes of data written.
pub fn save(ram: &File, len: u64, dst: &Path) -> io::Result<u64> {
    let out = File::create(dst)?;
    out.set_len(len)?;
    let mut buf = vec![0u8; BUF];
    let mut written = 0;
    for (start, end) in extents(ram, len)? {
        let mut pos = start;
        while pos < end {
            let n = ((end - pos) as usize).min(BUF);
            ram.read_exact_at(&mut buf[..n], pos)?;
            // Runs of non-zero pages are written in one call.
            let mut run: Option<usize> = None;
            let flush = |from: usize, to: usize, written: &mut u64| -> io::Result<()> {
                out.write_all_at(&buf[from..to], pos + from as u64)?;
                *written += (to - from) as u64;
                Ok(())
            };
            for i in (0..n).step_by(PAGE) {
                let page = &buf[i..(i + PAGE).min(n)];
                let zero = page == &ZERO[..page.len()];
                match (zero, run) {
                    (false, None) => run = Some(i),
                    (true, Some(from)) => {
                        flush(from, i, &mut written)?;
                        run = None;
                    }
                    _ => {}
                }
            }
            if let Some(from) = run {
                flush(from, n, &mut written)?;
            }
            pos += n as u64;
        }
    }
    // Not synced here: the caller syncs once the VM runs again.
    Ok(written)
}

/// Loads the sparse RAM image at `src` into `ram` (a fresh memfd of the same size).
pub fn load(src: &Path, ram: &File) -> io::Result<u64> {
    let f = File::open(src)?;
    let len = f.metadata()?.len();
    let ram_len = ram.metadata()?.len();
    if len != ram_len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the RAM image is {len} bytes but the guest has {ram_len}"),
        ));
    }
    let mut copied = 0;
    for (start, end) in extents(&f, len)? {
        copy_range(&f, ram, start, end)?;
        copied += end - start;
    }
    Ok(copied)
}

/// Copies `[start, end)` of `src` to the same offsets of `dst`, in the kernel
/// when it can (`sendfile` into the memfd), else through a buffer.
fn copy_range(src: &File, dst: &File, start: u64, end: u64) -> io::Result<()> {
    let mut pos = start;
    // SAFETY: lseek on an fd we own; sendfile writes at dst's file offset.
    if unsafe { libc::lseek(dst.as_raw_fd(), pos as i64, libc::SEEK_SET) } >= 0 {
        while pos < end {
            let mut off = pos as libc::off_t;
            let want = ((end - pos) as usize).min(1 << 30);
            // SAFETY: both fds are open; `off` is a valid offset pointer.
            let n = unsafe { libc::sendfile(dst.as_raw_fd(), src.as_raw_fd(), &mut off, want) };
            if n <= 0 {
                break; // fall back below for the rest
            }
            pos += n as u64;
        }
    }
    let mut buf = vec![0u8; BUF];
    while pos < end {
        let n = ((end - pos) as usize).min(BUF);
        src.read_exact_at(&mut buf[..n], pos)?;
        dst.write_all_at(&buf[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// Copies a disk image to `dst`: a reflink where the file system has them
/// (instant), else its data extents only (holes stay holes).
pub fn copy_image(src: &Path, dst: &Path) -> io::Result<()> {
    let from = File::open(src)?;
    let to = File::create(dst)?;
    /// `_IOW(0x94, 9, int)`.
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: FICLONE takes the source fd as its argument.
    if unsafe { libc::ioctl(to.as_raw_fd(), FICLONE as _, from.as_raw_fd()) } == 0 {
        return Ok(());
    }
    let len = from.metadata()?.len();
    to.set_len(len)?;
    for (start, end) in extents(&from, len)? {
        let mut pos = start;
        while pos < end {
            let (mut a, mut b) = (pos as i64, pos as i64);
            let want = ((end - pos) as usize).min(1 << 30);
            // SAFETY: both fds are open; the offsets are valid pointers.
            let n = unsafe {
                libc::copy_file_range(from.as_raw_fd(), &mut a, to.as_raw_fd(), &mut b, want, 0)
            };
            if n <= 0 {
                copy_range(&from, &to, pos, end)?;
                break;
            }
            pos += n as u64;
        }
    }
    Ok(())
}

/// Flushes every file in `dir` (and the directory) to stable storage.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_file() {
            File::open(e.path())?.sync_all()?;
        }
    }
    File::open(dir)?.sync_all()
}

/// Bytes actually allocated to a file (what `du` reports).
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_and_load_keep_data_and_holes() {
        let d = tempfile::tempdir().unwrap();
        let len = 8 << 20;
        let ram = create_memfd(len).unwrap();
        ram.write_all_at(b"hello", 4096 * 3 + 7).unwrap();
        ram.write_all_at(&[0u8; 8192], 4096 * 10).unwrap(); // touched but zero
        ram.write_all_at(&[9u8; 3 * 4096], len - 3 * 4096).unwrap();
        let img = d.path().join("ram.bin");
        let n = save(&ram, len, &img).unwrap();
        assert_eq!(n, 4 * 4096, "only non-zero pages are stored");
        assert_eq!(std::fs::metadata(&img).unwrap().len(), len);
        let back = create_memfd(len).unwrap();
        load(&img, &back).unwrap();
        let mut a = vec![0u8; len as usize];
        let mut b = vec![0u8; len as usize];
        ram.read_exact_at(&mut a, 0).unwrap();
        back.read_exact_at(&mut b, 0).unwrap();
        assert!(a == b);
        let wrong = create_memfd(len / 2).unwrap();
        assert!(load(&img, &wrong).is_err());
    }

    #[test]
    fn image_copy() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("a");
        let f = File::create(&src).unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(b"abc", 1 << 20).unwrap();
        drop(f);
        copy_image(&src, &d.path().join("b")).unwrap();
        assert_eq!(
            std::fs::read(&src).unwrap(),
            std::fs::read(d.path().join("b")).unwrap()
        );
    }
}
