//! Shared directories (virtio-fs) on real VMs: data both ways, read-only
//! enforced by the host, symlinks kept inside, ownership, hot-plug on pooled
//! sandboxes, snapshots refused while a share is attached, bad shares refused
//! before anything starts. Run with `-j 1`; needs root (ownership mapping).

mod common;

#[allow(dead_code)]
const FORCE_MONITOR: bool = false;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use capsa::{Capsa, Command, Sandbox, ShareMode, ShareSpec};
use sha2::{Digest, Sha256};

/// The uid/gid the share directories belong to on the host.
const OWNER: u32 = 1234;

fn hex(d: impl AsRef<[u8]>) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn random_bytes(n: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(n);
    v
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A share directory owned by [`OWNER`], in a temp dir others may traverse.
fn share_dir() -> (tempfile::TempDir, std::path::PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("share");
    std::fs::create_dir(&d).unwrap();
    if is_root() {
        std::os::unix::fs::chown(&d, Some(OWNER), Some(OWNER)).unwrap();
    }
    (t, d)
}

async fn sh(sb: &Sandbox, script: &str) -> (Option<i32>, String, String) {
    let out = sb
        .exec(&Command::new("sh").args(["-c", script]))
        .await
        .expect("exec");
    (
        out.status.code,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// virtiofsd processes whose command line names `dir` (running ones only).
fn virtiofsds() -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let comm = &stat[stat.find('(').map_or(0, |i| i + 1)..close];
        let state = stat[close + 1..].split_whitespace().next().unwrap_or("");
        // Our own children only: the parent chain leads to this process.
        if comm == "virtiofsd" && state != "Z" && descends_from_me(pid) {
            out.push(pid);
        }
    }
    out
}

fn descends_from_me(mut pid: u32) -> bool {
    let me = std::process::id();
    for _ in 0..64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        let Some(close) = stat.rfind(')') else {
            return false;
        };
        let ppid: u32 = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if ppid == me {
            return true;
        }
        if ppid <= 1 {
            return false;
        }
        pid = ppid;
    }
    false
}

/// Each virtiofsd of this process runs in a VM cgroup (where QEMU is),
/// when this machine gives capsa cgroups.
fn assert_virtiofsd_in_vm_cgroup() {
    if capsa_qemu::cgroup::status().is_err() {
        eprintln!("no VM cgroups here: virtiofsd's cgroup not checked");
        return;
    }
    let pids = virtiofsds();
    assert!(!pids.is_empty(), "a virtiofsd runs");
    for pid in pids {
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        assert!(
            cg.lines().any(|l| l.contains("/capsa-")),
            "virtiofsd {pid} runs outside the VM's cgroup: {cg}"
        );
    }
}

async fn wait_no_virtiofsd() {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !virtiofsds().is_empty() {
        assert!(
            Instant::now() < deadline,
            "virtiofsd left behind: {:?}",
            virtiofsds()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn fifty_mib_both_ways_and_guest_files_belong_to_the_owner() {
    let (_t, dir) = share_dir();
    let data = random_bytes(50 << 20, 12);
    std::fs::write(dir.join("from-host.bin"), &data).unwrap();
    let want = hex(Sha256::digest(&data));
    let sb = common::sandbox()
        .memory_mb(512)
        .share(&dir, "/work", ShareMode::ReadWrite)
        .build()
        .await
        .expect("sandbox with a share boots");
    assert_eq!(sb.shares().await.unwrap().len(), 1);
    assert!(!virtiofsds().is_empty() || common::strategy() == capsa::Strategy::Monitor);
    if common::strategy() == capsa::Strategy::InProcess {
        assert_virtiofsd_in_vm_cgroup();
    }

    let (code, out, err) = sh(&sb, "sha256sum /work/from-host.bin").await;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with(&want),
        "guest read {out}, host wrote {want}"
    );

    let (code, out, err) = sh(
        &sb,
        "dd if=/dev/urandom of=/work/from-guest.bin bs=1M count=50 2>/dev/null && \
         mkdir /work/made-in-guest && sync && sha256sum /work/from-guest.bin",
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    let guest_sum = out.split_whitespace().next().unwrap_or("").to_string();
    let host_bytes = std::fs::read(dir.join("from-guest.bin")).unwrap();
    assert_eq!(host_bytes.len(), 50 << 20);
    assert_eq!(hex(Sha256::digest(&host_bytes)), guest_sum);

    if is_root() {
        for name in ["from-guest.bin", "made-in-guest"] {
            let m = std::fs::metadata(dir.join(name)).unwrap();
            assert_eq!(
                (m.uid(), m.gid()),
                (OWNER, OWNER),
                "{name} should belong to the share's owner, not root"
            );
        }
        // The guest's root sees the owner's files as its own, and files of
        // other host users (here root's) as nobody's.
        let (_, out, _) = sh(&sb, "stat -c %u /work/from-guest.bin /work/from-host.bin").await;
        assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["0", "65534"]);
    }
    sb.kill().await.unwrap();
    drop(sb);
    wait_no_virtiofsd().await;
}

#[tokio::test]
async fn read_only_holds_even_after_a_guest_remount() {
    let (_t, dir) = share_dir();
    std::fs::write(dir.join("keep.txt"), b"original").unwrap();
    if is_root() {
        std::os::unix::fs::chown(dir.join("keep.txt"), Some(OWNER), Some(OWNER)).unwrap();
    }
    let sb = common::sandbox()
        .memory_mb(256)
        .share(&dir, "/ro", ShareMode::ReadOnly)
        .build()
        .await
        .expect("boots");
    let (code, out, _) = sh(&sb, "cat /ro/keep.txt").await;
    assert_eq!((code, out.as_str()), (Some(0), "original"));
    let (code, _, _) = sh(&sb, "echo x > /ro/new.txt").await;
    assert_ne!(code, Some(0), "write to a read-only share succeeded");
    // Root in the guest lifts its own read-only flag; the host still refuses.
    let (code, _, err) = sh(&sb, "mount -o remount,rw /ro").await;
    assert_eq!(code, Some(0), "remount: {err}");
    let (code, _, err) = sh(
        &sb,
        "echo changed > /ro/keep.txt; echo x > /ro/new.txt; mkdir /ro/d; rm -f /ro/keep.txt; \
         touch -d 2001-01-01 /ro/keep.txt",
    )
    .await;
    assert_ne!(code, Some(0));
    assert!(
        err.contains("Read-only") || err.contains("read-only"),
        "writes should fail with EROFS: {err}"
    );
    assert_eq!(std::fs::read(dir.join("keep.txt")).unwrap(), b"original");
    assert!(!dir.join("new.txt").exists());
    assert!(!dir.join("d").exists());
    sb.kill().await.unwrap();
}

#[tokio::test]
async fn symlinks_in_the_share_do_not_reach_the_host() {
    let (t, dir) = share_dir();
    // A secret beside the share, and links pointing at it and at /etc.
    let secret = t.path().join("secret.txt");
    std::fs::write(&secret, b"host secret").unwrap();
    std::os::unix::fs::symlink("/etc", dir.join("etc")).unwrap();
    std::os::unix::fs::symlink(&secret, dir.join("abs-secret")).unwrap();
    std::os::unix::fs::symlink("../secret.txt", dir.join("rel-secret")).unwrap();
    std::os::unix::fs::symlink("../../../../../../../etc/passwd", dir.join("dots")).unwrap();
    let host_passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let sb = common::sandbox()
        .memory_mb(256)
        .share(&dir, "/s", ShareMode::ReadWrite)
        .build()
        .await
        .expect("boots");
    for p in ["/s/etc/passwd", "/s/dots"] {
        let (_, out, _) = sh(&sb, &format!("cat {p}")).await;
        assert_ne!(out, host_passwd, "{p} showed the host's /etc/passwd");
    }
    for p in ["/s/abs-secret", "/s/rel-secret"] {
        let (_, out, _) = sh(&sb, &format!("cat {p}")).await;
        assert!(!out.contains("host secret"), "{p} reached the host: {out}");
    }
    // A link the guest makes resolves in the guest as well; and the share's
    // parent is out of reach by '..'.
    let (_, out, _) = sh(
        &sb,
        "ln -s / /s/root && ls /s/root/ && cat /s/../secret.txt",
    )
    .await;
    assert!(!out.contains("host secret"), "{out}");
    assert!(!dir.join("root").join("secret.txt").exists() || !out.contains("host secret"));
    // Guest root cannot make host device nodes in the share (virtiofsd is
    // root only of its own user namespace).
    let (code, _, _) = sh(&sb, "mknod /s/disk b 8 0").await;
    assert_ne!(code, Some(0), "a block device node was made on the host");
    assert!(!dir.join("disk").exists());
    sb.kill().await.unwrap();
}

#[tokio::test]
async fn share_on_a_pooled_sandbox_then_snapshot_is_refused_until_detached() {
    let (_t, dir) = share_dir();
    std::fs::write(dir.join("hello.txt"), b"from the host").unwrap();
    let pool = Capsa::pool(common::sandbox().memory_mb(256))
        .size(1)
        .build()
        .await
        .expect("pool");
    let sb = pool.acquire().await.expect("acquire");
    let t = Instant::now();
    sb.share_add(ShareSpec::new(&dir, "/data", ShareMode::ReadWrite))
        .await
        .expect("share on a restored sandbox");
    eprintln!("share_add on a pooled sandbox: {:?}", t.elapsed());
    if common::strategy() == capsa::Strategy::InProcess {
        assert_virtiofsd_in_vm_cgroup();
    }
    let (code, out, err) = sh(&sb, "cat /data/hello.txt && echo back > /data/back.txt").await;
    assert_eq!((code, out.as_str()), (Some(0), "from the host"), "{err}");
    assert_eq!(std::fs::read(dir.join("back.txt")).unwrap(), b"back\n");

    let snap = tempfile::tempdir().unwrap();
    let e = sb
        .snapshot(snap.path().join("s"))
        .await
        .expect_err("snapshot with a share attached");
    let msg = e.to_string();
    assert!(
        msg.contains("/data") && msg.contains("capsa share rm") && !msg.contains("vhost"),
        "{msg}"
    );
    assert!(!snap.path().join("s").exists(), "nothing made: {msg}");

    let removed = sb.share_remove("/data").await.expect("detach");
    assert_eq!(removed.guest, "/data");
    assert!(sb.shares().await.unwrap().is_empty());
    let (code, _, _) = sh(&sb, "test -e /data/hello.txt").await;
    assert_ne!(code, Some(0), "unmounted in the guest");
    wait_no_virtiofsd().await;
    sb.snapshot(snap.path().join("s"))
        .await
        .expect("snapshot once the share is detached");
    // And again: the slot is free for a new share.
    sb.share_add(ShareSpec::new(&dir, "/data2", ShareMode::ReadOnly))
        .await
        .expect("attach again");
    let (code, out, _) = sh(&sb, "cat /data2/back.txt").await;
    assert_eq!((code, out.as_str()), (Some(0), "back\n"));
    sb.kill().await.unwrap();
    drop(sb);
    drop(pool);
    wait_no_virtiofsd().await;
}

#[tokio::test]
async fn bad_shares_are_refused_before_anything_starts() {
    let t = tempfile::tempdir().unwrap();
    let file = t.path().join("file.txt");
    std::fs::write(&file, b"x").unwrap();
    let cases: Vec<(ShareSpec, &str)> = vec![
        (
            ShareSpec::new(t.path().join("missing"), "/w", ShareMode::ReadWrite),
            "missing",
        ),
        (
            ShareSpec::new(&file, "/w", ShareMode::ReadWrite),
            "not a directory",
        ),
        (
            ShareSpec::new(t.path(), "w", ShareMode::ReadWrite),
            "not absolute",
        ),
        (
            ShareSpec::new(t.path(), "/w/../etc", ShareMode::ReadWrite),
            "not normalized",
        ),
    ];
    for (share, want) in cases {
        let t0 = Instant::now();
        let e = common::sandbox()
            .memory_mb(256)
            .share_spec(share.clone())
            .build()
            .await
            .expect_err("refused");
        let msg = e.to_string();
        assert!(
            msg.contains(want) && msg.contains("Fix:"),
            "{share:?}: {msg}"
        );
        assert!(common::qemu_children().is_empty(), "nothing started");
        assert!(t0.elapsed() < Duration::from_secs(5), "refused up front");
        // The base-snapshot path (capsa run) checks before restoring too.
        let e = capsa::base_snapshot::build(common::sandbox().memory_mb(256).share_spec(share))
            .await
            .expect_err("refused");
        assert!(e.to_string().contains(want), "{e}");
        assert!(common::qemu_children().is_empty(), "nothing started");
    }
    assert!(Path::new(&file).exists());
}
