//! A small writer for the `newc` cpio format the kernel unpacks as initramfs.
//!
//! Entries are collected in a [`Tree`] keyed by path and written sorted, so
//! parents precede children and the same contents always give the same bytes
//! (fixed mtime 0, uid/gid 0, inode numbers in path order).

use std::collections::BTreeMap;
use std::io::{self, Write};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
const TRAILER: &str = "TRAILER!!!";

/// One entry of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Node {
    /// A directory with permission bits.
    Dir { mode: u32 },
    /// A regular file with permission bits and contents.
    File { mode: u32, data: Vec<u8> },
    /// A symbolic link.
    Symlink { target: String },
    /// A character device node.
    CharDev { mode: u32, major: u32, minor: u32 },
}

/// Why a path cannot go into the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PathError(pub String);

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Normalizes a guest path to the archive form (`bin/sh`, no leading `/`).
pub(crate) fn archive_path(path: &str) -> Result<String, PathError> {
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(PathError(format!("{path:?} contains `..`"))),
            p if p.contains('\0') => return Err(PathError(format!("{path:?} contains NUL"))),
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err(PathError(format!("{path:?} names the root directory")));
    }
    Ok(parts.join("/"))
}

/// The file tree of an initramfs, built in memory.
#[derive(Debug, Default, Clone)]
pub(crate) struct Tree {
    nodes: BTreeMap<String, Node>,
}

impl Tree {
    /// An empty tree.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) `path`, creating missing parent directories (0755).
    /// Fails if a parent is not a directory or a directory would be replaced.
    pub(crate) fn insert(&mut self, path: &str, node: Node) -> Result<(), PathError> {
        let path = archive_path(path)?;
        let mut parent = String::new();
        for part in path
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map(|(_, p)| p)
            .unwrap_or(&[])
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            match self.nodes.get(&parent) {
                None => {
                    self.nodes.insert(parent.clone(), Node::Dir { mode: 0o755 });
                }
                Some(Node::Dir { .. }) => {}
                Some(_) => return Err(PathError(format!("/{parent} is not a directory"))),
            }
        }
        match (self.nodes.get(&path), &node) {
            (Some(Node::Dir { .. }), Node::Dir { .. }) => {}
            (Some(Node::Dir { .. }), _) => {
                return Err(PathError(format!("/{path} is a directory")));
            }
            _ => {}
        }
        self.nodes.insert(path, node);
        Ok(())
    }

    /// Adds a directory (keeps an existing one, updating its mode).
    pub(crate) fn dir(&mut self, path: &str, mode: u32) -> Result<(), PathError> {
        self.insert(path, Node::Dir { mode })
    }

    /// Adds a regular file.
    pub(crate) fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> Result<(), PathError> {
        self.insert(path, Node::File { mode, data })
    }

    /// Adds a symlink.
    pub(crate) fn symlink(&mut self, path: &str, target: &str) -> Result<(), PathError> {
        self.insert(
            path,
            Node::Symlink {
                target: target.to_string(),
            },
        )
    }

    /// Whether `path` exists.
    pub(crate) fn contains(&self, path: &str) -> bool {
        archive_path(path)
            .map(|p| self.nodes.contains_key(&p))
            .unwrap_or(false)
    }

    /// The entry at `path`.
    #[cfg(test)]
    pub(crate) fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(&archive_path(path).ok()?)
    }

    /// Writes the archive (sorted, deterministic) and returns the writer.
    pub(crate) fn write<W: Write>(&self, out: W) -> io::Result<W> {
        let mut w = Writer { out, written: 0 };
        for (ino, (path, node)) in self.nodes.iter().enumerate() {
            let ino = ino as u32 + 1;
            match node {
                Node::Dir { mode } => {
                    w.entry(path, ino, S_IFDIR | (mode & 0o7777), 2, (0, 0), &[])?
                }
                Node::File { mode, data } => {
                    w.entry(path, ino, S_IFREG | (mode & 0o7777), 1, (0, 0), data)?
                }
                Node::Symlink { target } => {
                    w.entry(path, ino, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())?
                }
                Node::CharDev { mode, major, minor } => w.entry(
                    path,
                    ino,
                    S_IFCHR | (mode & 0o7777),
                    1,
                    (*major, *minor),
                    &[],
                )?,
            }
        }
        w.entry(TRAILER, 0, 0, 1, (0, 0), &[])?;
        Ok(w.out)
    }
}

struct Writer<W> {
    out: W,
    written: u64,
}

impl<W: Write> Writer<W> {
    fn entry(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: larger than 4 GiB"),
            )
        })?;
        let header = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
             {maj:08x}{min:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = 0,
            maj = 0,
            min = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            namesize = name.len() + 1,
            check = 0,
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }
}

/// One entry read back: name, mode, data, (rdev major, minor).
#[cfg(test)]
pub(crate) type ReadEntry = (String, u32, Vec<u8>, (u32, u32));

/// Reads a `newc` archive back (tests, and checking what was written).
#[cfg(test)]
pub(crate) fn read(archive: &[u8]) -> Result<Vec<ReadEntry>, String> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    let hex = |b: &[u8]| -> Result<u32, String> {
        u32::from_str_radix(std::str::from_utf8(b).map_err(|e| e.to_string())?, 16)
            .map_err(|e| e.to_string())
    };
    loop {
        let h = archive.get(pos..pos + 110).ok_or("truncated header")?;
        if &h[..6] != b"070701" {
            return Err(format!("bad magic at {pos}"));
        }
        let field = |i: usize| hex(&h[6 + i * 8..14 + i * 8]);
        let (mode, size, rmaj, rmin, namesize) = (
            field(1)?,
            field(6)? as usize,
            field(9)?,
            field(10)?,
            field(11)? as usize,
        );
        let name_start = pos + 110;
        let name = archive
            .get(name_start..name_start + namesize - 1)
            .ok_or("truncated name")?;
        let name = String::from_utf8(name.to_vec()).map_err(|e| e.to_string())?;
        let data_start = (name_start + namesize + 3) & !3;
        let data = archive
            .get(data_start..data_start + size)
            .ok_or("truncated data")?
            .to_vec();
        pos = (data_start + size + 3) & !3;
        if name == TRAILER {
            return Ok(out);
        }
        out.push((name, mode, data, (rmaj, rmin)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Tree {
        let mut t = Tree::new();
        t.file("/init", 0o755, b"#!init".to_vec()).unwrap();
        t.file("/bin/busybox", 0o755, vec![7u8; 1001]).unwrap();
        t.symlink("/bin/sh", "busybox").unwrap();
        t.dir("/proc", 0o555).unwrap();
        t.dir("/tmp", 0o1777).unwrap();
        t.insert(
            "/dev/console",
            Node::CharDev {
                mode: 0o600,
                major: 5,
                minor: 1,
            },
        )
        .unwrap();
        t.file("etc/capsa/modules.load", 0o644, b"kernel/a.ko\n".to_vec())
            .unwrap();
        t
    }

    #[test]
    fn round_trip() {
        let bytes = sample().write(Vec::new()).unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let entries = read(&bytes).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/busybox",
                "bin/sh",
                "dev",
                "dev/console",
                "etc",
                "etc/capsa",
                "etc/capsa/modules.load",
                "init",
                "proc",
                "tmp"
            ]
        );
        let get = |n: &str| entries.iter().find(|e| e.0 == n).unwrap();
        assert_eq!(get("bin/busybox").2, vec![7u8; 1001]);
        assert_eq!(get("bin/busybox").1, 0o100755);
        assert_eq!(get("bin/sh").1, 0o120777);
        assert_eq!(get("bin/sh").2, b"busybox");
        assert_eq!(get("tmp").1, 0o041777);
        assert_eq!(get("dev/console").1, 0o020600);
        assert_eq!(get("dev/console").3, (5, 1));
        assert_eq!(get("etc").1, 0o040755, "implicit parents are 0755 dirs");
    }

    #[test]
    fn deterministic() {
        let a = sample().write(Vec::new()).unwrap();
        let mut t = Tree::new();
        // Same content, different insertion order.
        t.file("etc/capsa/modules.load", 0o644, b"kernel/a.ko\n".to_vec())
            .unwrap();
        t.dir("/tmp", 0o1777).unwrap();
        t.insert(
            "/dev/console",
            Node::CharDev {
                mode: 0o600,
                major: 5,
                minor: 1,
            },
        )
        .unwrap();
        t.symlink("/bin/sh", "busybox").unwrap();
        t.file("/bin/busybox", 0o755, vec![7u8; 1001]).unwrap();
        t.dir("/proc", 0o555).unwrap();
        t.file("/init", 0o755, b"#!init".to_vec()).unwrap();
        assert_eq!(a, t.write(Vec::new()).unwrap());
    }

    #[test]
    fn system_cpio_reads_it() {
        let Ok(status) = std::process::Command::new("cpio").arg("--version").output() else {
            eprintln!("cpio not installed; skipping the cross-check");
            return;
        };
        assert!(status.status.success());
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.cpio");
        std::fs::write(&archive, sample().write(Vec::new()).unwrap()).unwrap();
        let out = std::process::Command::new("cpio")
            .args(["-i", "-t", "-F"])
            .arg(&archive)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8_lossy(&out.stdout);
        assert_eq!(listing.lines().count(), 11, "{listing}");
        assert!(listing.lines().any(|l| l == "etc/capsa/modules.load"));
    }

    #[test]
    fn path_rules() {
        let mut t = Tree::new();
        assert!(t.file("/a/../b", 0o644, vec![]).is_err());
        assert!(t.file("/", 0o644, vec![]).is_err());
        t.file("/x", 0o644, vec![]).unwrap();
        assert!(t.file("/x/y", 0o644, vec![]).is_err(), "parent is a file");
        t.dir("/d", 0o755).unwrap();
        assert!(
            t.file("/d", 0o644, vec![]).is_err(),
            "cannot replace a directory"
        );
        t.file("/x", 0o600, b"new".to_vec()).unwrap();
        assert_eq!(
            t.get("x"),
            Some(&Node::File {
                mode: 0o600,
                data: b"new".to_vec()
            })
        );
        assert_eq!(archive_path("//a/./b/").unwrap(), "a/b");
    }
}
