//! The monitor on a real VM: spawn, console over console.sock, state.json
//! transitions, reattach over monitor.sock, and clean-up on drop.

use std::time::Duration;

use capsa_core::{ExitReason, VmInstance, VmSpec, VmStatus, GUEST_READY_MARKER};
use capsa_vmm::state::{files, StateRoot};
use capsa_vmm::{SandboxState, SpawnOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BOOT: Duration = Duration::from_secs(120);

fn spec() -> VmSpec {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let b = capsa_image::build(&Default::default(), &capsa_image::Progress::new()).unwrap();
    let mut s = VmSpec::linux(b.kernel, Some(b.initrd));
    s.memory_mib = 256;
    s.console.enabled = true;
    s
}

fn opts(root: &StateRoot, name: &str, keep_alive: bool) -> SpawnOptions {
    SpawnOptions {
        state_root: root.clone(),
        name: name.into(),
        keep_alive,
        extra: Some(serde_json::json!({"kind": "vm"})),
        monitor_binary: Some(env!("CARGO_BIN_EXE_capsa-vmm").into()),
    }
}

async fn read_until(r: &mut (impl AsyncReadExt + Unpin), pat: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(BOOT, async {
        loop {
            let n = r.read(&mut buf).await.unwrap();
            assert!(n > 0, "console closed: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains(pat) {
                break;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {pat:?} in {}", String::from_utf8_lossy(&seen)));
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test]
async fn spawn_console_reattach_and_poweroff() {
    let tmp = tempfile::tempdir().unwrap();
    let root = StateRoot::new(tmp.path());
    let mut h = capsa_vmm::spawn(spec(), opts(&root, "box1", false))
        .await
        .unwrap();
    let dir = root.sandbox_dir("box1");
    // Same name again: refused, typed.
    let e = capsa_vmm::spawn(spec(), opts(&root, "box1", false))
        .await
        .unwrap_err();
    assert!(
        matches!(e, capsa_vmm::VmmError::AlreadyExists { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("capsa rm box1"), "{e}");
    h.wait_started(BOOT).await.unwrap();
    assert!(h.pid().is_some());
    let rec = root.get("box1").unwrap();
    assert_eq!(rec.state, SandboxState::Running);
    assert_eq!(rec.extra.unwrap()["kind"], "vm");
    let c = h.take_console().unwrap();
    let (mut out, mut inp) = (c.output, c.input);
    read_until(&mut out, GUEST_READY_MARKER).await;
    // A second process-like client: reattach over monitor.sock and pause/resume.
    let other = capsa_vmm::connect(&dir).await.unwrap();
    other.pause().await.unwrap();
    assert_eq!(other.status().await.unwrap(), VmStatus::Paused);
    assert_eq!(root.get("box1").unwrap().state, SandboxState::Paused);
    other.resume().await.unwrap();
    drop(other);
    // A late console client gets the history first.
    let mut late = tokio::net::UnixStream::connect(dir.join(files::CONSOLE_SOCK))
        .await
        .unwrap();
    read_until(&mut late, GUEST_READY_MARKER).await;
    inp.write_all(b"echo sum=$((40+2))\n").await.unwrap();
    read_until(&mut out, "sum=42").await;
    inp.write_all(b"poweroff -f\n").await.unwrap();
    let r = tokio::time::timeout(BOOT, h.wait()).await.unwrap().unwrap();
    assert_eq!(r, ExitReason::PoweredOff);
    assert!(matches!(
        h.status().await.unwrap(),
        VmStatus::Stopped { .. }
    ));
    // The monitor recorded the exit and removed its sockets.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let rec = root.get("box1").unwrap();
    assert_eq!(rec.state, SandboxState::Stopped);
    assert_eq!(rec.exit, Some(ExitReason::PoweredOff));
    assert!(!dir.join(files::MONITOR_SOCK).exists());
    assert!(std::fs::read_to_string(dir.join(files::CONSOLE_LOG))
        .unwrap()
        .contains(GUEST_READY_MARKER));
    // A non-keep-alive handle's drop cleans the directory.
    drop(h);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while dir.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "state dir left behind"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn drop_kills_and_keep_alive_survives() {
    let tmp = tempfile::tempdir().unwrap();
    let root = StateRoot::new(tmp.path());
    let h = capsa_vmm::spawn(spec(), opts(&root, "eph", false))
        .await
        .unwrap();
    h.wait_started(BOOT).await.unwrap();
    let (qemu, mon) = (h.pid().unwrap(), h.monitor_pid());
    drop(h);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while capsa_vmm::state::process_alive(qemu, None)
        || capsa_vmm::state::process_alive(mon, None)
        || root.sandbox_dir("eph").exists()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "monitor, QEMU or dir left behind"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let h = capsa_vmm::spawn(spec(), opts(&root, "kept", true))
        .await
        .unwrap();
    h.wait_started(BOOT).await.unwrap();
    let qemu = h.pid().unwrap();
    drop(h);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(capsa_vmm::state::process_alive(qemu, None));
    let again = capsa_vmm::connect(&root.sandbox_dir("kept")).await.unwrap();
    assert_eq!(again.status().await.unwrap(), VmStatus::Running);
    again.kill().await.unwrap();
    assert_eq!(
        again.wait().await.unwrap(),
        ExitReason::Killed { signal: 9 }
    );
    root.remove("kept").unwrap();
}
