//! The streaming endpoints on a real VM over the daemon's socket: the exec
//! WebSocket (stdin in, output out, exit event), the console WebSocket (the
//! guest's output, a typed line reaches the guest) and the SSE event stream.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use capsad::api::{CreateSandboxRequest, Event, ExecEvent, SandboxState};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::UnixStream>;

async fn ws(d: &common::Daemon, path: &str) -> Ws {
    let mut req = format!("ws://localhost{path}")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", d.token).parse().unwrap(),
    );
    let sock = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
    let (s, resp) = tokio_tungstenite::client_async(req, sock).await.unwrap();
    assert_eq!(resp.status().as_u16(), 101);
    s
}

async fn next_event(s: &mut Ws) -> ExecEvent {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(60), s.next())
            .await
            .expect("an exec event in time")
            .expect("stream open")
            .expect("frame");
        match m {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("exec event"),
            Message::Close(_) => panic!("closed before exit"),
            _ => {}
        }
    }
}

fn b64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_and_events() {
    let d = common::Daemon::start();
    let c = d.client();

    // SSE first, so the create shows up as it happens.
    let mut events = c.events().await.unwrap();
    c.create(&CreateSandboxRequest {
        name: Some("ws".into()),
        memory_mib: Some(256),
        start: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut saw_action, mut saw_running) = (false, false);
    while !(saw_action && saw_running) {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = tokio::time::timeout(left, events.next())
            .await
            .expect("create events in time")
            .expect("event stream open")
            .expect("event");
        match ev {
            Event::Action { name, action, ok } if name == "ws" && action == "create" => {
                assert!(ok);
                saw_action = true;
            }
            Event::State { name, state } if name == "ws" && state == SandboxState::Running => {
                saw_running = true;
            }
            _ => {}
        }
    }

    // Interactive exec: a line in, the line out (upper-cased), an exit event.
    let mut s = ws(&d, "/v1/sandboxes/ws/exec/ws").await;
    s.send(Message::Text(
        r#"{"argv":["sh","-c","read l; echo got:$l | tr a-z A-Z; exit 7"]}"#.into(),
    ))
    .await
    .unwrap();
    s.send(Message::Binary(b"hello\n".to_vec().into()))
        .await
        .unwrap();
    let mut out = Vec::new();
    let exit = loop {
        match next_event(&mut s).await {
            ExecEvent::Stdout { data } => out.extend(b64(&data)),
            ExecEvent::Stderr { data } => {
                panic!("stderr: {:?}", String::from_utf8_lossy(&b64(&data)))
            }
            ExecEvent::Exit { code, .. } => break code,
            ExecEvent::Error { message, .. } => panic!("exec error: {message}"),
        }
    };
    assert_eq!(String::from_utf8_lossy(&out), "GOT:HELLO\n");
    assert_eq!(exit, Some(7));

    // stdin EOF as a control message ends `cat`.
    let mut s = ws(&d, "/v1/sandboxes/ws/exec/ws").await;
    s.send(Message::Text(r#"{"argv":["cat"]}"#.into()))
        .await
        .unwrap();
    s.send(Message::Binary(b"abc".to_vec().into()))
        .await
        .unwrap();
    s.send(Message::Text(r#"{"type":"stdin_eof"}"#.into()))
        .await
        .unwrap();
    let mut out = Vec::new();
    loop {
        match next_event(&mut s).await {
            ExecEvent::Stdout { data } => out.extend(b64(&data)),
            ExecEvent::Exit { code, .. } => {
                assert_eq!(code, Some(0));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(out, b"abc");

    // A bad first message gets an error event, not a hang.
    let mut s = ws(&d, "/v1/sandboxes/ws/exec/ws").await;
    s.send(Message::Text(r#"{"argv":[]}"#.into()))
        .await
        .unwrap();
    assert!(matches!(next_event(&mut s).await, ExecEvent::Error { .. }));

    // Console: history (the boot) first, then a typed line reaches the guest's
    // console (its getty/shell echoes it, or the agent's console logs it; at
    // least the kernel's tty echoes the characters back).
    let mut s = ws(&d, "/v1/sandboxes/ws/console/ws").await;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Message::Binary(b) = tokio::time::timeout(left, s.next())
            .await
            .expect("console history in time")
            .unwrap()
            .unwrap()
        {
            seen.extend_from_slice(&b);
        }
    }
    // A reader of the guest's serial port, started before typing: the typed
    // line must arrive there (and the guest's tty echoes it to the console).
    let mut reader = c
        .exec(
            "ws",
            &capsad::api::ExecRequest {
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    "exec 3</dev/ttyS0; echo ready; head -n1 <&3".into(),
                ],
                timeout_ms: Some(60_000),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("ready") {
        match reader.next().await {
            Some(Ok(capsa_client::ExecChunk::Stdout(b))) => got.extend(b),
            other => panic!("reader: {other:?}"),
        }
    }
    s.send(Message::Binary(b"typed-line-17\n".to_vec().into()))
        .await
        .unwrap();
    let mut code = None;
    while let Some(ch) = reader.next().await {
        match ch.unwrap() {
            capsa_client::ExecChunk::Stdout(b) => got.extend(b),
            capsa_client::ExecChunk::Exit { code: c, .. } => {
                code = c;
                break;
            }
            _ => {}
        }
    }
    assert_eq!(code, Some(0));
    assert!(
        String::from_utf8_lossy(&got).contains("typed-line-17"),
        "the guest read {:?}",
        String::from_utf8_lossy(&got)
    );
    // And the guest's own console output reaches the WebSocket live.
    c.exec_output(
        "ws",
        &capsad::api::ExecRequest {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo console-marker-42 > /dev/console".into(),
            ],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    while !text(&seen).contains("console-marker-42") {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => seen.extend_from_slice(&b),
            Ok(Some(Ok(_))) => {}
            other => panic!("console ended: {other:?}; saw {:?}", text(&seen)),
        }
    }
    drop(s);

    c.delete("ws", true).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut removed = false;
    while !removed {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.next()).await {
            Ok(Some(Ok(Event::Removed { name }))) if name == "ws" => removed = true,
            Ok(Some(Ok(_))) => {}
            other => panic!("no removed event: {other:?}"),
        }
    }
}

/// Network decisions reach `/v1/events`. The daemon (and so the sandbox's
/// stack) runs in a fresh network namespace holding only `lo`, entered
/// before any thread or process starts; the denied flows never dial anyway.
#[test]
fn network_decisions_are_events() {
    // SAFETY: unshare has no memory preconditions; no other thread exists yet.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        panic!(
            "unshare(CLONE_NEWNET): {} (this test needs root)",
            std::io::Error::last_os_error()
        );
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let d = common::Daemon::start();
            let c = d.client();
            let mut events = c.events().await.unwrap();
            let network: capsa_core::NetworkSpec =
                serde_json::from_value(serde_json::json!({"policy": {"mode": "deny"}})).unwrap();
            c.create(&CreateSandboxRequest {
                name: Some("netev".into()),
                memory_mib: Some(256),
                start: true,
                network: Some(network),
                ..Default::default()
            })
            .await
            .unwrap();
            // Let the poller mark the sandbox before the decision is made.
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, events.next()).await {
                    Ok(Some(Ok(Event::State { name, state })))
                        if name == "netev" && state == SandboxState::Running =>
                    {
                        break
                    }
                    Ok(Some(Ok(_))) => {}
                    other => panic!("no running event: {other:?}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(1200)).await;
            let out = c
                .exec_output(
                    "netev",
                    &capsad::api::ExecRequest {
                        argv: vec![
                            "sh".into(),
                            "-c".into(),
                            "nc 198.18.0.9 81 </dev/null".into(),
                        ],
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            assert_ne!(out.code, Some(0), "a denied connect succeeded");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, events.next()).await {
                    Ok(Some(Ok(Event::Network { name, decision })))
                        if name == "netev" && decision.what == "198.18.0.9:81" =>
                    {
                        assert!(!decision.allowed);
                        assert!(!decision.reason.is_empty());
                        break;
                    }
                    Ok(Some(Ok(_))) => {}
                    other => panic!("no network event for the denied flow: {other:?}"),
                }
            }
            c.delete("netev", true).await.unwrap();
        });
}
