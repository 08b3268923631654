//! `copy_out` against a hostile agent: a fake agent on in-memory streams
//! answers with names that try to leave the target, setuid modes, absurd
//! times, oversized data and endless listings. Nothing may be written
//! outside the target, nothing may panic, and memory stays bounded.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use capsa::copy::{copy_out, AgentFs};
use capsa::{CopyOutOptions, Error};
use capsa_agent_client::{AgentClient, AgentFrame, BoxedStream, DirEntry, FileKind, FileMeta};
use capsa_proto::{asynch, ClientFrame, Request};
use tokio::io::DuplexStream;

/// What the fake guest holds: a path's metadata, its listing, its content.
#[derive(Clone, Default)]
struct FakeTree {
    meta: HashMap<String, FileMeta>,
    lists: HashMap<String, Vec<DirEntry>>,
    data: HashMap<String, Vec<u8>>,
    /// Listing pages without end for this path.
    endless: Option<String>,
    /// Whether the endless listing ignores its cursor (the same page again and again).
    stuck: bool,
}

fn meta(kind: FileKind, size: u64, mode: u32, mtime: (i64, u32)) -> FileMeta {
    FileMeta {
        kind,
        size,
        mode,
        mtime,
    }
}

fn dir() -> FileMeta {
    meta(FileKind::Dir, 0, 0o755, (1_000, 0))
}

fn entry(name: &str, m: FileMeta) -> DirEntry {
    DirEntry {
        name: name.into(),
        meta: m,
    }
}

fn client(tree: FakeTree) -> AgentFs {
    let tree = Arc::new(tree);
    let client = AgentClient::new(move || {
        let tree = Arc::clone(&tree);
        async move {
            let (ours, theirs) = tokio::io::duplex(1 << 20);
            tokio::spawn(serve(theirs, tree));
            Ok(Box::new(ours) as BoxedStream)
        }
    });
    AgentFs { client, timeout: T }
}

async fn serve(mut s: DuplexStream, t: Arc<FakeTree>) {
    let Ok(ClientFrame::Open { request, .. }) = asynch::read_frame::<ClientFrame>(&mut s).await
    else {
        return;
    };
    let reply = |f: AgentFrame| f;
    let frames: Vec<AgentFrame> = match request {
        Request::Stat { path } => vec![reply(AgentFrame::Meta(t.meta[&path]))],
        Request::ListDirPage { path, after } => {
            if t.endless.as_deref() == Some(path.as_str()) {
                let after = if t.stuck { None } else { after };
                let start: u64 = after
                    .as_deref()
                    .and_then(|a| a.strip_prefix('f'))
                    .and_then(|n| n.parse().ok())
                    .map_or(0, |n: u64| n + 1);
                let entries = (start..start + 512)
                    .map(|i| {
                        entry(
                            &format!("f{i:012}"),
                            meta(FileKind::Symlink, 0, 0o777, (0, 0)),
                        )
                    })
                    .collect();
                vec![AgentFrame::EntriesPage {
                    entries,
                    more: true,
                }]
            } else {
                vec![AgentFrame::EntriesPage {
                    entries: t.lists.get(&path).cloned().unwrap_or_default(),
                    more: false,
                }]
            }
        }
        Request::ReadFile { path } => {
            let data = t.data.get(&path).cloned().unwrap_or_default();
            let m = t.meta.get(&path).copied().unwrap_or(meta(
                FileKind::File,
                data.len() as u64,
                0o644,
                (0, 0),
            ));
            let mut v = vec![AgentFrame::Meta(m)];
            v.extend(
                data.chunks(capsa_proto::CHUNK)
                    .map(|c| AgentFrame::Data(c.to_vec())),
            );
            v.push(AgentFrame::End);
            v
        }
        _ => return,
    };
    for f in frames {
        if asynch::write_frame(&mut s, &f).await.is_err() {
            return;
        }
    }
}

const T: Duration = Duration::from_secs(20);

/// Every file below `dir`, as paths relative to it.
fn files_below(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn names_that_leave_the_target_are_refused() {
    for bad in [
        "/abs-escape",
        "..",
        "../up-escape",
        "a/b",
        "nul\0byte",
        ".",
        "",
    ] {
        let work = tempfile::tempdir().unwrap();
        let target = work.path().join("target");
        let mut t = FakeTree::default();
        t.meta.insert("/g".into(), dir());
        t.lists.insert(
            "/g".into(),
            vec![entry(bad, meta(FileKind::File, 5, 0o644, (0, 0)))],
        );
        t.data.insert(format!("/g/{bad}"), b"owned".to_vec());
        let err = copy_out(&client(t), "/g", &target, &CopyOutOptions::default())
            .await
            .expect_err(bad);
        assert!(matches!(err, Error::GuestInput(_)), "{bad:?}: {err}");
        // Only the (empty) target exists in the work dir, and nothing at /abs-escape.
        assert_eq!(
            files_below(work.path()),
            vec!["target".to_string()],
            "{bad:?}"
        );
        assert!(!Path::new("/abs-escape").exists());
    }
}

#[tokio::test]
async fn modes_times_and_sizes_from_the_guest_are_tamed() {
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("t");
    let mut t = FakeTree::default();
    t.meta.insert("/g".into(), dir());
    let suid = meta(FileKind::File, 4, 0o6755, (i64::MAX, u32::MAX));
    let big = meta(FileKind::File, 10, 0o644, (i64::MIN, 0));
    let link = meta(FileKind::Symlink, 0, 0o777, (0, 0));
    t.lists.insert(
        "/g".into(),
        vec![
            entry("suid", suid),
            entry("big", big),
            entry("link", link),
            entry("sub", meta(FileKind::Dir, 0, 0o4555, (5, 0))),
        ],
    );
    t.meta.insert("/g/suid".into(), suid);
    t.data.insert("/g/suid".into(), b"abcd".to_vec());
    // Announces 10 bytes, streams 3 MiB.
    t.meta.insert("/g/big".into(), big);
    t.data.insert("/g/big".into(), vec![7u8; 3 << 20]);
    t.lists.insert(
        "/g/sub".into(),
        vec![entry("inner", meta(FileKind::File, 2, 0o600, (7, 0)))],
    );
    t.data.insert("/g/sub/inner".into(), b"hi".to_vec());

    copy_out(&client(t), "/g", &target, &CopyOutOptions::default())
        .await
        .unwrap();
    let m = std::fs::metadata(target.join("suid")).unwrap();
    assert_eq!(
        m.permissions().mode() & 0o7777,
        0o755,
        "special bits dropped"
    );
    let mtime = m.modified().unwrap().duration_since(UNIX_EPOCH).unwrap();
    assert!(mtime.as_secs() <= 253_402_300_799);
    assert_eq!(std::fs::read(target.join("big")).unwrap().len(), 10);
    assert!(!target.join("link").exists() && !target.join("link").is_symlink());
    assert_eq!(std::fs::read(target.join("sub/inner")).unwrap(), b"hi");
    // The read-only guest directory was filled first, then given its mode.
    let sub = std::fs::metadata(target.join("sub")).unwrap();
    assert_eq!(sub.permissions().mode() & 0o7777, 0o555);
    assert_eq!(sub.modified().unwrap(), UNIX_EPOCH + Duration::from_secs(5));

    // Asked for, special bits are kept.
    let target2 = work.path().join("t2");
    let mut t = FakeTree::default();
    t.meta.insert("/g".into(), dir());
    t.lists.insert("/g".into(), vec![entry("suid", suid)]);
    t.meta.insert("/g/suid".into(), suid);
    let opts = CopyOutOptions {
        keep_special_bits: true,
        ..Default::default()
    };
    copy_out(&client(t), "/g", &target2, &opts).await.unwrap();
    let m = std::fs::metadata(target2.join("suid")).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o6755);
}

#[tokio::test]
async fn a_host_symlink_in_the_target_is_not_followed_out() {
    let work = tempfile::tempdir().unwrap();
    let outside = work.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let target = work.path().join("t");
    std::fs::create_dir(&target).unwrap();
    std::os::unix::fs::symlink(&outside, target.join("sub")).unwrap();
    std::os::unix::fs::symlink(outside.join("f"), target.join("file")).unwrap();
    for (name, kind) in [("sub", FileKind::Dir), ("file", FileKind::File)] {
        let mut t = FakeTree::default();
        t.meta.insert("/g".into(), dir());
        t.lists
            .insert("/g".into(), vec![entry(name, meta(kind, 1, 0o755, (0, 0)))]);
        t.lists.insert(
            "/g/sub".into(),
            vec![entry("planted", meta(FileKind::File, 1, 0o644, (0, 0)))],
        );
        t.data.insert("/g/file".into(), b"x".to_vec());
        t.data.insert("/g/sub/planted".into(), b"x".to_vec());
        let r = copy_out(&client(t), "/g", &target, &CopyOutOptions::default()).await;
        assert!(r.is_err(), "{name}: following the host symlink must fail");
        assert!(
            std::fs::read_dir(&outside).unwrap().next().is_none(),
            "{name}: something was written outside"
        );
    }
}

#[tokio::test]
async fn an_endless_listing_ends_with_an_error() {
    let work = tempfile::tempdir().unwrap();
    let mut t = FakeTree::default();
    t.meta.insert("/g".into(), dir());
    t.endless = Some("/g".into());
    let opts = CopyOutOptions {
        max_entries: 20_000,
        ..Default::default()
    };
    let err = copy_out(&client(t), "/g", &work.path().join("t"), &opts)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("20000"), "{err}");

    // Without a caller's bound, the client's own bound still ends it.
    let mut t = FakeTree::default();
    t.meta.insert("/g".into(), dir());
    t.endless = Some("/g".into());
    let err = copy_out(
        &client(t),
        "/g",
        &work.path().join("t2"),
        &CopyOutOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("more than"), "{err}");

    // A listing that repeats one page is refused at its second page.
    let mut t = FakeTree::default();
    t.meta.insert("/g".into(), dir());
    t.endless = Some("/g".into());
    t.stuck = true;
    let err = copy_out(
        &client(t),
        "/g",
        &work.path().join("t3"),
        &CopyOutOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("does not advance"), "{err}");
}

#[tokio::test]
async fn deep_trees_and_byte_budgets_are_bounded() {
    let work = tempfile::tempdir().unwrap();
    let mut t = FakeTree::default();
    t.meta.insert("/g".into(), dir());
    let mut p = "/g".to_string();
    for _ in 0..10 {
        t.lists.insert(p.clone(), vec![entry("d", dir())]);
        p.push_str("/d");
    }
    let opts = CopyOutOptions {
        max_depth: 5,
        ..Default::default()
    };
    let err = copy_out(&client(t), "/g", &work.path().join("t"), &opts)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::GuestInput(_)), "{err}");

    let mut t = FakeTree::default();
    t.meta.insert("/g".into(), dir());
    let f = meta(FileKind::File, 1 << 20, 0o644, (0, 0));
    t.lists
        .insert("/g".into(), vec![entry("a", f), entry("b", f)]);
    t.meta.insert("/g/a".into(), f);
    t.meta.insert("/g/b".into(), f);
    t.data.insert("/g/a".into(), vec![1; 1 << 20]);
    t.data.insert("/g/b".into(), vec![1; 1 << 20]);
    let opts = CopyOutOptions {
        max_bytes: Some(1_500_000),
        ..Default::default()
    };
    let err = copy_out(&client(t), "/g", &work.path().join("t3"), &opts)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("byte limit"), "{err}");
}
