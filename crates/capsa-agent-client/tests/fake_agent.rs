//! The client against scripted fake agents (in-memory streams): error
//! mapping, deadlines, protocol violations, connection handling. The real
//! agent is exercised end to end in `capsa-guest`'s tests.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capsa_agent_client::{
    AgentClient, AgentClientError, AgentError, AgentFrame, BoxedStream, ErrorKind, ExecRequest,
    ExitStatus, WriteFileRequest,
};
use capsa_proto::{asynch, ClientFrame, Request};
use tokio::io::{AsyncReadExt, DuplexStream};

type Script = Arc<dyn Fn(DuplexStream) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A client whose every connection is served by `script` on a task.
fn client_with<F, Fut>(script: F) -> (AgentClient, Arc<AtomicUsize>)
where
    F: Fn(DuplexStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let script: Script = Arc::new(move |s| Box::pin(script(s)));
    let connects = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&connects);
    let client = AgentClient::new(move || {
        let script = Arc::clone(&script);
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let (ours, theirs) = tokio::io::duplex(1 << 20);
            tokio::spawn(script(theirs));
            Ok(Box::new(ours) as BoxedStream)
        }
    });
    (client, connects)
}

async fn read_open(s: &mut DuplexStream) -> Request {
    match asynch::read_frame::<ClientFrame>(s).await.unwrap() {
        ClientFrame::Open { version, request } => {
            assert_eq!(version, capsa_proto::PROTOCOL_VERSION);
            request
        }
        other => panic!("first frame {other:?}"),
    }
}

async fn reply(s: &mut DuplexStream, f: AgentFrame) {
    asynch::write_frame(s, &f).await.unwrap();
}

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn remote_errors_keep_their_kind() {
    let (c, _) = client_with(|mut s| async move {
        read_open(&mut s).await;
        reply(
            &mut s,
            AgentFrame::Error(AgentError {
                kind: ErrorKind::NotFound,
                message: "gone".into(),
            }),
        )
        .await;
    });
    let err = c.stat("/x", T).await.unwrap_err();
    assert_eq!(err.remote_kind(), Some(ErrorKind::NotFound));
    assert!(err.to_string().contains("gone"), "{err}");
}

#[tokio::test]
async fn deadlines_are_enforced() {
    let (c, _) = client_with(|mut s| async move {
        read_open(&mut s).await;
        // Never answer, never close.
        std::future::pending::<()>().await;
    });
    let start = Instant::now();
    let err = c.info(Duration::from_millis(200)).await.unwrap_err();
    assert!(
        matches!(err, AgentClientError::Timeout { op: "info", .. }),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn wrong_reply_is_a_protocol_error_and_early_close_is_io() {
    let (c, _) = client_with(|mut s| async move {
        read_open(&mut s).await;
        reply(&mut s, AgentFrame::Ready).await;
    });
    assert!(matches!(
        c.stat("/x", T).await,
        Err(AgentClientError::Protocol(_))
    ));
    let (c, _) = client_with(|mut s| async move {
        read_open(&mut s).await;
    });
    match c.info(T).await {
        Err(AgentClientError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
        other => panic!("{other:?}"),
    }
    // Garbage from the agent.
    let (c, _) = client_with(|mut s| async move {
        read_open(&mut s).await;
        use tokio::io::AsyncWriteExt;
        s.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).await.unwrap();
    });
    assert!(matches!(
        c.info(T).await,
        Err(AgentClientError::Protocol(_))
    ));
}

#[tokio::test]
async fn connect_failures_and_invalid_requests() {
    let c = AgentClient::new(|| async {
        Err::<BoxedStream, _>(io::Error::new(io::ErrorKind::ConnectionRefused, "no vm"))
    });
    assert!(matches!(c.info(T).await, Err(AgentClientError::Connect(_))));

    let (c, connects) = client_with(|_| async {});
    assert!(matches!(
        c.stat("relative", T).await,
        Err(AgentClientError::InvalidRequest(_))
    ));
    assert!(matches!(
        c.exec(ExecRequest::default(), T).await,
        Err(AgentClientError::InvalidRequest(_))
    ));
    assert_eq!(connects.load(Ordering::SeqCst), 0, "nothing was sent");
}

#[tokio::test]
async fn upload_failure_reports_the_agents_reason() {
    let (c, _) = client_with(|mut s| async move {
        read_open(&mut s).await;
        reply(&mut s, AgentFrame::Ready).await;
        let _ = asynch::read_frame::<ClientFrame>(&mut s).await;
        reply(
            &mut s,
            AgentFrame::Error(AgentError {
                kind: ErrorKind::Io,
                message: "No space left on device".into(),
            }),
        )
        .await;
        // Closing makes the client's next write fail.
    });
    let data = vec![1u8; 8 << 20];
    let err = c
        .write_file(
            WriteFileRequest {
                path: "/f".into(),
                mode: 0o644,
                mtime: None,
                create_parents: false,
            },
            &data[..],
            T,
        )
        .await
        .unwrap_err();
    assert_eq!(err.remote_kind(), Some(ErrorKind::Io), "{err}");
    assert!(err.to_string().contains("No space"), "{err}");
}

#[tokio::test]
async fn exec_streams_and_dropping_closes_the_connection() {
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<Vec<ClientFrame>>();
    let closed_tx = Arc::new(std::sync::Mutex::new(Some(closed_tx)));
    let (c, _) = client_with(move |mut s| {
        let closed_tx = Arc::clone(&closed_tx);
        async move {
            read_open(&mut s).await;
            reply(&mut s, AgentFrame::Started { pid: 42 }).await;
            reply(&mut s, AgentFrame::Stdout(b"hello ".to_vec())).await;
            reply(&mut s, AgentFrame::Stderr(b"warn".to_vec())).await;
            reply(&mut s, AgentFrame::Stdout(b"world".to_vec())).await;
            // Then wait for the client to go away, recording what it sent.
            let mut seen = Vec::new();
            while let Ok(f) = asynch::read_frame::<ClientFrame>(&mut s).await {
                seen.push(f);
            }
            if let Some(tx) = closed_tx.lock().unwrap().take() {
                let _ = tx.send(seen);
            }
        }
    });
    let mut child = c
        .exec(
            ExecRequest {
                argv: vec!["x".into()],
                stdin: true,
                ..Default::default()
            },
            T,
        )
        .await
        .unwrap();
    assert_eq!(child.pid(), 42);
    let mut out = child.stdout().unwrap();
    let mut err = child.stderr().unwrap();
    let mut buf = [0u8; 11];
    out.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello world");
    let mut e = [0u8; 4];
    err.read_exact(&mut e).await.unwrap();
    assert_eq!(&e, b"warn");
    child.signal(15).await.unwrap();
    drop(child.stdin());
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(child);
    let seen = tokio::time::timeout(T, closed_rx)
        .await
        .expect("dropping the ExecChild closes the connection")
        .unwrap();
    assert_eq!(seen, vec![ClientFrame::Signal(15), ClientFrame::StdinEof]);
    // The caller's output streams end when the exec is gone.
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn exec_output_collects_and_waits() {
    let (c, _) = client_with(|mut s| async move {
        read_open(&mut s).await;
        reply(&mut s, AgentFrame::Started { pid: 7 }).await;
        for i in 0..100u8 {
            reply(&mut s, AgentFrame::Stdout(vec![i; 1000])).await;
        }
        reply(
            &mut s,
            AgentFrame::Exited(ExitStatus {
                code: Some(3),
                signal: None,
                timed_out: false,
            }),
        )
        .await;
    });
    let out = c
        .exec_output(
            ExecRequest {
                argv: vec!["x".into()],
                ..Default::default()
            },
            T,
        )
        .await
        .unwrap();
    assert_eq!(out.status.code, Some(3));
    assert_eq!(out.stdout.len(), 100_000);
    assert!(out
        .stdout
        .chunks(1000)
        .enumerate()
        .all(|(i, c)| c.iter().all(|&b| b == i as u8)));
    assert!(out.stderr.is_empty());
}

#[tokio::test]
async fn list_dir_follows_pages() {
    let (c, connects) = client_with(|mut s| async move {
        let Request::ListDirPage { after, .. } = read_open(&mut s).await else {
            panic!("expected ListDirPage");
        };
        let start = after.map_or(0, |a| a.parse::<u32>().unwrap() + 1);
        let entries = (start..(start + 3).min(8))
            .map(|i| capsa_agent_client::DirEntry {
                name: format!("{i}"),
                meta: capsa_agent_client::FileMeta {
                    kind: capsa_agent_client::FileKind::File,
                    size: 0,
                    mode: 0o644,
                    mtime: (0, 0),
                },
            })
            .collect();
        reply(
            &mut s,
            AgentFrame::EntriesPage {
                entries,
                more: start + 3 < 8,
            },
        )
        .await;
    });
    let names: Vec<String> = c
        .list_dir("/d", T)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["0", "1", "2", "3", "4", "5", "6", "7"]);
    assert_eq!(connects.load(Ordering::SeqCst), 3);
}

/// `wait` as one branch of a `select!` loop that also resizes (what an
/// interactive terminal does on every SIGWINCH): the waits that lose the race
/// are dropped, and the one that wins still gets the status. A bad signal is
/// an error of that call only.
#[tokio::test]
async fn wait_is_cancel_safe_and_failed_side_calls_do_not_end_the_exec() {
    let (c, _) = client_with(|mut s| async move {
        read_open(&mut s).await;
        reply(&mut s, AgentFrame::Started { pid: 9 }).await;
        let mut resizes = 0;
        while resizes < 20 {
            match asynch::read_frame::<ClientFrame>(&mut s).await {
                Ok(ClientFrame::Resize(_)) => resizes += 1,
                Ok(ClientFrame::Signal(n)) => assert!((1..=64).contains(&n), "sent signal {n}"),
                Ok(_) => {}
                Err(_) => return,
            }
        }
        reply(&mut s, AgentFrame::Stdout(b"done".to_vec())).await;
        reply(
            &mut s,
            AgentFrame::Exited(ExitStatus {
                code: Some(5),
                signal: None,
                timed_out: false,
            }),
        )
        .await;
    });
    let mut child = c
        .exec(
            ExecRequest {
                argv: vec!["x".into()],
                pty: Some(capsa_proto::PtySize { rows: 24, cols: 80 }),
                ..Default::default()
            },
            T,
        )
        .await
        .unwrap();
    let e = child.signal(0).await.unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");
    assert!(child.signal(65).await.is_err());
    let out = child.stdout().unwrap();
    let drain = tokio::spawn(async move {
        let mut v = Vec::new();
        let mut out = out;
        out.read_to_end(&mut v).await.map(|_| v)
    });
    let mut rows = 10;
    let status = tokio::time::timeout(T, async {
        loop {
            tokio::select! {
                st = child.wait() => break st,
                _ = tokio::time::sleep(Duration::from_millis(2)) => {
                    rows += 1;
                    child.resize(rows, 80).await.unwrap();
                }
            }
        }
    })
    .await
    .expect("the exec ends")
    .expect("a wait dropped by select! must not poison the next one");
    assert_eq!(status.code, Some(5));
    assert_eq!(child.wait().await.unwrap().code, Some(5));
    assert_eq!(drain.await.unwrap().unwrap(), b"done");
}
