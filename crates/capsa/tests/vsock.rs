//! Host<->guest vsock through capsa's own vhost-user device, and hostile
//! peers on it, on real VMs.

mod common;

/// Set by the `monitor_*` test binaries that include this suite.
#[allow(dead_code)]
const FORCE_MONITOR: bool = false;

use std::time::Duration;

use capsa::{Command, Sandbox};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn sandbox() -> Sandbox {
    common::sandbox()
        .memory_mb(256)
        .build()
        .await
        .expect("sandbox boots")
}

#[tokio::test]
async fn guest_service_via_vsock_connect() {
    let sb = sandbox().await;
    // A guest echo service: capsa-init's tiny socat runs `cat` per connection.
    let mut svc = sb
        .spawn(&Command::new("/init").args(["vsock-serve", "5000", "--", "cat"]))
        .await
        .unwrap();
    let _out = svc.stdout();
    let mut conn = None;
    for _ in 0..50 {
        match sb.vsock_connect(5000).await {
            Ok(c) => {
                conn = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let conn = conn.expect("guest service reachable");
    let (mut r, mut w) = conn.into_split();
    let payload: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7 + i / 251) as u8).collect();
    let send = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&send).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    assert_eq!(back, payload, "1 MiB echoed intact through the guest");
    // Several connections to the same port at once.
    let many = (0..8).map(|i| {
        let sb = &sb;
        async move {
            let mut c = sb.vsock_connect(5000).await.unwrap();
            let msg = format!("conn-{i}\n");
            c.write_all(msg.as_bytes()).await.unwrap();
            let mut got = vec![0u8; msg.len()];
            c.read_exact(&mut got).await.unwrap();
            assert_eq!(got, msg.as_bytes());
        }
    });
    futures::future::join_all(many).await;
    svc.kill().await.unwrap();
}

#[tokio::test]
async fn host_service_via_vsock_listen() {
    let sb = sandbox().await;
    let listener = sb.vsock_listen(6000).unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(b"hello from the host\n").await.unwrap();
        got
    });
    let out = sb
        .exec(
            &Command::new("/init")
                .args(["vsock-connect", "2", "6000"])
                .stdin_bytes(b"ping from the guest".to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(
        out.status.code,
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"hello from the host\n");
    assert_eq!(server.await.unwrap(), b"ping from the guest");
    // Nobody listens on 6001: the guest's connect is refused, not hung.
    let out = sb
        .exec(
            &Command::new("/init")
                .args(["vsock-connect", "2", "6001"])
                .timeout(Duration::from_secs(20)),
        )
        .await
        .unwrap();
    assert!(
        !out.status.timed_out && out.status.code != Some(0),
        "{out:?}"
    );
}

#[tokio::test]
async fn hostile_host_peers_leave_device_and_agent_working() {
    let sb = sandbox().await;
    let before = sb.info().await.unwrap().mem_available_kib;
    let uds = sb.vm().vsock_socket().unwrap();
    // 1. Malformed hybrid handshakes: the device closes them.
    for bad in [
        &b"CONNECT banana\n"[..],
        b"HELLO 1024\n",
        &[b'A'; 4096][..],
        b"CONNECT 99999999999\n",
    ] {
        let mut s = tokio::net::UnixStream::connect(&uds).await.unwrap();
        let _ = s.write_all(bad).await;
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "device must close a bad handshake, got {r:?}"
        );
    }
    // 2. Hostile agent-protocol peers: oversized lengths, garbage, truncation, wrong version.
    let wrong_version = capsa_proto::encode(&capsa_proto::ClientFrame::Open {
        version: 999,
        request: capsa_proto::Request::Info,
    })
    .unwrap();
    let truncated = wrong_version[..wrong_version.len() - 1].to_vec();
    let mut garbage = vec![0u8; 4096];
    for (i, b) in garbage.iter_mut().enumerate() {
        *b = (i * 131 % 251) as u8;
    }
    let payloads: Vec<Vec<u8>> = vec![
        u32::MAX.to_le_bytes().to_vec(),
        (64u32 << 20)
            .to_le_bytes()
            .iter()
            .chain([0u8; 100].iter())
            .copied()
            .collect(),
        garbage,
        truncated,
        wrong_version,
    ];
    for p in payloads {
        for _ in 0..10 {
            let mut s = sb.vsock_connect(capsa_proto::AGENT_PORT).await.unwrap();
            let _ = s.write_all(&p).await;
            let _ = s.shutdown().await;
            let mut sink = Vec::new();
            let r = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut sink)).await;
            assert!(r.is_ok(), "agent must answer or close a hostile peer");
            assert!(sink.len() < 64 * 1024, "no large reply to garbage");
        }
    }
    // 3. Everything still works, and the guest did not lose memory to it.
    let out = sb
        .exec(&Command::new("echo").arg("still-alive"))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"still-alive\n");
    let after = sb.info().await.unwrap().mem_available_kib;
    assert!(
        after + 32 * 1024 > before,
        "guest memory dropped from {before} to {after} KiB"
    );
}
