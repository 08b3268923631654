//! Disk image format detection from the file's contents, never its name.
//!
//! A disk handed to QEMU with the wrong format is a security problem (a raw
//! guest-writable disk that *looks* like qcow2 could point QEMU at host files
//! through a backing-file header), and a corrupt one fails late with a message
//! from deep inside QEMU. So capsa reads the header itself and refuses early.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::DiskFormat;

const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
const QCOW2_HEADER_LEN: usize = 72;

/// Why a disk image cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiskProbeError {
    /// No file at that path.
    #[error("no such file")]
    NotFound,
    /// The path is not a regular file or block device.
    #[error("not a regular file or block device")]
    NotAFile,
    /// A host block device, not allowed for this disk.
    #[error("it is a host block device")]
    Device,
    /// The file exists but cannot be opened as asked.
    #[error("permission denied opening it {0}")]
    PermissionDenied(&'static str),
    /// The file is empty, so there is nothing to attach.
    #[error("the file is empty")]
    Empty,
    /// The file claims to be qcow2 but its header is not usable.
    #[error("corrupt qcow2 image: {0}")]
    Corrupt(String),
    /// The qcow2 image names a backing file that is missing.
    #[error("qcow2 backing file {0} does not exist")]
    MissingBacking(PathBuf),
    /// Reading the header failed.
    #[error("cannot read it: {0}")]
    Io(#[source] std::io::Error),
}

impl DiskProbeError {
    /// What the user should do about it.
    pub fn fix(&self) -> &'static str {
        match self {
            DiskProbeError::NotFound => {
                "check the path, or create an image with `qemu-img create -f qcow2 disk.qcow2 1G`"
            }
            DiskProbeError::NotAFile => "pass a disk image file, not a directory",
            DiskProbeError::Device => {
                "pass an image file; to give the guest a whole host block device on purpose, \
                 append :dev (CLI) or set DiskSpec::allow_device (library)"
            }
            DiskProbeError::PermissionDenied(_) => {
                "make the file readable (and writable unless attached read-only with :ro)"
            }
            DiskProbeError::Empty => "give the image a size, e.g. `truncate -s 64M disk.img`",
            DiskProbeError::Corrupt(_) => "check it with `qemu-img check IMAGE`, or recreate it",
            DiskProbeError::MissingBacking(_) => {
                "restore the backing file, or flatten the image with `qemu-img convert`"
            }
            DiskProbeError::Io(_) => "check the file and the disk it lives on",
        }
    }
}

/// Detects the format of the image at `path` and checks it can be opened as
/// asked; a block device is refused unless `allow_device`.
pub fn probe_disk_format(
    path: &Path,
    read_only: bool,
    allow_device: bool,
) -> Result<DiskFormat, DiskProbeError> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DiskProbeError::NotFound,
        std::io::ErrorKind::PermissionDenied => DiskProbeError::PermissionDenied("for reading"),
        _ => DiskProbeError::Io(e),
    })?;
    use std::os::unix::fs::FileTypeExt;
    let ft = meta.file_type();
    if !(ft.is_file() || ft.is_block_device()) {
        return Err(DiskProbeError::NotAFile);
    }
    if ft.is_block_device() && !allow_device {
        return Err(DiskProbeError::Device);
    }
    let open_err = |e: std::io::Error, how| match e.kind() {
        std::io::ErrorKind::PermissionDenied => DiskProbeError::PermissionDenied(how),
        _ => DiskProbeError::Io(e),
    };
    let mut file = std::fs::File::open(path).map_err(|e| open_err(e, "for reading"))?;
    if !read_only {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| open_err(e, "for writing"))?;
    }
    let len = if ft.is_file() { meta.len() } else { u64::MAX };
    if len == 0 {
        return Err(DiskProbeError::Empty);
    }
    let mut header = [0u8; QCOW2_HEADER_LEN];
    let n = read_up_to(&mut file, &mut header).map_err(DiskProbeError::Io)?;
    if n < 4 || header[..4] != QCOW2_MAGIC {
        return Ok(DiskFormat::Raw);
    }
    let backing = check_qcow2_header(&header[..n], len)?;
    if let Some((off, size)) = backing {
        let name = read_at(&mut file, off, size).map_err(DiskProbeError::Io)?;
        let name = String::from_utf8(name)
            .map_err(|_| DiskProbeError::Corrupt("backing file name is not UTF-8".into()))?;
        // Backing files may also be protocol strings (nbd:, json:); only local paths are allowed.
        if name.contains(':') {
            return Err(DiskProbeError::Corrupt(format!(
                "backing file {name:?} is not a local path"
            )));
        }
        let mut p = PathBuf::from(&name);
        if p.is_relative() {
            p = path.parent().unwrap_or(Path::new(".")).join(p);
        }
        if !p.exists() {
            return Err(DiskProbeError::MissingBacking(p));
        }
    }
    Ok(DiskFormat::Qcow2)
}

fn read_up_to(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn read_at(file: &mut std::fs::File, off: u64, len: u32) -> std::io::Result<Vec<u8>> {
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(off))?;
    let mut buf = vec![0u8; len as usize];
    file.read_exact(&mut buf)?;
    Ok(buf)
}

fn be32(h: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]])
}

fn be64(h: &[u8], at: usize) -> u64 {
    (u64::from(be32(h, at)) << 32) | u64::from(be32(h, at + 4))
}

/// Validates a qcow2 header against the file length; returns the backing file (offset, len).
///
/// Pure, so it can be tested (and fuzzed) on byte strings.
pub(crate) fn check_qcow2_header(
    h: &[u8],
    file_len: u64,
) -> Result<Option<(u64, u32)>, DiskProbeError> {
    let corrupt = |m: String| Err(DiskProbeError::Corrupt(m));
    if h.len() < QCOW2_HEADER_LEN {
        return corrupt(format!(
            "header is {} bytes, shorter than {QCOW2_HEADER_LEN}",
            h.len()
        ));
    }
    let version = be32(h, 4);
    if version != 2 && version != 3 {
        return corrupt(format!("unknown version {version}"));
    }
    let backing_off = be64(h, 8);
    let backing_len = be32(h, 16);
    let cluster_bits = be32(h, 20);
    if !(9..=21).contains(&cluster_bits) {
        return corrupt(format!("cluster_bits {cluster_bits} outside 9..=21"));
    }
    let cluster = 1u64 << cluster_bits;
    let size = be64(h, 24);
    if size == 0 {
        return corrupt("virtual size is 0".into());
    }
    let l1_size = be32(h, 36);
    let l1_off = be64(h, 40);
    let refcount_off = be64(h, 48);
    let check_table = |name: &str, off: u64| -> Result<(), DiskProbeError> {
        if off == 0 || !off.is_multiple_of(cluster) || off >= file_len {
            return Err(DiskProbeError::Corrupt(format!(
                "{name} offset {off:#x} is not a cluster inside the file"
            )));
        }
        Ok(())
    };
    check_table("refcount table", refcount_off)?;
    if l1_size > 0 {
        check_table("L1 table", l1_off)?;
    }
    if backing_off == 0 {
        return Ok(None);
    }
    if backing_len == 0
        || backing_len > 1023
        || backing_off.saturating_add(u64::from(backing_len)) > file_len
    {
        return corrupt("backing file name out of bounds".into());
    }
    Ok(Some((backing_off, backing_len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u32, cluster_bits: u32, l1: u64, refc: u64) -> Vec<u8> {
        let mut h = vec![0u8; QCOW2_HEADER_LEN];
        h[..4].copy_from_slice(&QCOW2_MAGIC);
        h[4..8].copy_from_slice(&version.to_be_bytes());
        h[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        h[36..40].copy_from_slice(&1u32.to_be_bytes());
        h[40..48].copy_from_slice(&l1.to_be_bytes());
        h[48..56].copy_from_slice(&refc.to_be_bytes());
        h
    }

    #[test]
    fn good_header_passes() {
        let h = header(3, 16, 0x30000, 0x10000);
        assert!(check_qcow2_header(&h, 0x50000).unwrap().is_none());
    }

    #[test]
    fn bad_headers_fail() {
        assert!(check_qcow2_header(&header(7, 16, 0x30000, 0x10000), 0x50000).is_err());
        assert!(check_qcow2_header(&header(3, 40, 0x30000, 0x10000), 0x50000).is_err());
        assert!(check_qcow2_header(&header(3, 16, 0x31234, 0x10000), 0x50000).is_err());
        assert!(check_qcow2_header(&header(3, 16, 0x30000, 0x90000), 0x50000).is_err());
        assert!(check_qcow2_header(&header(3, 16, 0x30000, 0x10000)[..40], 0x50000).is_err());
    }

    #[test]
    fn files() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.qcow2"); // the name lies: content decides
        std::fs::write(&raw, vec![1u8; 4096]).unwrap();
        assert_eq!(
            probe_disk_format(&raw, true, false).unwrap(),
            DiskFormat::Raw
        );
        let bad = dir.path().join("bad.img");
        let mut b = QCOW2_MAGIC.to_vec();
        b.extend_from_slice(&[0xff; 200]);
        std::fs::write(&bad, b).unwrap();
        assert!(matches!(
            probe_disk_format(&bad, true, false),
            Err(DiskProbeError::Corrupt(_))
        ));
        let empty = dir.path().join("empty.img");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            probe_disk_format(&empty, true, false),
            Err(DiskProbeError::Empty)
        ));
        assert!(matches!(
            probe_disk_format(&dir.path().join("missing"), true, false),
            Err(DiskProbeError::NotFound)
        ));
        assert!(matches!(
            probe_disk_format(dir.path(), true, false),
            Err(DiskProbeError::NotAFile)
        ));
    }

    #[test]
    fn random_headers_never_panic() {
        let mut seed: u64 = 42;
        for _ in 0..20000 {
            let mut h = header(3, 16, 0x30000, 0x10000);
            for b in h.iter_mut().skip(4) {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if seed >> 60 == 0 {
                    *b = (seed >> 24) as u8;
                }
            }
            let _ = check_qcow2_header(&h, seed >> 40);
        }
    }
}
