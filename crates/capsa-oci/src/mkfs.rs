//! Converting a staged tree into a read-only, byte-reproducible filesystem image.
//!
//! Both converters read ownership, modes, mtimes and xattrs from the staged tree (`stat`), so the
//! tree must carry the tar's uid/gid: [`crate::Stager`] chowns when running as root. Unprivileged,
//! every file is owned by the host user and the image maps it to root (`--all-root` for EROFS,
//! debugfs for ext4).
//!
//! Reproducibility: a fixed UUID (derived from the image digest) and timestamp, plus
//! - ext4: `E2FSPROGS_FAKE_TIME`, a fixed `hash_seed`, and a debugfs pass setting every used
//!   inode's atime/ctime (mkfs.ext4 -d copies the host's ctime, which nobody can set) to the fixed time;
//! - EROFS (erofs-utils 1.5): `-T` would overwrite every file's mtime (and Python's .pyc checks need
//!   them), so mkfs.erofs runs without it and the superblock build time is patched afterwards with its
//!   crc32c recomputed.
//!
//! The staged tree's directory order comes from the host filesystem, so "the same input" means the
//! same image converted in the same store.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::error::OciError;

/// A read-only root filesystem format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FsFormat {
    /// ext4 without a journal (`mkfs.ext4 -d`, e2fsprogs).
    Ext4,
    /// Uncompressed EROFS (`mkfs.erofs`, erofs-utils): the default (smaller and faster to make).
    #[default]
    Erofs,
    /// EROFS with lz4hc compression: much smaller, much slower to make.
    ErofsLz4hc,
}

impl FsFormat {
    /// File extension in the store.
    pub fn ext(self) -> &'static str {
        match self {
            FsFormat::Ext4 => "ext4",
            FsFormat::Erofs => "erofs",
            FsFormat::ErofsLz4hc => "erofs-lz4hc",
        }
    }
    /// Parses `ext4`, `erofs` or `erofs-lz4hc`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ext4" => Some(FsFormat::Ext4),
            "erofs" => Some(FsFormat::Erofs),
            "erofs-lz4hc" => Some(FsFormat::ErofsLz4hc),
            _ => None,
        }
    }
}

/// Options for one conversion.
#[derive(Debug, Clone)]
pub struct MkfsOptions {
    /// Target format.
    pub format: FsFormat,
    /// Filesystem UUID (also the ext4 directory hash seed).
    pub uuid: [u8; 16],
    /// Timestamp of the superblock (and ext4 atime/ctime).
    pub timestamp: u64,
    /// Whether the staged tree carries the image's ownership; if not, everything becomes root's.
    pub ownership_preserved: bool,
}

/// A built filesystem image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FsImage {
    /// Where it is.
    pub path: PathBuf,
    /// Its format.
    pub format: FsFormat,
    /// Apparent size in bytes (the block device size).
    pub size: u64,
    /// Bytes actually allocated on the host (the ext4 image is sparse).
    pub allocated: u64,
}

fn uuid_str(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A UUID derived from a digest (random-version bits set, so tools accept it).
pub fn uuid_from(bytes: &[u8]) -> [u8; 16] {
    let mut u = [0u8; 16];
    for (i, b) in bytes.iter().take(16).enumerate() {
        u[i] = *b;
    }
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

fn run(tool: &'static str, package: &'static str, cmd: &mut Command) -> Result<Vec<u8>, OciError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => OciError::ToolMissing { tool, package },
            _ => OciError::io("running", tool, e),
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: String = err
            .chars()
            .rev()
            .take(2000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return Err(OciError::ToolFailed {
            tool,
            status: out.status.to_string(),
            stderr: tail.trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// Finds a tool in PATH or the sbin directories (often not in a user's PATH on Debian).
fn tool_path(name: &'static str) -> PathBuf {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from(name)
}

/// Builds a filesystem image of `tree` at `out` (overwritten).
pub fn build(tree: &Path, out: &Path, opts: &MkfsOptions) -> Result<FsImage, OciError> {
    let _ = fs::remove_file(out);
    match opts.format {
        FsFormat::Ext4 => build_ext4(tree, out, opts)?,
        FsFormat::Erofs | FsFormat::ErofsLz4hc => build_erofs(tree, out, opts)?,
    }
    let m = fs::metadata(out).map_err(|e| OciError::io("reading", out, e))?;
    Ok(FsImage {
        path: out.to_path_buf(),
        format: opts.format,
        size: m.len(),
        allocated: m.blocks() * 512,
    })
}

/// Inodes and 4 KiB blocks a tree needs, without following symlinks.
fn tree_usage(tree: &Path) -> Result<(u64, u64), OciError> {
    let mut seen = HashSet::new();
    let mut blocks = 0u64;
    let mut stack = vec![tree.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for ent in fs::read_dir(&dir).map_err(|e| OciError::io("reading", &dir, e))? {
            let ent = ent.map_err(|e| OciError::io("reading", &dir, e))?;
            let m = ent
                .metadata()
                .map_err(|e| OciError::io("stat", ent.path(), e))?;
            if !seen.insert(m.ino()) {
                continue;
            }
            if m.is_dir() {
                blocks += 1 + m.len() / 4096;
                stack.push(ent.path());
            } else if m.is_file() || m.file_type().is_symlink() {
                blocks += m.len().div_ceil(4096);
            }
        }
    }
    Ok((seen.len() as u64, blocks))
}

fn build_ext4(tree: &Path, out: &Path, opts: &MkfsOptions) -> Result<(), OciError> {
    let (inodes, blocks) = tree_usage(tree)?;
    let n_inodes = inodes + 64;
    // Data + 10% + inode tables + a little for bitmaps/descriptors/extent trees.
    let bytes = blocks * 4096 * 11 / 10 + n_inodes * 256 + n_inodes * 64 + (16 << 20);
    let bytes = bytes.div_ceil(4096) * 4096;
    let uuid = uuid_str(&opts.uuid);
    run(
        "mkfs.ext4",
        "e2fsprogs",
        Command::new(tool_path("mkfs.ext4"))
            .env("E2FSPROGS_FAKE_TIME", opts.timestamp.to_string())
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-b",
                "4096",
                "-I",
                "256",
                "-m",
                "0",
                "-L",
                "capsa-root",
            ])
            .args(["-O", "^has_journal,^resize_inode"])
            .arg("-N")
            .arg(n_inodes.to_string())
            .arg("-U")
            .arg(&uuid)
            .arg("-E")
            .arg(format!(
                "hash_seed={uuid},lazy_itable_init=0,lazy_journal_init=0,nodiscard,root_owner=0:0"
            ))
            .arg("-d")
            .arg(tree)
            .arg(out)
            .arg(format!("{}k", bytes / 1024)),
    )?;
    // Which inodes are in use: ask debugfs rather than guess the allocator.
    let mut probe = String::new();
    for ino in 1..=n_inodes {
        probe.push_str(&format!("testi <{ino}>\n"));
    }
    let used = debugfs(out, &probe, false, opts.timestamp)?;
    let mut fix = String::new();
    let t = opts.timestamp;
    for line in used.lines() {
        // "Inode 12 is marked in use"
        let Some(rest) = line.strip_prefix("Inode ") else {
            continue;
        };
        if !rest.ends_with("is marked in use") {
            continue;
        }
        let Some(ino) = rest
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if ino != 2 && ino < 11 {
            continue; // Reserved inodes are mkfs's own, already deterministic.
        }
        for f in ["atime", "ctime"] {
            fix.push_str(&format!("sif <{ino}> {f} {t}\nsif <{ino}> {f}_extra 0\n"));
        }
        if !opts.ownership_preserved {
            fix.push_str(&format!("sif <{ino}> uid 0\nsif <{ino}> gid 0\nsif <{ino}> uid_high 0\nsif <{ino}> gid_high 0\n"));
        }
    }
    debugfs(out, &fix, true, opts.timestamp)?;
    Ok(())
}

fn debugfs(image: &Path, script: &str, write: bool, time: u64) -> Result<String, OciError> {
    let dir = tempfile::tempdir().map_err(|e| OciError::io("creating a temp dir", "/tmp", e))?;
    let sp = dir.path().join("script");
    fs::write(&sp, script).map_err(|e| OciError::io("writing", &sp, e))?;
    let mut cmd = Command::new(tool_path("debugfs"));
    // Else closing the filesystem stamps the superblock's write time with the clock.
    cmd.env("E2FSPROGS_FAKE_TIME", time.to_string());
    if write {
        cmd.arg("-w");
    }
    cmd.arg("-f").arg(&sp).arg(image);
    let out = run("debugfs", "e2fsprogs", &mut cmd)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn build_erofs(tree: &Path, out: &Path, opts: &MkfsOptions) -> Result<(), OciError> {
    let mut cmd = Command::new(tool_path("mkfs.erofs"));
    cmd.env_remove("SOURCE_DATE_EPOCH")
        .arg("--quiet")
        .arg(format!("-U{}", uuid_str(&opts.uuid)));
    if opts.format == FsFormat::ErofsLz4hc {
        cmd.arg("-zlz4hc");
    }
    if !opts.ownership_preserved {
        cmd.arg("--all-root");
    }
    cmd.arg(out).arg(tree);
    run("mkfs.erofs", "erofs-utils", &mut cmd)?;
    patch_erofs_build_time(out, opts.timestamp)
}

const EROFS_SB: u64 = 1024;
const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
const EROFS_FEATURE_COMPAT_SB_CHKSUM: u32 = 1;

/// crc32c (Castagnoli), reflected, without the final inversion: what EROFS stores.
fn erofs_crc32c(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    crc
}

fn patch_erofs_build_time(img: &Path, t: u64) -> Result<(), OciError> {
    let io = |e| OciError::io("patching the EROFS superblock of", img, e);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .map_err(io)?;
    let mut head = [0u8; 64];
    f.seek(SeekFrom::Start(EROFS_SB)).map_err(io)?;
    f.read_exact(&mut head).map_err(io)?;
    let le32 = |o: usize| u32::from_le_bytes([head[o], head[o + 1], head[o + 2], head[o + 3]]);
    if le32(0) != EROFS_MAGIC {
        return Err(OciError::ToolFailed {
            tool: "mkfs.erofs",
            status: "success".into(),
            stderr: "output has no EROFS superblock".into(),
        });
    }
    let blksz = 1usize << head[12].min(16);
    let mut sb = vec![0u8; blksz.saturating_sub(EROFS_SB as usize)];
    f.seek(SeekFrom::Start(EROFS_SB)).map_err(io)?;
    f.read_exact(&mut sb).map_err(io)?;
    let has_csum = le32(8) & EROFS_FEATURE_COMPAT_SB_CHKSUM != 0;
    let csum = |sb: &mut [u8]| {
        sb[4..8].copy_from_slice(&[0; 4]);
        erofs_crc32c(!0, sb)
    };
    if has_csum {
        // Check our checksum agrees with mkfs.erofs before rewriting it.
        let stored = le32(4);
        let mut copy = sb.clone();
        if csum(&mut copy) != stored {
            return Err(OciError::ToolFailed {
                tool: "mkfs.erofs",
                status: "success".into(),
                stderr: "unexpected superblock checksum scheme; cannot make the image reproducible"
                    .into(),
            });
        }
    }
    sb[24..32].copy_from_slice(&t.to_le_bytes());
    sb[32..36].copy_from_slice(&0u32.to_le_bytes());
    if has_csum {
        let c = csum(&mut sb);
        sb[4..8].copy_from_slice(&c.to_le_bytes());
    }
    f.seek(SeekFrom::Start(EROFS_SB)).map_err(io)?;
    f.write_all(&sb).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(())
}
