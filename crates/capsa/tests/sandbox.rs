//! Sandboxes on real VMs: exec and files through the guest agent over vsock.

mod common;

/// Set by the `monitor_*` test binaries that include this suite.
#[allow(dead_code)]
const FORCE_MONITOR: bool = false;

use std::time::{Duration, UNIX_EPOCH};

use capsa::{Command, Error, ErrorKind, Sandbox};
use sha2::{Digest, Sha256};

async fn sandbox(mem: u64) -> Sandbox {
    common::sandbox()
        .memory_mb(mem)
        .build()
        .await
        .expect("sandbox boots")
}

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

#[tokio::test]
async fn exit_codes_signals_and_missing_programs() {
    let sb = sandbox(256).await;
    let out = sb.exec(&Command::new("true")).await.unwrap();
    assert_eq!(out.status.code, Some(0));
    let out = sb.exec(&Command::new("false")).await.unwrap();
    assert_eq!(out.status.code, Some(1));
    let out = sb
        .exec(&Command::new("sh").args(["-c", "no-such-command"]))
        .await
        .unwrap();
    assert_eq!(out.status.code, Some(127));
    let out = sb
        .exec(&Command::new("sh").args(["-c", "kill -9 $$"]))
        .await
        .unwrap();
    assert_eq!((out.status.code, out.status.signal), (None, Some(9)));
    let e = sb
        .exec(&Command::new("/no/such/program"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Agent(a) if a.remote_kind() == Some(ErrorKind::NotFound)),
        "{e}"
    );
    let out = sb
        .exec(&Command::new("sh").args(["-c", "echo to-out; echo to-err >&2"]))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"to-out\n");
    assert_eq!(out.stderr, b"to-err\n");
    let out = sb
        .exec(
            &Command::new("sh")
                .args(["-c", "echo $GREETING; pwd"])
                .env("GREETING", "hi")
                .current_dir("/tmp"),
        )
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n/tmp\n");

    // PID 1 keeps its signals blocked for its own loop; a command must start
    // with none blocked, whichever way the agent spawned it.
    let status = "grep SigBlk /proc/self/status";
    for (what, cmd) in [
        ("plain", Command::new("sh").args(["-c", status])),
        (
            "cwd",
            Command::new("sh").args(["-c", status]).current_dir("/tmp"),
        ),
        ("pty", Command::new("sh").args(["-c", status]).pty(24, 80)),
    ] {
        let out = sb.exec(&cmd).await.unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mask = text.split_whitespace().nth(1).unwrap_or("missing");
        assert_eq!(
            mask, "0000000000000000",
            "{what}: blocked signals in {text:?}"
        );
    }
    let started = std::time::Instant::now();
    let out = sb
        .exec(&Command::new("sh").args(["-c", "timeout 1 sleep 30; echo rc=$?"]))
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "rc=143\n");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "timeout's SIGTERM was ignored"
    );
}

#[tokio::test]
async fn fifty_mib_of_stdout_arrives_intact() {
    let sb = sandbox(512).await;
    let gen = sb
        .exec(&Command::new("sh").args([
            "-c",
            "head -c 52428800 /dev/urandom > /tmp/big && sha256sum /tmp/big",
        ]))
        .await
        .unwrap();
    assert_eq!(
        gen.status.code,
        Some(0),
        "{}",
        String::from_utf8_lossy(&gen.stderr)
    );
    let guest_sum = String::from_utf8_lossy(&gen.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let out = sb.exec(&Command::new("cat").arg("/tmp/big")).await.unwrap();
    assert_eq!(out.stdout.len(), 50 << 20);
    assert_eq!(hex(Sha256::digest(&out.stdout)), guest_sum);
}

#[tokio::test]
async fn stdin_streams_into_sha256sum() {
    let sb = sandbox(256).await;
    let data = random_bytes(8 << 20, 99);
    let out = sb
        .exec(&Command::new("sha256sum").stdin_bytes(data.clone()))
        .await
        .unwrap();
    let got = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        got.split_whitespace().next().unwrap(),
        hex(Sha256::digest(&data))
    );
}

#[tokio::test]
async fn output_streams_as_produced() {
    let sb = sandbox(256).await;
    let mut child = sb
        .spawn(&Command::new("sh").args(["-c", "echo first; sleep 3; echo second"]))
        .await
        .unwrap();
    let mut out = child.stdout().unwrap();
    let mut buf = [0u8; 64];
    use tokio::io::AsyncReadExt;
    let t = std::time::Instant::now();
    let n = out.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"first\n");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "first line must arrive before the sleep ends"
    );
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"second\n");
    assert_eq!(child.wait().await.unwrap().code, Some(0));
}

/// What an interactive session does on every SIGWINCH, a thousand times over
/// while the PTY streams output: `wait` races the resizes in one `select!`
/// loop (losing the race must not poison it), the last size is the one the
/// guest sees, and the exit code is the program's.
#[tokio::test]
async fn a_thousand_resizes_while_output_streams() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sb = sandbox(256).await;
    let mut child = sb
        .spawn(
            &Command::new("sh")
                .args([
                    "-c",
                    "stty -echo; yes line | head -n 20000; read go; echo size=$(stty size); exit 7",
                ])
                .pty(24, 80),
        )
        .await
        .unwrap();
    let mut out = child.stdout().unwrap();
    let mut stdin = child.stdin().unwrap();
    let reader = tokio::spawn(async move {
        let mut v = Vec::new();
        out.read_to_end(&mut v).await.map(|_| v)
    });
    let mut sent = 0u32;
    let status = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            tokio::select! {
                st = child.wait() => break st,
                _ = std::future::ready(()), if sent < 1000 => {
                    child
                        .resize(20 + (sent % 40) as u16, 60 + (sent % 90) as u16)
                        .await
                        .expect("a resize of a running exec");
                    sent += 1;
                    if sent == 1000 {
                        child.resize(33, 111).await.unwrap();
                        stdin.write_all(b"go\n").await.unwrap();
                    }
                }
            }
        }
    })
    .await
    .expect("the exec ends")
    .expect("wait succeeds after a thousand resizes");
    assert_eq!(sent, 1000);
    assert_eq!((status.code, status.signal), (Some(7), None));
    let out = String::from_utf8_lossy(&reader.await.unwrap().unwrap()).into_owned();
    assert_eq!(
        out.matches("line\r\n").count(),
        20000,
        "output lost or mangled"
    );
    assert!(
        out.contains("size=33 111"),
        "{}",
        &out[out.len().saturating_sub(300)..]
    );
}

#[tokio::test]
async fn twenty_concurrent_execs() {
    let sb = sandbox(512).await;
    let runs = (0..20).map(|i| {
        let sb = &sb;
        async move {
            let out = sb
                .exec(&Command::new("sh").args(["-c", &format!("sleep 1; echo $(({i} * {i}))")]))
                .await
                .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                (i * i).to_string()
            );
        }
    });
    futures::future::join_all(runs).await;
}

#[tokio::test]
async fn long_exec_and_timeout() {
    let sb = sandbox(256).await;
    let t = std::time::Instant::now();
    let long_cmd = Command::new("sh").args(["-c", "sleep 31; echo survived"]);
    let short_cmd = Command::new("sleep")
        .arg("30")
        .timeout(Duration::from_secs(1));
    let (long, short) = tokio::join!(sb.exec(&long_cmd), sb.exec(&short_cmd));
    let short = short.unwrap();
    assert!(short.status.timed_out, "{:?}", short.status);
    assert_eq!(short.status.signal, Some(9));
    let long = long.unwrap();
    assert_eq!(long.stdout, b"survived\n");
    assert!(t.elapsed() >= Duration::from_secs(31));
}

#[tokio::test]
async fn two_hundred_mib_file_round_trip_keeps_mode_and_mtime() {
    let sb = sandbox(1024).await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("blob");
    let data = random_bytes(200 << 20, 7);
    std::fs::write(&src, &data).unwrap();
    let mtime = UNIX_EPOCH + Duration::new(1_600_000_000, 123_456_789);
    let f = tokio::fs::File::open(&src).await.unwrap();
    let meta = sb
        .write_file_from("/tmp/in/blob", f, 0o640, Some(mtime))
        .await
        .unwrap();
    assert_eq!(meta.size, 200 << 20);
    assert_eq!(meta.mode, 0o640);
    assert_eq!(meta.mtime, (1_600_000_000, 123_456_789));
    let out = sb
        .exec(&Command::new("sha256sum").arg("/tmp/in/blob"))
        .await
        .unwrap();
    let want = hex(Sha256::digest(&data));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&want));
    // And back out, through copy_out, keeping mode and mtime on the host.
    let back = dir.path().join("back");
    sb.copy_out("/tmp/in/blob", &back).await.unwrap();
    let got = std::fs::read(&back).unwrap();
    assert_eq!(hex(Sha256::digest(&got)), want);
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::metadata(&back).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o640);
    assert_eq!(m.modified().unwrap(), mtime);
}

#[tokio::test]
async fn directories_copy_in_and_out() {
    let sb = sandbox(256).await;
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    std::fs::write(tree.join("top.txt"), b"top").unwrap();
    std::fs::write(tree.join("a/b/deep.sh"), b"#!/bin/sh\necho deep\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        tree.join("a/b/deep.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    sb.copy_in(&tree, "/work/tree").await.unwrap();
    let out = sb
        .exec(&Command::new("/work/tree/a/b/deep.sh"))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"deep\n");
    sb.exec(&Command::new("sh").args(["-c", "echo made > /work/tree/a/new.txt"]))
        .await
        .unwrap();
    let back = dir.path().join("back");
    sb.copy_out("/work/tree", &back).await.unwrap();
    assert_eq!(std::fs::read(back.join("top.txt")).unwrap(), b"top");
    assert_eq!(std::fs::read(back.join("a/new.txt")).unwrap(), b"made\n");
    let m = std::fs::metadata(back.join("a/b/deep.sh")).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o755);
}

#[tokio::test]
async fn file_errors_are_typed() {
    let sb = sandbox(256).await;
    let e = sb.read_file("/no/such/file").await.unwrap_err();
    assert!(
        matches!(&e, Error::Agent(a) if a.remote_kind() == Some(ErrorKind::NotFound)),
        "{e}"
    );
    let out = sb
        .exec(&Command::new("sh").args(["-c", "mkdir -p /ro && mount -t tmpfs -o ro tmpfs /ro"]))
        .await
        .unwrap();
    assert_eq!(
        out.status.code,
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = sb.write_file("/ro/x", b"nope").await.unwrap_err();
    assert!(
        matches!(&e, Error::Agent(a) if a.remote_kind() == Some(ErrorKind::PermissionDenied)),
        "{e}"
    );
    let meta = sb.write_file("/tmp/ok", b"fine").await.unwrap();
    assert_eq!(meta.size, 4);
    assert_eq!(sb.read_file("/tmp/ok").await.unwrap(), b"fine");
}
