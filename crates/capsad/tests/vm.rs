//! The daemon with real VMs: lifecycle, streamed exec, big files, many
//! concurrent clients, and a daemon `kill -9` + restart that loses nothing.

mod common;

use std::time::{Duration, Instant};

use capsa_client::{Client, ClientError, ExecChunk};
use capsad::api::{CreateSandboxRequest, ExecRequest, SandboxState};
use futures::StreamExt;
use sha2::{Digest, Sha256};

fn small(name: &str) -> CreateSandboxRequest {
    CreateSandboxRequest {
        name: Some(name.into()),
        memory_mib: Some(256),
        start: true,
        ..Default::default()
    }
}

fn argv(a: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: a.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

async fn sh(c: &Client, name: &str, script: &str) -> String {
    let out = c
        .exec_output(name, &argv(&["sh", "-c", script]))
        .await
        .expect("exec");
    assert_eq!(
        out.code,
        Some(0),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_exec_and_streaming() {
    let d = common::Daemon::start();
    let c = d.client();
    let mut req = small("life");
    req.env.insert("GREETING".into(), "hi".into());
    let info = c.create(&req).await.expect("create");
    assert_eq!(info.state, SandboxState::Running);
    assert!(info.monitor_pid.is_some());
    // Same name again: conflict.
    match c.create(&req).await {
        Err(ClientError::Api { status, .. }) => assert_eq!(status, 409),
        other => panic!("{other:?}"),
    }
    let list = c.list().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(c.get("life").await.unwrap().name, "life");

    // Exec: output, env, exit code, stdin, stderr.
    assert_eq!(sh(&c, "life", "echo $GREETING").await, "hi\n");
    let mut r = argv(&["sh", "-c", "cat; echo err >&2; exit 3"]);
    r.stdin = Some("aGVsbG8=".into()); // "hello"
    let out = c.exec_output("life", &r).await.unwrap();
    assert_eq!(
        (out.code, &out.stdout[..], &out.stderr[..]),
        (Some(3), &b"hello"[..], &b"err\n"[..])
    );
    let mut r = argv(&["sleep", "10"]);
    r.timeout_ms = Some(500);
    assert!(c.exec_output("life", &r).await.unwrap().timed_out);

    // Streaming: the first line arrives well before the command ends.
    let t0 = Instant::now();
    let mut s = c
        .exec(
            "life",
            &argv(&["sh", "-c", "echo first; sleep 3; echo second"]),
        )
        .await
        .unwrap();
    let mut first_at = None;
    let mut all = Vec::new();
    while let Some(ch) = s.next().await {
        match ch.unwrap() {
            ExecChunk::Stdout(d) => {
                first_at.get_or_insert(t0.elapsed());
                all.extend(d);
            }
            ExecChunk::Stderr(_) => {}
            ExecChunk::Exit { code, .. } => {
                assert_eq!(code, Some(0));
                break;
            }
        }
    }
    let end = t0.elapsed();
    assert_eq!(all, b"first\nsecond\n");
    let first_at = first_at.unwrap();
    assert!(
        end - first_at >= Duration::from_secs(2),
        "first output at {first_at:?}, end at {end:?}"
    );

    // Console log has the boot.
    let log = c.console("life").await.unwrap();
    assert!(
        String::from_utf8_lossy(&log).contains("capsa-init"),
        "console: {}",
        String::from_utf8_lossy(&log)
    );

    // Stop, exec refused, start, exec again, kill, delete.
    assert_eq!(
        c.stop("life", None).await.unwrap().state,
        SandboxState::Stopped
    );
    match c.exec_output("life", &argv(&["true"])).await {
        Err(ClientError::Api { status, .. }) => assert_eq!(status, 409),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.start("life").await.unwrap().state, SandboxState::Running);
    assert_eq!(sh(&c, "life", "echo $GREETING").await, "hi\n");
    // Running: delete without force is a conflict.
    match c.delete("life", false).await {
        Err(ClientError::Api { status, .. }) => assert_eq!(status, 409),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.kill("life").await.unwrap().state, SandboxState::Stopped);
    c.delete("life", false).await.unwrap();
    assert!(c.list().await.unwrap().is_empty());
    match c.get("life").await {
        Err(ClientError::Api { status, .. }) => assert_eq!(status, 404),
        other => panic!("{other:?}"),
    }
}

/// Deterministic pseudo-random bytes (xorshift), streamed without buffering it all.
struct Noise {
    state: u64,
    left: u64,
}

impl tokio::io::AsyncRead for Noise {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let n = (buf.remaining() as u64).min(self.left) as usize / 8 * 8;
        let n = if n == 0 {
            (buf.remaining() as u64).min(self.left) as usize
        } else {
            n
        };
        let mut chunk = Vec::with_capacity(n + 8);
        while chunk.len() < n {
            let mut x = self.state;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.state = x;
            chunk.extend_from_slice(&x.to_le_bytes());
        }
        chunk.truncate(n);
        self.left -= n as u64;
        buf.put_slice(&chunk);
        std::task::Poll::Ready(Ok(()))
    }
}

struct HashWriter(Sha256, u64);

impl tokio::io::AsyncWrite for HashWriter {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        b: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.update(b);
        self.1 += b.len() as u64;
        std::task::Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_upload_and_download_match() {
    const SIZE: u64 = 100 << 20;
    let d = common::Daemon::start();
    let c = d.client();
    let mut req = small("files");
    req.memory_mib = Some(1024);
    c.create(&req).await.expect("create");

    let mut expect = Sha256::new();
    {
        use tokio::io::AsyncReadExt;
        let mut n = Noise {
            state: 0x9e3779b97f4a7c15,
            left: SIZE,
        };
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let k = n.read(&mut buf).await.unwrap();
            if k == 0 {
                break;
            }
            expect.update(&buf[..k]);
        }
    }
    let expect = format!("{:x}", expect.finalize());

    let t = Instant::now();
    let info = c
        .upload(
            "files",
            "/tmp/big.bin",
            0o600,
            Noise {
                state: 0x9e3779b97f4a7c15,
                left: SIZE,
            },
        )
        .await
        .expect("upload");
    eprintln!("upload 100 MiB: {:?}", t.elapsed());
    assert_eq!((info.size, info.mode), (SIZE, 0o600));
    assert_eq!(
        sh(&c, "files", "sha256sum /tmp/big.bin | cut -d' ' -f1")
            .await
            .trim(),
        expect
    );

    let t = Instant::now();
    let mut w = HashWriter(Sha256::new(), 0);
    let n = c
        .download("files", "/tmp/big.bin", &mut w)
        .await
        .expect("download");
    eprintln!("download 100 MiB: {:?}", t.elapsed());
    assert_eq!((n, w.1), (SIZE, SIZE));
    assert_eq!(format!("{:x}", w.0.finalize()), expect);

    // A missing file is a 404 JSON error, not an empty 200.
    match c.download("files", "/nope", tokio::io::sink()).await {
        Err(ClientError::Api { status, .. }) => assert_eq!(status, 404),
        other => panic!("{other:?}"),
    }
    c.delete("files", true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_clients_create_and_delete_without_leaks() {
    let d = common::Daemon::start();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let c = d.client();
        tasks.push(tokio::spawn(async move {
            let name = format!("c{i}");
            let info = c
                .create(&small(&name))
                .await
                .map_err(|e| format!("{name}: create: {e}"))?;
            if info.state != SandboxState::Running {
                return Err(format!("{name}: {:?}", info.state));
            }
            // A second create or delete of the same name while the first holds it.
            let out = c
                .exec_output(&name, &argv(&["echo", &name]))
                .await
                .map_err(|e| format!("{name}: exec: {e}"))?;
            if out.stdout != format!("{name}\n").as_bytes() {
                return Err(format!("{name}: stdout {:?}", out.stdout));
            }
            c.delete(&name, true)
                .await
                .map_err(|e| format!("{name}: delete: {e}"))?;
            Ok::<_, String>(())
        }));
    }
    let mut errors = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            errors.push(e);
        }
    }
    eprintln!("20 clients: {:?}", t.elapsed());
    assert!(errors.is_empty(), "{errors:#?}");
    let c = d.client();
    assert!(c.list().await.unwrap().is_empty());
    // Nothing left behind: processes, sockets, state dirs.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let procs = common::processes_mentioning(&d.dir.join("sandboxes").display().to_string());
    assert!(procs.is_empty(), "leaked processes: {procs:#?}");
    let left: Vec<_> = std::fs::read_dir(d.dir.join("sandboxes"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "leaked state: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_name_races_get_conflicts_not_corruption() {
    let d = common::Daemon::start();
    let c = d.client();
    let req = small("race");
    let (a, b) = tokio::join!(c.create(&req), c.create(&req));
    let ok = [a.is_ok(), b.is_ok()].iter().filter(|x| **x).count();
    assert_eq!(ok, 1, "{a:?} {b:?}");
    for r in [a, b] {
        if let Err(ClientError::Api { status, .. }) = r {
            assert_eq!(status, 409);
        }
    }
    let (x, y) = tokio::join!(c.delete("race", true), c.delete("race", true));
    assert!(x.is_ok() || y.is_ok(), "{x:?} {y:?}");
    for r in [x, y] {
        if let Err(ClientError::Api { status, .. }) = r {
            assert!(status == 409 || status == 404, "{status}");
        }
    }
    assert!(c.list().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_loses_nothing() {
    let mut d = common::Daemon::start();
    let c = d.client();
    for n in ["keep1", "keep2"] {
        c.create(&small(n)).await.expect("create");
    }
    d.kill9();
    let tmp = d.take_tmp();
    let dir = d.dir.clone();
    drop(d);
    // The stale socket is replaced; monitors kept the VMs.
    let mut d2 = common::Daemon::start_on(&dir, &[]);
    let c = d2.client();
    let list = c.list().await.unwrap();
    assert_eq!(
        list.iter()
            .map(|s| (s.name.as_str(), s.state))
            .collect::<Vec<_>>(),
        vec![
            ("keep1", SandboxState::Running),
            ("keep2", SandboxState::Running)
        ]
    );
    for n in ["keep1", "keep2"] {
        assert_eq!(sh(&c, n, "echo alive").await, "alive\n");
        c.delete(n, true).await.unwrap();
    }
    // Hand the temp dir to the second daemon's cleanup.
    if let Some(t) = tmp {
        d2.set_tmp(t);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_kvm_that_cannot_run_guests_is_a_422_with_a_fix() {
    let d = common::Daemon::start();
    let c = d.client();
    let mut req = small("kvm");
    req.accel = Some(capsad::api::AccelChoice::Kvm);
    match c.create(&req).await {
        Err(ClientError::Api { status, detail }) => {
            // Here (and in CI) /dev/kvm exists but guests die under it.
            assert_eq!(status, 422, "{detail:?}");
            let text = format!("{detail:?}");
            assert!(text.contains("KVM") && text.contains("tcg"), "{text}");
            // Nothing was left behind, and the daemon still serves.
            assert!(c.list().await.unwrap().is_empty());
        }
        Ok(info) => {
            // A host where KVM really runs guests: the force is honoured.
            assert_eq!(info.state, SandboxState::Running);
            c.delete("kvm", true).await.unwrap();
        }
        Err(e) => panic!("{e}"),
    }
}

/// A share in the create request, below `--allow-disk-dir`: mounted in the
/// guest, writes land on the host, read-only ones refuse writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_with_shares_through_the_api() {
    let tmp = tempfile::Builder::new()
        .prefix("cd")
        .tempdir_in("/tmp")
        .unwrap();
    let allowed = tempfile::tempdir().unwrap();
    let rw = allowed.path().join("rw");
    let ro = allowed.path().join("ro");
    std::fs::create_dir(&rw).unwrap();
    std::fs::create_dir(&ro).unwrap();
    std::fs::write(ro.join("r.txt"), b"read me").unwrap();
    let allow = allowed.path().display().to_string();
    let mut d = common::Daemon::start_on(tmp.path(), &["--allow-disk-dir", &allow]);
    d.set_tmp(tmp);
    let c = d.client();
    let mut req = small("shared");
    req.shares = vec![
        capsad::api::ShareRequest {
            host: rw.display().to_string(),
            guest: "/rw".into(),
            read_only: false,
        },
        capsad::api::ShareRequest {
            host: ro.display().to_string(),
            guest: "/ro".into(),
            read_only: true,
        },
    ];
    c.create(&req).await.expect("create with shares");
    assert_eq!(
        sh(&c, "shared", "cat /ro/r.txt; echo hi > /rw/w.txt").await,
        "read me"
    );
    assert_eq!(std::fs::read(rw.join("w.txt")).unwrap(), b"hi\n");
    let out = c
        .exec_output(
            "shared",
            &argv(&["sh", "-c", "mount -o remount,rw /ro && echo x > /ro/x"]),
        )
        .await
        .unwrap();
    assert_ne!(out.code, Some(0));
    assert!(!ro.join("x").exists());
    c.delete("shared", true).await.unwrap();
}
