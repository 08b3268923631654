//! The `capsa` binary, driven as a user would (stdin/stdout pipes).

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn capsa() -> Command {
    Command::new(env!("CARGO_BIN_EXE_capsa"))
}

/// Processes whose command line mentions `needle` (QEMU gets `-name ..,process=capsa-<name>`).
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(needle) && pid != std::process::id() {
                out.push(pid);
            }
        }
    }
    out
}

/// Reads the child's stdout on a thread, so waits can time out.
fn reader(mut out: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_for(rx: &mpsc::Receiver<Vec<u8>>, seen: &mut String, pat: &str, t: Duration) {
    let end = Instant::now() + t;
    while !seen.contains(pat) {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(b) => seen.push_str(&String::from_utf8_lossy(&b)),
            Err(_) => panic!("timed out waiting for {pat:?}; output so far:\n{seen}"),
        }
    }
}

#[test]
fn boot_shows_debian_kernel_and_detach_leaves_nothing() {
    let name = format!("clitest-{}", std::process::id());
    let mut child = capsa()
        .args(["boot", "--name", &name, "--memory", "256M"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let rx = reader(child.stdout.take().unwrap());
    let mut seen = String::new();
    wait_for(
        &rx,
        &mut seen,
        "capsa-init: ready",
        Duration::from_secs(120),
    );
    assert_eq!(
        processes_mentioning(&format!("capsa-{name}")).len(),
        1,
        "one QEMU runs"
    );
    stdin.write_all(b"echo \"K=$(uname -r)\"\n").unwrap();
    wait_for(&rx, &mut seen, "K=6.", Duration::from_secs(60));
    wait_for(&rx, &mut seen, "-amd64", Duration::from_secs(10));
    // Ctrl-] detaches: the VM is stopped and capsa exits.
    stdin.write_all(&[0x1d]).unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "capsa did not exit after detach");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("detached"), "{err}");
    assert!(
        processes_mentioning(&format!("capsa-{name}")).is_empty(),
        "QEMU left behind"
    );
}

#[test]
fn bad_flags_are_refused_with_a_fix() {
    let out = capsa().args(["boot", "--accel", "warp"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auto, kvm, tcg"), "{err}");

    let out = capsa()
        .args(["boot", "--memory", "0", "--name", "zero-mem"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid memory") && err.contains("Fix:"),
        "{err}"
    );
    assert!(processes_mentioning("capsa-zero-mem").is_empty());

    let out = capsa()
        .args([
            "boot",
            "--kernel",
            "/nonexistent/vmlinuz",
            "--initrd",
            "/nonexistent/initrd",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid kernel") && err.contains("--kernel"),
        "{err}"
    );

    let out = capsa()
        .args(["boot", "--disk", "/nonexistent/disk.img"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no such file"), "{err}");
}

#[test]
fn backends_json_lists_qemu() {
    let out = capsa().args(["backends", "--json"]).output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["name"], "qemu");
    assert_eq!(v[0]["available"], true);
    let formats = v[0]["capabilities"]["disk_formats"].as_array().unwrap();
    assert!(formats.iter().any(|f| f == "qcow2"));
}

#[test]
fn doctor_reports_every_check() {
    let out = capsa().arg("doctor").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "QEMU",
        "busybox",
        "guest kernel",
        "accelerator",
        "cache directory",
    ] {
        assert!(
            text.contains(needle),
            "doctor output lacks {needle}: {text}"
        );
    }
    assert!(out.status.success(), "{text}");
}

#[test]
fn image_ls_shows_the_default_bundle() {
    let out = capsa().args(["image", "build"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let out = capsa().args(["image", "ls", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v.as_array().unwrap().iter().any(|b| b["id"] == id.as_str()),
        "{v}"
    );
}

#[test]
fn run_streams_output_and_returns_the_exit_code() {
    let out = capsa()
        .args([
            "run",
            "--memory",
            "256M",
            "--env",
            "WHO=capsa",
            "--",
            "sh",
            "-c",
            "echo hi $WHO; echo oops >&2; exit 7",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"hi capsa\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("oops"));

    let mut child = capsa()
        .args(["run", "-i", "--memory", "256M", "--", "tr", "a-z", "A-Z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"shout this\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, b"SHOUT THIS\n");

    let out = capsa()
        .args(["run", "--timeout", "1", "--", "sleep", "30"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(124));
}

#[test]
fn run_copies_in_and_out() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.txt"), b"from the host\n").unwrap();
    let in_arg = format!("{}:/work/in.txt", dir.path().join("in.txt").display());
    let out_arg = format!("/work/out.txt:{}", dir.path().join("out.txt").display());
    let out = capsa()
        .args([
            "run",
            "--memory",
            "256M",
            "--copy-in",
            &in_arg,
            "--copy-out",
            &out_arg,
            "--",
        ])
        .args(["sh", "-c", "tr a-z A-Z < /work/in.txt > /work/out.txt"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(dir.path().join("out.txt")).unwrap(),
        b"FROM THE HOST\n"
    );
}

#[test]
fn run_ctrl_c_tears_the_sandbox_down() {
    let name = format!("ctrlc-{}", std::process::id());
    let child = capsa()
        .args([
            "run",
            "--name",
            &name,
            "--memory",
            "256M",
            "--",
            "sh",
            "-c",
            "echo started; sleep 300",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut child = child;
    let rx = reader(child.stdout.take().unwrap());
    let mut seen = String::new();
    wait_for(&rx, &mut seen, "started", Duration::from_secs(120));
    assert_eq!(processes_mentioning(&format!("capsa-{name}")).len(), 1);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let end = Instant::now() + Duration::from_secs(10);
    while !processes_mentioning(&format!("capsa-{name}")).is_empty() {
        assert!(Instant::now() < end, "QEMU outlived capsa run after Ctrl-C");
        std::thread::sleep(Duration::from_millis(100));
    }
}
