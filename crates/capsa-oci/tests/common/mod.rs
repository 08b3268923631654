//! Layer tars built by the tests, including hostile ones the `tar` crate's safe API refuses to write.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use sha2::Digest as _;

/// One tar entry to write.
pub enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, u32, &'a [u8]),
    /// File with explicit uid/gid.
    Owned(&'a str, u32, u32, u32, &'a [u8]),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    CharDev(&'a str, u32, u32),
    Fifo(&'a str),
    /// A file whose name goes in via a PAX `path` record (any length, any bytes).
    PaxPath(&'a str, &'a [u8]),
    /// A file with PAX records (e.g. `SCHILY.xattr.user.x`).
    PaxFile(&'a str, Vec<(&'a str, &'a [u8])>, &'a [u8]),
    /// A raw PAX header of this many bytes (to test the header bound).
    HugePax(usize),
}

fn header(
    kind: tar::EntryType,
    name: &[u8],
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    // Raw name bytes: the safe setter refuses `..` and absolute paths, which we need to test.
    let n = &mut h.as_old_mut().name;
    n.fill(0);
    n[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_size(size);
    h.set_mtime(1_600_000_000);
    h.set_cksum();
    h
}

fn pax_records(recs: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in recs {
        let body_len = 1 + k.len() + 1 + v.len() + 1;
        let mut len = body_len + 1;
        while format!("{len}").len() + body_len != len {
            len += 1;
        }
        out.extend_from_slice(format!("{len} {k}=").as_bytes());
        out.extend_from_slice(v);
        out.push(b'\n');
    }
    out
}

fn append_pax(b: &mut tar::Builder<Vec<u8>>, recs: &[(&str, &[u8])]) {
    let data = pax_records(recs);
    let h = header(
        tar::EntryType::XHeader,
        b"././@PaxHeader",
        0o644,
        0,
        0,
        data.len() as u64,
    );
    b.append(&h, &data[..]).unwrap();
}

/// An uncompressed layer tar.
pub fn layer(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            E::Dir(p, m) => b
                .append(
                    &header(tar::EntryType::Directory, p.as_bytes(), *m, 0, 0, 0),
                    &[][..],
                )
                .unwrap(),
            E::File(p, m, d) => {
                if p.len() > 99 {
                    // GNU long name through the crate's own writer.
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*m);
                    h.set_size(d.len() as u64);
                    h.set_mtime(1_600_000_000);
                    b.append_data(&mut h, p, *d).unwrap();
                } else {
                    b.append(
                        &header(
                            tar::EntryType::Regular,
                            p.as_bytes(),
                            *m,
                            0,
                            0,
                            d.len() as u64,
                        ),
                        *d,
                    )
                    .unwrap()
                }
            }
            E::Owned(p, m, u, g, d) => b
                .append(
                    &header(
                        tar::EntryType::Regular,
                        p.as_bytes(),
                        *m,
                        *u as u64,
                        *g as u64,
                        d.len() as u64,
                    ),
                    *d,
                )
                .unwrap(),
            E::Symlink(p, t) | E::Hardlink(p, t) => {
                let kind = if matches!(e, E::Symlink(..)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                };
                let mut h = header(kind, p.as_bytes(), 0o777, 0, 0, 0);
                let l = &mut h.as_old_mut().linkname;
                l.fill(0);
                l[..t.len()].copy_from_slice(t.as_bytes());
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            E::CharDev(p, maj, min) => {
                let mut h = header(tar::EntryType::Char, p.as_bytes(), 0o666, 0, 0, 0);
                h.set_device_major(*maj).unwrap();
                h.set_device_minor(*min).unwrap();
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            E::Fifo(p) => b
                .append(
                    &header(tar::EntryType::Fifo, p.as_bytes(), 0o644, 0, 0, 0),
                    &[][..],
                )
                .unwrap(),
            E::PaxPath(p, d) => {
                append_pax(&mut b, &[("path", p.as_bytes())]);
                b.append(
                    &header(
                        tar::EntryType::Regular,
                        b"placeholder",
                        0o644,
                        0,
                        0,
                        d.len() as u64,
                    ),
                    *d,
                )
                .unwrap();
            }
            E::PaxFile(p, recs, d) => {
                append_pax(&mut b, recs);
                b.append(
                    &header(
                        tar::EntryType::Regular,
                        p.as_bytes(),
                        0o644,
                        0,
                        0,
                        d.len() as u64,
                    ),
                    *d,
                )
                .unwrap();
            }
            E::HugePax(n) => {
                let v = vec![b'a'; *n];
                append_pax(&mut b, &[("comment", &v)]);
                b.append(
                    &header(tar::EntryType::Regular, b"after-huge", 0o644, 0, 0, 0),
                    &[][..],
                )
                .unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn sha256_hex(data: &[u8]) -> String {
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A file-by-file description of a tree: path -> "kind mode uid:gid content-or-target".
pub fn describe(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for ent in std::fs::read_dir(&d).unwrap() {
            let p = ent.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let ft = m.file_type();
            let what = if ft.is_symlink() {
                format!("link -> {}", std::fs::read_link(&p).unwrap().display())
            } else if ft.is_dir() {
                stack.push(p.clone());
                format!("dir {:o} {}:{}", m.mode() & 0o7777, m.uid(), m.gid())
            } else if ft.is_file() {
                format!(
                    "file {:o} {}:{} nlink={} {:?}",
                    m.mode() & 0o7777,
                    m.uid(),
                    m.gid(),
                    m.nlink(),
                    String::from_utf8_lossy(&std::fs::read(&p).unwrap())
                )
            } else {
                format!("other {:o}", m.mode())
            };
            out.insert(rel, what);
        }
    }
    out
}

pub fn is_root() -> bool {
    // SAFETY-free: read our euid from /proc.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}
