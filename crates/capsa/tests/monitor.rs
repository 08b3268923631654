//! Monitor-only behaviour on real VMs: sandboxes that outlive their creator,
//! reattach from several clients, dead monitors, power-off records, restart,
//! and clean-up of ephemeral monitor sandboxes.

mod common;

/// This binary's own suite is about the monitor; `common::vm()` is unused here.
#[allow(dead_code)]
const FORCE_MONITOR: bool = true;

use std::io::BufRead;
use std::time::{Duration, Instant};

use capsa::{Command, Error, ExitReason, SandboxState, Sandboxes, Strategy};
use capsa_vmm::state::process_alive;
use capsa_vmm::VmmError;

/// Removes the sandbox (killing what is left) even when an assertion fails.
struct Cleanup(capsa::StateRoot, &'static str);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = self.0.remove(self.1);
    }
}

fn registry(tmp: &tempfile::TempDir) -> Sandboxes {
    common::init_tracing();
    Sandboxes::new(Some(tmp.path().to_path_buf()))
}

async fn eventually(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Not a test on its own: the creator process of
/// `keep_running_sandbox_survives_its_creator` (this binary, re-invoked).
#[tokio::test]
#[ignore]
async fn helper_create_keep_running() {
    let (Ok(root), Ok(name)) = (
        std::env::var("CAPSA_TEST_HELPER_ROOT"),
        std::env::var("CAPSA_TEST_HELPER_NAME"),
    ) else {
        return;
    };
    let sb = Sandboxes::new(Some(root.into()))
        .create(
            common::sandbox()
                .name(name)
                .memory_mb(256)
                .env("FROM", "creator"),
        )
        .await
        .unwrap();
    println!("HELPER-READY {}", sb.name());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tokio::time::sleep(Duration::from_secs(600)).await;
}

#[tokio::test]
async fn keep_running_sandbox_survives_its_creator() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = registry(&tmp);
    let _c = Cleanup(reg.root().clone(), "survivor");
    let mut helper = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_create_keep_running",
            "--ignored",
            "--nocapture",
        ])
        .env("CAPSA_TEST_HELPER_ROOT", tmp.path())
        .env("CAPSA_TEST_HELPER_NAME", "survivor")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = helper.stdout.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.starts_with("HELPER-READY"))
    });
    let ready = tokio::time::timeout(common::BOOT_TIMEOUT, ready).await;
    // SIGKILL: the creator gets no chance to clean up or detach.
    helper.kill().unwrap();
    helper.wait().unwrap();
    assert!(
        matches!(ready, Ok(Ok(true))),
        "the helper did not create the sandbox"
    );

    let rec = reg.get("survivor").unwrap();
    assert_eq!(rec.state, SandboxState::Running);
    // Two clients at once, each with its own monitor and agent connections.
    let a = reg.open("survivor").await.unwrap();
    let b = reg.open("survivor").await.unwrap();
    let cmd = |i: u32| Command::new("sh").args(["-c", &format!("sleep 1; echo $FROM-{i}")]);
    let (c1, c2) = (cmd(1), cmd(2));
    let (ra, rb) = tokio::join!(a.exec(&c1), b.exec(&c2));
    assert_eq!(
        ra.unwrap().stdout,
        b"creator-1\n",
        "env restored from sandbox.json"
    );
    assert_eq!(rb.unwrap().stdout, b"creator-2\n");
    drop(a);
    drop(b);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(reg.get("survivor").unwrap().state, SandboxState::Running);
    // Removing a running sandbox needs force.
    let e = reg.remove("survivor", false).await.unwrap_err();
    assert!(e.to_string().contains("--force"), "{e}");
    reg.remove("survivor", true).await.unwrap();
    assert!(!rec.dir.exists());
    let qemu = rec.vmm_pid.unwrap();
    eventually("QEMU to end", 10, || !process_alive(qemu, None)).await;
    assert!(matches!(
        reg.get("survivor").unwrap_err(),
        Error::Vmm(VmmError::NotFound { .. })
    ));
}

#[tokio::test]
async fn killed_monitor_is_dead_and_removable() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = registry(&tmp);
    let _c = Cleanup(reg.root().clone(), "victim");
    let sb = reg
        .create(common::sandbox().name("victim").memory_mb(256))
        .await
        .unwrap();
    let rec = sb.record().unwrap();
    let (mon, qemu) = (rec.monitor_pid.unwrap(), rec.vmm_pid.unwrap());
    // SAFETY: a pid we just read from our own sandbox's record.
    unsafe {
        libc::kill(mon as i32, libc::SIGKILL);
    }
    eventually("the record to say dead", 10, || {
        reg.get("victim")
            .is_ok_and(|r| r.state == SandboxState::Dead)
    })
    .await;
    eventually("QEMU to follow its monitor", 10, || {
        !process_alive(qemu, None)
    })
    .await;
    let e = reg.open("victim").await.unwrap_err();
    assert!(matches!(e, Error::Vmm(VmmError::Dead { .. })), "{e}");
    assert!(e.to_string().contains("capsa rm victim"), "{e}");
    drop(sb);
    reg.remove("victim", false).await.unwrap();
    assert!(!rec.dir.exists());
}

#[tokio::test]
async fn power_off_is_recorded_and_start_boots_again() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = registry(&tmp);
    let _c = Cleanup(reg.root().clone(), "phoenix");
    let sb = reg
        .create(
            common::sandbox()
                .name("phoenix")
                .memory_mb(256)
                .workdir("/tmp"),
        )
        .await
        .unwrap();
    // Held: dropping the child would close its stream and the agent would kill it.
    let _child = sb
        .spawn(&Command::new("sh").args(["-c", "sleep 1; poweroff -f"]))
        .await
        .unwrap();
    eventually("the record to say stopped", 60, || {
        reg.get("phoenix")
            .is_ok_and(|r| r.state == SandboxState::Stopped)
    })
    .await;
    let rec = reg.get("phoenix").unwrap();
    assert_eq!(rec.exit, Some(ExitReason::PoweredOff));
    assert_eq!(sb.vm().wait().await.unwrap(), ExitReason::PoweredOff);
    drop((_child, sb));
    let e = reg.open("phoenix").await.unwrap_err();
    assert!(matches!(e, Error::Vmm(VmmError::Stopped { .. })), "{e}");
    let again = reg.start("phoenix").await.unwrap();
    let out = again.exec(&Command::new("pwd")).await.unwrap();
    assert_eq!(out.stdout, b"/tmp\n", "workdir restored from sandbox.json");
    assert_eq!(reg.get("phoenix").unwrap().state, SandboxState::Running);
    drop(again);
    reg.remove("phoenix", true).await.unwrap();
}

#[tokio::test]
async fn dropped_ephemeral_monitor_sandbox_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = registry(&tmp);
    let sb = common::sandbox()
        .strategy(Strategy::Monitor)
        .state_root(tmp.path())
        .name("fleeting")
        .memory_mb(256)
        .build()
        .await
        .unwrap();
    let rec = sb.record().unwrap();
    assert_eq!(rec.state, SandboxState::Running);
    let out = sb.exec(&Command::new("echo").arg("hi")).await.unwrap();
    assert_eq!(out.stdout, b"hi\n");
    let (mon, qemu) = (rec.monitor_pid.unwrap(), rec.vmm_pid.unwrap());
    drop(sb);
    eventually("monitor, QEMU and state dir to go", 15, || {
        !process_alive(mon, None) && !process_alive(qemu, None) && !rec.dir.exists()
    })
    .await;
    assert!(reg.list().unwrap().is_empty());
}

#[tokio::test]
async fn registry_refuses_bad_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = registry(&tmp);
    let e = common::sandbox()
        .keep_running(true)
        .build()
        .await
        .unwrap_err();
    assert!(e.to_string().contains(".name("), "{e}");
    let e = reg
        .create(common::sandbox().name("Bad/Name"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("[a-z0-9]"), "{e}");
    let e = reg.open("nobody").await.unwrap_err();
    assert!(matches!(e, Error::Vmm(VmmError::NotFound { .. })), "{e}");
    let e = reg.remove("nobody", true).await.unwrap_err();
    assert!(matches!(e, Error::Vmm(VmmError::NotFound { .. })), "{e}");
    // An over-long state root is refused before anything starts, with the fix.
    let deep = tmp.path().join("d".repeat(90));
    let e = common::sandbox()
        .strategy(Strategy::Monitor)
        .state_root(&deep)
        .name("x")
        .build()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("CAPSA_STATE_DIR"), "{e}");
    assert!(common::qemu_children().is_empty());
}

/// `stop` then an immediate `start`: the old monitor must have let go of its
/// sockets (vsock.sock, monitor.sock) by the time the stop is recorded, so
/// the new monitor can bind them at once.
#[tokio::test]
async fn stop_then_immediate_start() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = registry(&tmp);
    let _c = Cleanup(reg.root().clone(), "lazarus");
    for round in 0..2 {
        let sb = if round == 0 {
            reg.create(common::sandbox().name("lazarus").memory_mb(256))
                .await
                .unwrap()
        } else {
            reg.start("lazarus").await.unwrap()
        };
        let out = sb.exec(&Command::new("true")).await.unwrap();
        assert_eq!(out.status.code, Some(0));
        sb.kill().await.unwrap();
        drop(sb);
        // No waiting: the record says stopped, so start must work now.
        let rec = reg.get("lazarus").unwrap();
        assert_eq!(rec.state, SandboxState::Stopped, "round {round}");
    }
    let again = reg.start("lazarus").await.unwrap();
    again.exec(&Command::new("true")).await.unwrap();
    drop(again);
    reg.remove("lazarus", true).await.unwrap();
}
