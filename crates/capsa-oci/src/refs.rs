//! Is a cached file still in use? A conservative answer for pruning.
//!
//! Something "uses" a bundle or a root filesystem image when its path or id appears in a running
//! process (command line or open file descriptors: QEMU holds its kernel, initrd and disks) or in
//! a small file under a state root (sandbox records, snapshot metadata, base snapshots). When a
//! scan cannot finish (too many files, unreadable entries) the answer is "in use": pruning keeps
//! what it cannot rule out.

use std::path::{Path, PathBuf};

/// Largest file read while scanning state roots.
const MAX_FILE: u64 = 1 << 20;
/// Most files looked at per scan.
const MAX_FILES: usize = 50_000;
/// Deepest directory descended into.
const MAX_DEPTH: usize = 8;

/// For each needle, whether it appears anywhere in `roots` or in a running process.
/// If the scan was incomplete, every needle counts as found.
pub fn in_use(needles: &[String], roots: &[PathBuf]) -> Vec<bool> {
    let mut found = vec![false; needles.len()];
    let mut budget = MAX_FILES;
    let mut complete = true;
    let check = |text: &[u8], found: &mut Vec<bool>| {
        for (i, n) in needles.iter().enumerate() {
            if !found[i] && !n.is_empty() && contains(text, n.as_bytes()) {
                found[i] = true;
            }
        }
    };
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for ent in rd.flatten() {
            let pid = ent.path();
            if !ent
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                continue;
            }
            if let Ok(cmd) = std::fs::read(pid.join("cmdline")) {
                check(&cmd, &mut found);
            }
            if let Ok(fds) = std::fs::read_dir(pid.join("fd")) {
                for fd in fds.flatten().take(4096) {
                    if let Ok(t) = std::fs::read_link(fd.path()) {
                        check(t.as_os_str().as_encoded_bytes(), &mut found);
                    }
                }
            }
        }
    } else {
        complete = false;
    }
    for root in roots {
        if !scan(root, 0, &mut budget, &mut |t| check(t, &mut found)) {
            tracing::warn!(root = %root.display(), "cannot scan all of it; keeping everything it might use");
            complete = false;
        }
    }
    if !complete {
        return vec![true; needles.len()];
    }
    found
}

/// Walks `dir`; returns false if the walk was cut short.
fn scan(dir: &Path, depth: usize, budget: &mut usize, check: &mut dyn FnMut(&[u8])) -> bool {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return true,
        Err(_) => return false,
    };
    if depth > MAX_DEPTH {
        return false;
    }
    let mut ok = true;
    for ent in rd {
        let Ok(ent) = ent else { return false };
        if *budget == 0 {
            return false;
        }
        *budget -= 1;
        let p = ent.path();
        let Ok(ft) = ent.file_type() else {
            return false;
        };
        check(p.as_os_str().as_encoded_bytes());
        if ft.is_symlink() {
            if let Ok(t) = std::fs::read_link(&p) {
                check(t.as_os_str().as_encoded_bytes());
            }
        } else if ft.is_dir() {
            ok &= scan(&p, depth + 1, budget, check);
        } else if ft.is_file() {
            // Large files are memory images and disks, not metadata: their names were checked.
            if ent.metadata().is_ok_and(|m| m.len() <= MAX_FILE) {
                if let Ok(b) = std::fs::read(&p) {
                    check(&b);
                }
            }
        }
    }
    ok
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.len() <= hay.len() && hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_paths_in_state_files_and_processes() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::write(
            d.path().join("a/b/meta.json"),
            b"{\"rootfs\":\"/x/rootfs/abc.erofs\"}",
        )
        .unwrap();
        let me = std::env::current_exe()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let r = in_use(
            &[
                "/x/rootfs/abc.erofs".into(),
                "/x/rootfs/zzz.erofs".into(),
                me,
            ],
            &[d.path().to_path_buf(), d.path().join("absent")],
        );
        assert_eq!(r, vec![true, false, true]);
    }
}
