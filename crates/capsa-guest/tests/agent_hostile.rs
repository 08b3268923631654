//! The host as a hostile or broken peer: garbage, lies about lengths,
//! truncation, wrong versions, frames out of place, too many connections.
//! The agent must answer an error or close, never panic, keep serving, and
//! keep its memory bounded.
//!
//! Most cases talk raw frames to `Agent::serve_connection` over a Unix
//! socketpair (the transport-agnostic handler, in this process); the memory
//! test runs the agent as its own process to measure it.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capsa_guest::agent::{Agent, AgentConfig, Reaping};
use capsa_proto::{
    encode, AgentFrame, ClientFrame, ErrorKind, ExecRequest, Request, WriteFileRequest, MAX_FRAME,
    PROTOCOL_VERSION,
};
use common::{
    eventually, group_alive, random_bytes, read_reply, read_until_close, send_frame, send_raw,
    socketpair_conn, InProcessAgent, ProcessAgent,
};

fn agent() -> Arc<Agent> {
    Agent::new(AgentConfig::default(), Reaping::PerChild)
}

fn open(request: Request) -> ClientFrame {
    ClientFrame::Open {
        version: PROTOCOL_VERSION,
        request,
    }
}

fn error_kind(frames: &[AgentFrame]) -> Option<ErrorKind> {
    frames.iter().find_map(|f| match f {
        AgentFrame::Error(e) => Some(e.kind),
        _ => None,
    })
}

/// The agent still answers a well-formed request.
fn still_serves(a: &Arc<Agent>) {
    let mut s = socketpair_conn(a);
    send_frame(&mut s, &open(Request::Info));
    match read_reply(&mut s) {
        Ok(Some(AgentFrame::Info(_))) => {}
        other => panic!("agent stopped serving: {other:?}"),
    }
}

#[test]
fn wrong_version_is_refused() {
    let a = agent();
    let mut s = socketpair_conn(&a);
    send_frame(
        &mut s,
        &ClientFrame::Open {
            version: PROTOCOL_VERSION + 1,
            request: Request::Info,
        },
    );
    let frames = read_until_close(&mut s);
    assert_eq!(error_kind(&frames), Some(ErrorKind::VersionMismatch));
    assert_eq!(frames.len(), 1);
}

#[test]
fn first_frame_must_be_open() {
    let a = agent();
    for f in [
        ClientFrame::Stdin(b"x".to_vec()),
        ClientFrame::End,
        ClientFrame::Signal(9),
    ] {
        let mut s = socketpair_conn(&a);
        send_frame(&mut s, &f);
        assert_eq!(
            error_kind(&read_until_close(&mut s)),
            Some(ErrorKind::InvalidInput)
        );
    }
    still_serves(&a);
}

#[test]
fn oversized_and_truncated_frames() {
    let a = agent();
    // A length above MAX_FRAME: refused from the prefix alone.
    for len in [u32::MAX, MAX_FRAME as u32 + 1] {
        let mut s = socketpair_conn(&a);
        send_raw(&mut s, &len.to_le_bytes());
        assert_eq!(
            error_kind(&read_until_close(&mut s)),
            Some(ErrorKind::InvalidInput)
        );
    }
    // Truncated: a valid prefix, part of the body, then the peer closes its side.
    let frame = encode(&open(Request::Stat {
        path: "/tmp".into(),
    }))
    .unwrap();
    for cut in [1, 3, 4, 5, frame.len() - 1] {
        let mut s = socketpair_conn(&a);
        send_raw(&mut s, &frame[..cut]);
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let frames = read_until_close(&mut s);
        assert!(
            frames.is_empty() || error_kind(&frames) == Some(ErrorKind::InvalidInput),
            "cut at {cut}: {frames:?}"
        );
    }
    still_serves(&a);
}

#[test]
fn garbage_never_kills_the_agent() {
    let a = agent();
    let mut seed = 0x5eed_u64;
    let start = Instant::now();
    for i in 0..400 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let len = (seed >> 33) as usize % 300;
        let mut bytes = random_bytes(len, seed | 1);
        // Half the cases carry a plausible small length prefix, so the body
        // reaches the decoder instead of failing on the length.
        if i % 2 == 0 && len >= 4 {
            let body = (len - 4) as u32;
            bytes[..4].copy_from_slice(&body.to_le_bytes());
        }
        let mut s = socketpair_conn(&a);
        send_raw(&mut s, &bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        for f in read_until_close(&mut s) {
            // Whatever garbage decodes to, the agent may answer it, but an
            // exec must not have started from random bytes without argv checks.
            if let AgentFrame::Started { pid } = f {
                panic!("garbage started a process {pid}");
            }
        }
    }
    still_serves(&a);
    eprintln!("400 garbage connections in {:?}", start.elapsed());
}

#[test]
fn unexpected_frames_mid_exec_kill_and_close() {
    let a = agent();
    let exec = |stdin| {
        open(Request::Exec(ExecRequest {
            argv: vec!["sleep".into(), "30".into()],
            stdin,
            ..Default::default()
        }))
    };
    for (stdin, bad) in [
        (true, ClientFrame::Data(vec![1, 2, 3])),
        (true, ClientFrame::End),
        (true, exec(true)),
        (
            false,
            ClientFrame::Stdin(b"no stdin was asked for".to_vec()),
        ),
        (true, ClientFrame::Signal(0)),
        (true, ClientFrame::Signal(1000)),
    ] {
        let mut s = socketpair_conn(&a);
        send_frame(&mut s, &exec(stdin));
        let pid = match read_reply(&mut s) {
            Ok(Some(AgentFrame::Started { pid })) => pid,
            other => panic!("{other:?}"),
        };
        send_frame(&mut s, &bad);
        let frames = read_until_close(&mut s);
        assert_eq!(
            error_kind(&frames),
            Some(ErrorKind::InvalidInput),
            "after {bad:?}: {frames:?}"
        );
        assert!(
            eventually(Duration::from_secs(5), || !group_alive(pid)),
            "process {pid} survived a protocol violation"
        );
    }
    // Stdin after StdinEof.
    let mut s = socketpair_conn(&a);
    send_frame(&mut s, &exec(true));
    assert!(matches!(
        read_reply(&mut s),
        Ok(Some(AgentFrame::Started { .. }))
    ));
    send_frame(&mut s, &ClientFrame::StdinEof);
    send_frame(&mut s, &ClientFrame::Stdin(b"late".to_vec()));
    assert_eq!(
        error_kind(&read_until_close(&mut s)),
        Some(ErrorKind::InvalidInput)
    );
    still_serves(&a);
}

#[test]
fn extreme_but_valid_values_do_not_panic() {
    let a = agent();
    let mut s = socketpair_conn(&a);
    send_frame(
        &mut s,
        &open(Request::Exec(ExecRequest {
            argv: vec!["true".into()],
            timeout_ms: Some(u64::MAX),
            pty: Some(capsa_proto::PtySize {
                rows: u16::MAX,
                cols: 0,
            }),
            uid: Some(u32::MAX - 1),
            gid: Some(u32::MAX - 1),
            ..Default::default()
        })),
    );
    let frames = read_until_close(&mut s);
    assert!(
        matches!(frames.last(), Some(AgentFrame::Exited(st)) if st.code == Some(0)),
        "{frames:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut s = socketpair_conn(&a);
    send_frame(
        &mut s,
        &open(Request::WriteFile(WriteFileRequest {
            path: dir.path().join("f").to_str().unwrap().into(),
            mode: u32::MAX,
            mtime: Some((i64::MIN, 999_999_999)),
            create_parents: true,
        })),
    );
    send_frame(&mut s, &ClientFrame::End);
    // Ready, then an answer (the kernel may refuse that mtime): no panic, no hang.
    let frames = read_until_close(&mut s);
    assert_eq!(frames.first(), Some(&AgentFrame::Ready), "{frames:?}");
    assert_eq!(frames.len(), 2, "{frames:?}");
    let mut s = socketpair_conn(&a);
    send_frame(
        &mut s,
        &open(Request::Mkdir {
            path: format!("{}/{}", dir.path().display(), "x".repeat(4000)),
            parents: true,
            mode: u32::MAX,
        }),
    );
    assert!(error_kind(&read_until_close(&mut s)).is_some());
    still_serves(&a);
}

#[test]
fn unexpected_frames_mid_upload_remove_the_temp_file() {
    let a = agent();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let mut s = socketpair_conn(&a);
    send_frame(
        &mut s,
        &open(Request::WriteFile(WriteFileRequest {
            path: path.to_str().unwrap().into(),
            mode: 0o644,
            mtime: None,
            create_parents: false,
        })),
    );
    assert_eq!(read_reply(&mut s), Ok(Some(AgentFrame::Ready)));
    send_frame(&mut s, &ClientFrame::Data(vec![0; 1000]));
    send_frame(&mut s, &ClientFrame::Stdin(vec![1]));
    assert_eq!(
        error_kind(&read_until_close(&mut s)),
        Some(ErrorKind::InvalidInput)
    );
    assert!(!path.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    // Invalid requests are answered, not acted on.
    for req in [
        Request::Stat {
            path: "relative".into(),
        },
        Request::ReadFile {
            path: "/x\0y".into(),
        },
        Request::Exec(ExecRequest::default()),
        Request::Exec(ExecRequest {
            argv: vec!["true".into()],
            env: vec![("A=B".into(), "c".into())],
            ..Default::default()
        }),
    ] {
        let mut s = socketpair_conn(&a);
        send_frame(&mut s, &open(req));
        assert_eq!(
            error_kind(&read_until_close(&mut s)),
            Some(ErrorKind::InvalidInput)
        );
    }
}

#[test]
fn connections_beyond_the_limit_are_busy() {
    let agent = InProcessAgent::start(AgentConfig {
        max_connections: 4,
        ..AgentConfig::default()
    });
    // Four connections that say nothing hold all slots.
    let idle: Vec<UnixStream> = (0..4)
        .map(|_| UnixStream::connect(agent.path()).unwrap())
        .collect();
    assert!(eventually(Duration::from_secs(5), || agent
        .agent
        .active_connections()
        == 4));
    let mut extra = UnixStream::connect(agent.path()).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    send_frame(&mut extra, &open(Request::Info));
    assert_eq!(
        error_kind(&read_until_close(&mut extra)),
        Some(ErrorKind::Busy)
    );
    drop(idle);
    assert!(eventually(Duration::from_secs(5), || agent
        .agent
        .active_connections()
        == 0));
    let mut ok = UnixStream::connect(agent.path()).unwrap();
    ok.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    send_frame(&mut ok, &open(Request::Info));
    assert!(matches!(read_reply(&mut ok), Ok(Some(AgentFrame::Info(_)))));
}

#[test]
fn silent_connections_are_closed_after_the_open_timeout() {
    let agent = InProcessAgent::start(AgentConfig {
        open_timeout: Duration::from_millis(300),
        ..AgentConfig::default()
    });
    let mut s = UnixStream::connect(agent.path()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Half a frame, then silence.
    send_raw(&mut s, &100u32.to_le_bytes());
    let start = Instant::now();
    assert!(read_until_close(&mut s).is_empty());
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(eventually(Duration::from_secs(2), || agent
        .agent
        .active_connections()
        == 0));
}

/// Many peers that announce the largest frame and send part of it, some
/// concurrently: the agent process's memory stays bounded and it keeps
/// serving.
#[test]
fn memory_stays_bounded_under_hostile_peers() {
    let mut agent = ProcessAgent::start();
    let path = agent.path().to_path_buf();
    let connect = || {
        let s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };
    // Warm up thread stacks and allocator arenas first.
    for _ in 0..20 {
        let mut s = connect();
        send_frame(&mut s, &open(Request::Info));
        read_until_close(&mut s);
    }
    let before = agent.rss_kib();

    let half = vec![0xA5u8; MAX_FRAME / 2];
    let mut rounds = 0;
    for _ in 0..6 {
        // 50 concurrent peers, each having sent half of a maximal frame.
        let mut held = Vec::new();
        for _ in 0..50 {
            let mut s = connect();
            send_raw(&mut s, &(MAX_FRAME as u32).to_le_bytes());
            let _ = s.write_all(&half);
            held.push(s);
        }
        // Then they all vanish mid-frame.
        drop(held);
        rounds += 1;
    }
    // Lies about lengths and garbage on top.
    for i in 0..200u32 {
        let mut s = connect();
        send_raw(&mut s, &(u32::MAX - i).to_le_bytes());
        read_until_close(&mut s);
    }
    assert!(eventually(Duration::from_secs(10), || agent.threads() <= 3));
    let after = agent.rss_kib();
    let mut s = connect();
    send_frame(&mut s, &open(Request::Info));
    assert!(matches!(read_reply(&mut s), Ok(Some(AgentFrame::Info(_)))));
    assert!(agent.is_running(), "the agent process died");
    eprintln!(
        "agent RSS {before} KiB before, {after} KiB after {rounds}x50 half-frame peers \
         (peak {} KiB)",
        common::status_kib(agent.pid(), "VmHWM")
    );
    // 300 half-frames alone would be 150 MiB if buffers leaked.
    assert!(
        after < before + 48 * 1024,
        "agent memory grew from {before} KiB to {after} KiB"
    );
    // 50 concurrent half frames are 25 MiB; allow for stacks and arenas.
    let peak = common::status_kib(agent.pid(), "VmHWM");
    assert!(peak < before + 96 * 1024, "agent peak memory {peak} KiB");
}
