//! Hostile and ordinary layer tars applied by `Stager`, checked file by file.

mod common;

use std::os::unix::fs::MetadataExt;

use capsa_oci::{Compression, Limits, OciError, Stager};
use common::{describe, gzip, is_root, layer, E};

const LONG: &str = "very/long/path/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb/file.txt";

#[test]
fn layers_apply_with_whiteouts_links_and_hostile_entries_confined() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    let outside = work.path().join("outside");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let sentinel = outside.join("sentinel");
    std::fs::write(&sentinel, "host file").unwrap();
    let outside_s = outside.to_str().unwrap().to_string();
    let sentinel_s = sentinel.to_str().unwrap().to_string();
    let escape_target = format!("/../../../../..{outside_s}");
    let pax_long = format!("pax/{}/{}/end.txt", "p".repeat(200), "q".repeat(200));

    let l1 = layer(&[
        E::Dir("./", 0o755),
        E::Dir("etc/", 0o755),
        E::File("etc/passwd", 0o644, b"root:x:0:0::/root:/bin/sh\n"),
        E::Owned("etc/owned", 0o640, 1234, 5678, b"owned"),
        E::File("etc/suid", 0o4755, b"suid"),
        E::File("usr/bin/tool", 0o755, b"tool-v1"),
        E::Dir("usr/lib/", 0o755),
        E::Symlink("lib", "usr/lib"),
        E::File("gone/a", 0o644, b"a"),
        E::File("gone/b", 0o644, b"b"),
        E::File("opq/old1", 0o644, b"old1"),
        E::File("opq/sub/old2", 0o644, b"old2"),
        E::File("opq/keep-dir/old3", 0o644, b"old3"),
        E::File("wh_me", 0o644, b"x"),
        E::File("data/orig", 0o644, b"shared"),
        E::Symlink("escape", &escape_target),
        E::Symlink("clobber", &sentinel_s),
        E::Symlink("dotdot-link", "../../../../.."),
        E::CharDev("dev/null", 1, 3),
        E::Fifo("run/fifo"),
        E::File("../escaped-dotdot", 0o644, b"evil"),
        E::File("a/../../escaped-dotdot2", 0o644, b"evil"),
        E::File("/abs/file", 0o644, b"absolute"),
        E::File(LONG, 0o644, b"gnu long name"),
        E::PaxPath(&pax_long, b"pax long name"),
        E::PaxPath("../pax-escape", b"evil"),
        E::PaxFile(
            "xattr-file",
            vec![("SCHILY.xattr.user.capsa", b"hello")],
            b"with xattr",
        ),
    ]);
    let l2 = layer(&[
        E::File(".wh.gone", 0o644, b""),
        E::File("opq/new", 0o644, b"new"),
        E::File("opq/.wh..wh..opq", 0o644, b""),
        E::File("opq/keep-dir/new3", 0o644, b"new3"),
        E::File(".wh.wh_me", 0o644, b""),
        E::File("same", 0o644, b"same layer"),
        E::File(".wh.same", 0o644, b""),
        E::Hardlink("data/link", "data/orig"),
        E::Hardlink("hl-abs", "/etc/passwd"),
        E::Hardlink("hl-out", "../../../../etc/passwd"),
        E::Hardlink("hl-host", sentinel_s.trim_start_matches('/')),
        E::File("escape/newfile", 0o644, b"through the escape link"),
        E::File("dotdot-link/x", 0o644, b"via dotdot link"),
        E::File("clobber", 0o600, b"pwned?"),
        E::File("lib/libx.so", 0o755, b"through lib symlink"),
        E::File("usr/bin/tool", 0o755, b"tool-v2"),
        E::File("etc/.wh.does-not-exist", 0o644, b""),
    ]);

    let mut st = Stager::new(&root, Limits::default()).unwrap();
    st.apply_layer(&gzip(&l1)[..], Compression::Gzip, "layer1")
        .unwrap();
    st.apply_layer(&l2[..], Compression::None, "layer2")
        .unwrap();
    let report = st.finish().unwrap();

    let me = {
        let m = std::fs::metadata(&sentinel).unwrap();
        (m.uid(), m.gid())
    };
    let own = |u: u32, g: u32| {
        if is_root() {
            format!("{u}:{g}")
        } else {
            format!("{}:{}", me.0, me.1)
        }
    };
    let r = own(0, 0);
    let f =
        |mode: &str, o: &str, nlink: u32, c: &str| format!("file {mode} {o} nlink={nlink} {c:?}");
    let d = |mode: &str| format!("dir {mode} {r}");
    let mut expected: Vec<(String, String)> = vec![
        ("etc".into(), d("755")),
        (
            "etc/passwd".into(),
            f("644", &r, 2, "root:x:0:0::/root:/bin/sh\n"),
        ),
        (
            "hl-abs".into(),
            f("644", &r, 2, "root:x:0:0::/root:/bin/sh\n"),
        ),
        ("etc/owned".into(), f("640", &own(1234, 5678), 1, "owned")),
        ("etc/suid".into(), f("4755", &r, 1, "suid")),
        ("usr".into(), d("755")),
        ("usr/bin".into(), d("755")),
        ("usr/bin/tool".into(), f("755", &r, 1, "tool-v2")),
        ("usr/lib".into(), d("755")),
        (
            "usr/lib/libx.so".into(),
            f("755", &r, 1, "through lib symlink"),
        ),
        ("lib".into(), "link -> usr/lib".into()),
        ("opq".into(), d("755")),
        ("opq/new".into(), f("644", &r, 1, "new")),
        ("opq/keep-dir".into(), d("755")),
        ("opq/keep-dir/new3".into(), f("644", &r, 1, "new3")),
        ("same".into(), f("644", &r, 1, "same layer")),
        ("data".into(), d("755")),
        ("data/orig".into(), f("644", &r, 2, "shared")),
        ("data/link".into(), f("644", &r, 2, "shared")),
        ("escape".into(), format!("link -> {escape_target}")),
        ("clobber".into(), f("600", &r, 1, "pwned?")),
        ("dotdot-link".into(), "link -> ../../../../..".into()),
        ("dotdot-link/x".into(), String::new()), // placeholder, removed below
        ("run".into(), d("755")),
        ("run/fifo".into(), "other 10644".into()),
        ("abs".into(), d("755")),
        ("abs/file".into(), f("644", &r, 1, "absolute")),
        ("xattr-file".into(), f("644", &r, 1, "with xattr")),
        ("x".into(), f("644", &r, 1, "via dotdot link")),
    ];
    // `dotdot-link` resolves to the root in-root, so `dotdot-link/x` lands at `/x`.
    expected.retain(|(k, _)| k != "dotdot-link/x");
    let mut dirs = String::new();
    for c in LONG.split('/').take(LONG.split('/').count() - 1) {
        dirs = if dirs.is_empty() {
            c.to_string()
        } else {
            format!("{dirs}/{c}")
        };
        expected.push((dirs.clone(), d("755")));
    }
    expected.push((LONG.into(), f("644", &r, 1, "gnu long name")));
    let mut dirs = String::new();
    for c in pax_long.split('/').take(3) {
        dirs = if dirs.is_empty() {
            c.to_string()
        } else {
            format!("{dirs}/{c}")
        };
        expected.push((dirs.clone(), d("755")));
    }
    expected.push((pax_long.clone(), f("644", &r, 1, "pax long name")));
    let expected: std::collections::BTreeMap<_, _> = expected.into_iter().collect();
    let got = describe(&root);
    for (k, v) in &expected {
        assert_eq!(got.get(k), Some(v), "entry {k}; whole tree: {got:#?}");
    }
    for k in got.keys() {
        assert!(
            expected.contains_key(k),
            "unexpected entry {k}: {:?}",
            got[k]
        );
    }

    // xattr kept.
    let mut buf = [0u8; 16];
    let n = rustix::fs::getxattr(root.join("xattr-file"), "user.capsa", &mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");

    // Nothing escaped: the host side is exactly as before.
    assert_eq!(std::fs::read_to_string(&sentinel).unwrap(), "host file");
    let mut host: Vec<_> = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    host.sort();
    assert_eq!(host, ["outside", "root"]);
    let outside_list: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(outside_list, ["sentinel"]);
    assert_eq!(
        std::fs::metadata(&sentinel).unwrap().nlink(),
        1,
        "no hardlink to a host file"
    );

    // Skips are reported by path and reason.
    let skipped: Vec<_> = report
        .skipped
        .iter()
        .map(|s| (s.path.as_str(), s.reason.as_str()))
        .collect();
    let has = |p: &str, why: &str| {
        skipped
            .iter()
            .any(|(sp, r)| sp.contains(p) && r.contains(why))
    };
    assert!(has("dev/null", "device node"), "{skipped:?}");
    assert!(has("../escaped-dotdot", "`..`"), "{skipped:?}");
    assert!(has("escaped-dotdot2", "`..`"), "{skipped:?}");
    assert!(has("../pax-escape", "`..`"), "{skipped:?}");
    assert!(has("hl-out", "hardlink target refused"), "{skipped:?}");
    assert!(has("hl-host", "does not exist"), "{skipped:?}");
    assert!(has("escape/newfile", "parent directory"), "{skipped:?}");
    assert_eq!(report.ownership_preserved, is_root());
}

#[test]
fn directory_mtimes_are_deterministic() {
    let l = layer(&[
        E::Dir("d/", 0o755),
        E::File("d/f", 0o644, b"x"),
        E::File("d/.wh.f", 0o644, b""),
    ]);
    let work = tempfile::tempdir().unwrap();
    let mut st = Stager::new(work.path(), Limits::default()).unwrap();
    st.apply_layer(&l[..], Compression::None, "l").unwrap();
    st.finish().unwrap();
    assert_eq!(
        std::fs::metadata(work.path().join("d")).unwrap().mtime(),
        1_600_000_000
    );
    assert_eq!(
        std::fs::metadata(work.path().join("d/f")).unwrap().mtime(),
        1_600_000_000
    );
    assert_eq!(std::fs::metadata(work.path()).unwrap().mtime(), 0);
}

#[test]
fn decompression_bomb_is_bounded() {
    let zeros = vec![0u8; 32 << 20];
    let bomb = gzip(&layer(&[E::File("bomb", 0o644, &zeros)]));
    assert!(
        bomb.len() < 1 << 20,
        "the bomb compresses well: {}",
        bomb.len()
    );
    let work = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_unpacked_bytes: 4 << 20,
        ..Limits::default()
    };
    let mut st = Stager::new(work.path(), limits).unwrap();
    let err = st
        .apply_layer(&bomb[..], Compression::Gzip, "bomb")
        .unwrap_err();
    assert!(
        matches!(
            err,
            OciError::LimitExceeded {
                field: "max_unpacked_bytes",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("raise Limits::max_unpacked_bytes"),
        "{err}"
    );
    // It stopped early: the file holds at most the limit.
    let len = std::fs::metadata(work.path().join("bomb"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(len <= 4 << 20, "{len}");
}

#[test]
fn entry_count_is_bounded() {
    let names: Vec<String> = (0..50).map(|i| format!("f{i}")).collect();
    let entries: Vec<E> = names.iter().map(|n| E::File(n, 0o644, b"")).collect();
    let work = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_entries: 10,
        ..Limits::default()
    };
    let mut st = Stager::new(work.path(), limits).unwrap();
    let err = st
        .apply_layer(&layer(&entries)[..], Compression::None, "many")
        .unwrap_err();
    assert!(
        matches!(
            err,
            OciError::LimitExceeded {
                field: "max_entries",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn huge_pax_header_is_bounded() {
    let work = tempfile::tempdir().unwrap();
    // 40 MB of PAX record, gzip-compressed to ~40 KB. It must be cut off while it is read (at the
    // header bound), not buffered until the total bound.
    let bomb = gzip(&layer(&[E::HugePax(40 << 20)]));
    let limits = Limits {
        max_header_bytes: 64 << 10,
        ..Limits::default()
    };
    let hwm = || -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        let l = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    };
    // Reset the peak to now: building the bomb above used a lot of memory.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = hwm();
    let mut st = Stager::new(work.path(), limits).unwrap();
    let err = st
        .apply_layer(&bomb[..], Compression::Gzip, "pax")
        .unwrap_err();
    assert!(
        matches!(
            err,
            OciError::LimitExceeded {
                field: "max_header_bytes",
                ..
            }
        ),
        "{err}"
    );
    let grew = hwm().saturating_sub(before);
    assert!(
        grew < 16 << 20,
        "peak memory grew by {grew} bytes reading a 40 MB PAX record"
    );
    // A normal-sized one passes.
    let mut st = Stager::new(work.path(), limits).unwrap();
    st.apply_layer(&layer(&[E::HugePax(1000)])[..], Compression::None, "pax")
        .unwrap();
}

#[test]
fn garbage_layer_is_a_clear_error() {
    let work = tempfile::tempdir().unwrap();
    let mut st = Stager::new(work.path(), Limits::default()).unwrap();
    let err = st
        .apply_layer(&b"not gzip at all"[..], Compression::Gzip, "junk")
        .unwrap_err();
    assert!(matches!(err, OciError::BadLayer { .. }), "{err}");
    assert!(err.to_string().contains("junk"), "{err}");
}

#[test]
fn whiteouts_of_dot_and_dotdot_remove_nothing() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let host = work.path().join("host-file");
    std::fs::write(&host, "keep").unwrap();
    let l1 = layer(&[E::File("d/keep", 0o644, b"k"), E::File("top", 0o644, b"t")]);
    let l2 = layer(&[
        E::File(".wh...", 0o644, b""),
        E::File(".wh..", 0o644, b""),
        E::File(".wh.", 0o644, b""),
        E::File("d/.wh...", 0o644, b""),
        E::File("d/.wh..", 0o644, b""),
    ]);
    let mut st = Stager::new(&root, Limits::default()).unwrap();
    st.apply_layer(&l1[..], Compression::None, "l1").unwrap();
    st.apply_layer(&l2[..], Compression::None, "l2").unwrap();
    let report = st.finish().unwrap();
    assert_eq!(
        std::fs::read_to_string(&host).unwrap(),
        "keep",
        "host file outside the root survives"
    );
    assert_eq!(std::fs::read_to_string(root.join("d/keep")).unwrap(), "k");
    assert_eq!(std::fs::read_to_string(root.join("top")).unwrap(), "t");
    assert!(report.skipped.len() >= 4, "{:?}", report.skipped);
}
