//! Snapshots of monitor-run sandboxes, and restores under a monitor into
//! named sandboxes (real VMs, TCG). Build the monitor first:
//! `cargo build -p capsa-vmm`.

mod common;

/// Every VM here runs under a monitor.
#[allow(dead_code)]
const FORCE_MONITOR: bool = true;

use std::time::{Duration, Instant};

use capsa::{Capsa, Command, Sandbox, SandboxState, Sandboxes, Snapshots, Strategy};
use capsa_vmm::state::process_alive;

/// Removes the sandbox (killing what is left) even when an assertion fails.
struct Cleanup(capsa::StateRoot, &'static str);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = self.0.remove(self.1);
    }
}

async fn sh(sb: &Sandbox, script: &str) -> String {
    let out = sb
        .exec(&Command::new("sh").args(["-c", script]))
        .await
        .expect("exec");
    assert!(
        out.status.success(),
        "{script}: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

async fn eventually(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A monitor-run sandbox is snapshotted (and keeps working); the snapshot is
/// restored by a monitor into a named keep-running sandbox that has the
/// files, answers exec at once, has its own hostname, carries the source's
/// environment, is found again by name, and boots cold from its recorded
/// spec after a stop. An ephemeral monitor restore leaves nothing behind.
#[tokio::test]
async fn monitor_snapshot_restores_into_named_sandbox() {
    common::init_tracing();
    let t0 = Instant::now();
    let state = tempfile::Builder::new()
        .prefix("ms")
        .tempdir_in("/tmp")
        .unwrap();
    let reg = Sandboxes::new(Some(state.path().to_path_buf()));
    let _c1 = Cleanup(reg.root().clone(), "src");
    let _c2 = Cleanup(reg.root().clone(), "clone");
    let snaps_dir = tempfile::tempdir().unwrap();
    let store = Snapshots::new(Some(snaps_dir.path().join("snaps")));

    let src = Capsa::sandbox()
        .fast_start(false)
        .strategy(Strategy::Monitor)
        .state_root(state.path())
        .name("src")
        .memory_mb(256)
        .env("FROM", "src")
        .build()
        .await
        .expect("monitor sandbox boots");
    src.write_file("/work/before.txt", b"written before the snapshot")
        .await
        .unwrap();
    let src_host = sh(&src, "cat /proc/sys/kernel/hostname").await;

    let t = Instant::now();
    let entry = store.create("base", &src).await.expect("snapshot");
    eprintln!("monitor snapshot took {:?}", t.elapsed());
    assert_eq!(entry.source.as_deref(), Some("src"));
    assert!(entry.size_bytes > 0);
    assert_eq!(entry.spec.as_ref().map(|s| s.memory_mib), Some(256));
    // The source runs on (its vsock device was re-plugged).
    assert_eq!(
        sh(&src, "cat /work/before.txt").await,
        "written before the snapshot"
    );
    let e = store.create("base", &src).await.unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");

    // Restore into a named, keep-running sandbox under a monitor.
    let snap = store.get("base").unwrap();
    let t = Instant::now();
    let clone = reg
        .create_restored(Capsa::restore(snap.path()).name("clone"))
        .await
        .expect("restore under a monitor");
    // Exec works right away, with the file and a fresh identity.
    assert_eq!(
        sh(&clone, "cat /work/before.txt").await,
        "written before the snapshot"
    );
    eprintln!("monitor restore to first exec took {:?}", t.elapsed());
    let clone_host = sh(&clone, "cat /proc/sys/kernel/hostname").await;
    assert_ne!(clone_host, src_host);
    assert_eq!(sh(&clone, "echo $FROM").await, "src");
    // Writes do not leak between source and clone.
    sh(&clone, "echo clone > /work/only-clone").await;
    assert_eq!(
        sh(&src, "ls /work/only-clone 2>/dev/null || echo none").await,
        "none"
    );

    let rec = clone.record().unwrap();
    assert_eq!(rec.state, SandboxState::Running);
    assert!(rec.dir.join("restored-from.json").is_file());
    assert!(!rec.dir.join("restore.json").exists());
    let monitor = rec.monitor_pid.expect("monitor pid");
    drop(clone);
    // Kept running: found again by name, identity kept.
    let again = reg.open("clone").await.expect("reattach");
    assert_eq!(
        sh(&again, "cat /proc/sys/kernel/hostname").await,
        clone_host
    );
    assert_eq!(sh(&again, "cat /work/only-clone").await, "clone");

    eprintln!("[{:?}] reattached", t0.elapsed());
    // A stop, then `start` boots cold from the recorded (restored) spec.
    again.vm().stop().await.unwrap();
    drop(again);
    eventually("the clone's monitor to exit", 30, || {
        !process_alive(monitor, None)
    })
    .await;
    let booted = reg.start("clone").await.expect("start after a stop");
    assert_eq!(sh(&booted, "echo up").await, "up");
    drop(booted);
    reg.remove("clone", true).await.unwrap();

    eprintln!("[{:?}] started and removed", t0.elapsed());
    // An ephemeral monitor restore: gone with its handle.
    let eph = Capsa::restore(snap.path())
        .strategy(Strategy::Monitor)
        .state_root(state.path())
        .name("eph")
        .build()
        .await
        .expect("ephemeral monitor restore");
    assert_eq!(
        sh(&eph, "cat /work/before.txt").await,
        "written before the snapshot"
    );
    let dir = eph.vm().state_dir().unwrap().to_path_buf();
    let pid = eph.vm().monitor_pid().unwrap();
    drop(eph);
    eventually("the ephemeral monitor to exit", 30, || {
        !process_alive(pid, None)
    })
    .await;
    eventually("the ephemeral directory to go", 30, || !dir.exists()).await;

    let src_monitor = src.vm().monitor_pid().unwrap();
    drop(src);
    store.remove("base").unwrap();
    assert!(store.list().unwrap().is_empty());
    eprintln!("[{:?}] source dropped", t0.elapsed());
    eventually("the source's monitor to exit", 30, || {
        !process_alive(src_monitor, None)
    })
    .await;
    eprintln!("[{:?}] source monitor gone", t0.elapsed());
    // Exited monitors are reaped in the background (tokio's orphan queue).
    eventually("no leftover VM processes", 30, || {
        common::qemu_children()
            .into_iter()
            .all(|p| !process_alive(p, None))
    })
    .await;
    assert!(reg.list().unwrap().is_empty());
}

/// Bad restore requests fail before any process starts, with a clear error.
#[tokio::test]
async fn monitor_restore_bad_input() {
    common::init_tracing();
    let state = tempfile::Builder::new()
        .prefix("ms")
        .tempdir_in("/tmp")
        .unwrap();
    let reg = Sandboxes::new(Some(state.path().to_path_buf()));
    let nothing = tempfile::tempdir().unwrap();
    let e = reg
        .create_restored(Capsa::restore(nothing.path()).name("x"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("snapshot.json"), "{e}");
    let e = Capsa::restore(nothing.path())
        .keep_running(true)
        .build()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("needs a name"), "{e}");
    assert!(reg.list().unwrap().is_empty());
}
