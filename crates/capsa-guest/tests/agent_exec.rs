//! Exec over the agent protocol, end to end: `capsa-init --agent-unix` as a
//! process (the guest's code paths, central reaping) driven by the real
//! async client over Unix sockets.

mod common;

use std::time::{Duration, Instant};

use capsa_agent_client::{AgentClientError, ErrorKind, ExecRequest, PtySize};
use common::{eventually, group_alive, hex, random_bytes, ProcessAgent};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(30);

fn cmd(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn sh(script: &str) -> ExecRequest {
    cmd(&["sh", "-c", script])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_reports_guest_facts() {
    let agent = ProcessAgent::start();
    let info = agent.client().info(T).await.unwrap();
    assert_eq!(info.protocol, capsa_proto::PROTOCOL_VERSION);
    assert_eq!(info.agent_version, capsa_guest::VERSION);
    assert!(!info.kernel.is_empty() && !info.hostname.is_empty());
    assert!(info.cpus >= 1 && info.mem_total_kib > 0 && info.uptime_secs > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_and_missing_programs() {
    let agent = ProcessAgent::start();
    let c = agent.client();
    let ok = c.exec_output(cmd(&["true"]), T).await.unwrap();
    assert_eq!((ok.status.code, ok.status.signal), (Some(0), None));
    assert!(ok.status.success());
    let one = c.exec_output(cmd(&["false"]), T).await.unwrap();
    assert_eq!(one.status.code, Some(1));
    assert_eq!(
        c.exec_output(sh("exit 42"), T).await.unwrap().status.code,
        Some(42)
    );

    for missing in ["capsa-no-such-program", "/no/such/program"] {
        let err = c.exec_output(cmd(&[missing]), T).await.unwrap_err();
        assert_eq!(
            err.remote_kind(),
            Some(ErrorKind::NotFound),
            "{missing}: {err}"
        );
    }
    let err = c
        .exec_output(
            ExecRequest {
                cwd: Some("/no/such/dir".into()),
                ..cmd(&["true"])
            },
            T,
        )
        .await
        .unwrap_err();
    // A bad cwd is the request's fault, never "program not found" (127).
    assert_eq!(err.remote_kind(), Some(ErrorKind::InvalidInput), "{err}");
    assert!(err.to_string().contains("/no/such/dir"), "{err}");
    // Rejected by the client before anything is sent.
    assert!(matches!(
        c.exec_output(ExecRequest::default(), T).await,
        Err(AgentClientError::InvalidRequest(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn death_by_signal() {
    let agent = ProcessAgent::start();
    let out = agent
        .client()
        .exec_output(sh("kill -9 $$"), T)
        .await
        .unwrap();
    assert_eq!((out.status.code, out.status.signal), (None, Some(9)));
    assert!(!out.status.timed_out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_mib_of_stdout_arrive_intact_and_in_order() {
    let agent = ProcessAgent::start();
    // `seq` output is ordered by construction: any loss, duplication or
    // reordering of chunks changes the hash.
    const N: u64 = 7_000_000;
    let mut want = Sha256::new();
    let mut want_len = 0u64;
    let mut line = String::new();
    for i in 1..=N {
        line.clear();
        use std::fmt::Write;
        let _ = writeln!(line, "{i}");
        want.update(line.as_bytes());
        want_len += line.len() as u64;
    }
    assert!(want_len > 50 << 20, "{want_len}");

    let mut child = agent
        .client()
        .exec(cmd(&["seq", "1", &N.to_string()]), T)
        .await
        .unwrap();
    let mut stdout = child.stdout().unwrap();
    let mut got = Sha256::new();
    let mut got_len = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    let start = Instant::now();
    loop {
        let n = stdout.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got.update(&buf[..n]);
        got_len += n as u64;
    }
    let st = child.wait().await.unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(st.success(), "{st:?}");
    assert_eq!(got_len, want_len);
    assert_eq!(hex(&got.finalize()), hex(&want.finalize()));
    eprintln!(
        "stdout throughput: {:.0} MiB/s ({want_len} bytes in {secs:.2} s)",
        want_len as f64 / (1 << 20) as f64 / secs
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_and_stderr_stay_apart() {
    let agent = ProcessAgent::start();
    let out = agent
        .client()
        .exec_output(
            sh("for i in $(seq 1 2000); do echo o$i; echo e$i >&2; done"),
            T,
        )
        .await
        .unwrap();
    assert!(out.status.success());
    let want = |p: &str| -> String { (1..=2000).map(|i| format!("{p}{i}\n")).collect() };
    assert_eq!(String::from_utf8(out.stdout).unwrap(), want("o"));
    assert_eq!(String::from_utf8(out.stderr).unwrap(), want("e"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_is_streamed_into_the_process() {
    let agent = ProcessAgent::start();
    let data = random_bytes(20 << 20, 42);
    let want = hex(&Sha256::digest(&data));
    let mut child = agent
        .client()
        .exec(
            ExecRequest {
                stdin: true,
                ..cmd(&["sha256sum"])
            },
            T,
        )
        .await
        .unwrap();
    let mut stdin = child.stdin().unwrap();
    let mut stdout = child.stdout().unwrap();
    let writer = tokio::spawn(async move {
        // Odd-sized writes: chunking on the way must not matter.
        for piece in data.chunks(100_003) {
            stdin.write_all(piece).await.unwrap();
        }
        stdin.shutdown().await.unwrap();
    });
    let mut out = String::new();
    stdout.read_to_string(&mut out).await.unwrap();
    writer.await.unwrap();
    assert!(child.wait().await.unwrap().success());
    assert_eq!(out.split_whitespace().next(), Some(want.as_str()));

    // Closing stdin without writing anything: `cat` sees EOF at once.
    let mut child = agent
        .client()
        .exec(
            ExecRequest {
                stdin: true,
                ..cmd(&["cat"])
            },
            T,
        )
        .await
        .unwrap();
    drop(child.stdin());
    let st = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("cat ended after stdin EOF")
        .unwrap();
    assert!(st.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_execs_at_once() {
    let agent = ProcessAgent::start();
    let c = agent.client();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..32 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let out = c
                .exec_output(
                    cmd(&[
                        "sh",
                        "-c",
                        "sleep 0.5; echo $0; echo x$0 >&2",
                        &i.to_string(),
                    ]),
                    T,
                )
                .await
                .unwrap();
            assert!(out.status.success());
            assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{i}\n"));
            assert_eq!(String::from_utf8(out.stderr).unwrap(), format!("x{i}\n"));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // 32 sequential runs would take 16 s.
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_and_reports() {
    let agent = ProcessAgent::start();
    let start = Instant::now();
    let out = agent
        .client()
        .exec_output(
            ExecRequest {
                timeout_ms: Some(1000),
                ..cmd(&["sleep", "30"])
            },
            T,
        )
        .await
        .unwrap();
    let took = start.elapsed();
    assert!(out.status.timed_out, "{:?}", out.status);
    assert_eq!(out.status.signal, Some(libc::SIGKILL));
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // The whole group dies, not only the leader.
    let out = agent
        .client()
        .exec_output(
            ExecRequest {
                timeout_ms: Some(500),
                ..sh("sleep 30 & echo $!; wait")
            },
            T,
        )
        .await
        .unwrap();
    assert!(out.status.timed_out);
    let bg: i32 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || {
        // SAFETY: signal 0 only checks for existence.
        unsafe { libc::kill(bg, 0) != 0 }
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_reach_the_process_group() {
    let agent = ProcessAgent::start();
    let c = agent.client();
    let mut child = c
        .exec(
            sh("trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.05; done"),
            T,
        )
        .await
        .unwrap();
    let mut stdout = child.stdout().unwrap();
    let mut buf = [0u8; 64];
    let n = stdout.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"ready\n");
    child.signal(libc::SIGTERM).await.unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).await.unwrap();
    let st = child.wait().await.unwrap();
    assert_eq!(rest, "got-term\n");
    assert_eq!(st.code, Some(7));

    let mut child = c.exec(cmd(&["sleep", "30"]), T).await.unwrap();
    child.kill().await.unwrap();
    let st = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(st.signal, Some(libc::SIGKILL));
    assert!(!st.timed_out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_exec_kills_the_process() {
    let agent = ProcessAgent::start();
    let child = agent
        .client()
        .exec(sh("sleep 30 & sleep 30"), T)
        .await
        .unwrap();
    let pgid = child.pid();
    assert!(group_alive(pgid));
    drop(child);
    assert!(
        eventually(Duration::from_secs(5), || !group_alive(pgid)),
        "process group {pgid} survived its connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pty_exec() {
    let agent = ProcessAgent::start();
    let c = agent.client();
    let pty = Some(PtySize { rows: 24, cols: 80 });
    let out = c
        .exec_output(
            ExecRequest {
                pty,
                ..sh("tty; stty size; echo to-stderr >&2")
            },
            T,
        )
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("/dev/pts/"), "{text:?}");
    assert_eq!(lines[1], "24 80");
    assert_eq!(lines[2], "to-stderr", "stderr merges into the terminal");
    assert!(out.stderr.is_empty());

    // Resize, then let the shell read a line and report the new size.
    let mut child = c
        .exec(
            ExecRequest {
                pty,
                ..sh("read line; stty size; echo got:$line")
            },
            T,
        )
        .await
        .unwrap();
    let mut stdin = child.stdin().unwrap();
    let mut stdout = child.stdout().unwrap();
    child.resize(40, 100).await.unwrap();
    stdin.write_all(b"hello\n").await.unwrap();
    let mut all = String::new();
    stdout.read_to_string(&mut all).await.unwrap();
    let st = child.wait().await.unwrap();
    assert!(st.success());
    let all = all.replace('\r', "");
    assert!(all.contains("40 100\n"), "{all:?}");
    assert!(all.contains("got:hello\n"), "{all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cwd_env_and_identity() {
    let agent = ProcessAgent::start();
    let out = agent
        .client()
        .exec_output(
            ExecRequest {
                cwd: Some("/tmp".into()),
                env: vec![
                    ("FOO".into(), "bar baz".into()),
                    ("TERM".into(), "dumb".into()),
                ],
                uid: Some(65534),
                gid: Some(65534),
                ..sh("pwd; echo $FOO; echo $TERM; echo $HOME; id -u; id -g; id -G")
            },
            T,
        )
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let home = if std::path::Path::new("/root").is_dir() {
        "/root"
    } else {
        "/"
    };
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("/tmp\nbar baz\ndumb\n{home}\n65534\n65534\n65534\n"),
        "supplementary groups must be dropped"
    );
    // Asked-for supplementary groups are set, in the order given.
    let out = agent
        .client()
        .exec_output(
            ExecRequest {
                uid: Some(65534),
                gid: Some(65534),
                groups: vec![50, 60],
                ..sh("id -u; id -G")
            },
            T,
        )
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "65534\n65534 50 60\n"
    );
    // More than the protocol allows is refused, not truncated.
    let err = agent
        .client()
        .exec_output(
            ExecRequest {
                groups: (0..65).collect(),
                ..sh("true")
            },
            T,
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("supplementary groups"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_round_trip_latency() {
    let agent = ProcessAgent::start();
    let c = agent.client();
    for _ in 0..10 {
        c.exec_output(cmd(&["true"]), T).await.unwrap();
    }
    let mut samples = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let out = c.exec_output(cmd(&["/bin/true"]), T).await.unwrap();
        samples.push(t.elapsed());
        assert!(out.status.success());
    }
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    eprintln!(
        "exec round trip of /bin/true over a Unix socket: mean {:?}, p50 {:?}, p99 {:?}, min {:?}",
        mean,
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
        samples[0]
    );
}

/// A host that does not read makes the process block in `write`: neither
/// the agent nor the client buffers the output without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_blocks_the_process() {
    let agent = ProcessAgent::start();
    let rss_before = agent.rss_kib();
    let mut child = agent
        .client()
        .exec(cmd(&["head", "-c", "1073741824", "/dev/zero"]), T)
        .await
        .unwrap();
    let pid = child.pid();
    let stdout = child.stdout().unwrap();
    let written = || -> u64 {
        let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
        io.lines()
            .find_map(|l| l.strip_prefix("wchar: "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let w1 = written();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let w2 = written();
    let rss_after = agent.rss_kib();
    eprintln!(
        "unread output: child wrote {w1} then {w2} bytes; agent RSS {rss_before} -> {rss_after} KiB"
    );
    assert!(w2 > 0, "the child never started writing");
    assert_eq!(w1, w2, "the child kept writing although nobody reads");
    // Pipe (64 KiB) + agent queue + socket buffers + client pipe: a few MiB at most.
    assert!(w2 < 16 << 20, "{w2} bytes in flight");
    assert!(
        rss_after < rss_before + 16 * 1024,
        "agent buffered the output"
    );
    drop(stdout);
    drop(child);
    assert!(eventually(Duration::from_secs(5), || !group_alive(pid)));
}

/// Reported, not asserted: raw stdout bandwidth through agent and client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_throughput() {
    let agent = ProcessAgent::start();
    let mut child = agent
        .client()
        .exec(cmd(&["head", "-c", "67108864", "/dev/zero"]), T)
        .await
        .unwrap();
    let mut stdout = child.stdout().unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let start = Instant::now();
    let mut total = 0u64;
    loop {
        let n = stdout.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    assert!(child.wait().await.unwrap().success());
    assert_eq!(total, 67108864);
    eprintln!(
        "raw stdout throughput: {:.0} MiB/s",
        total as f64 / (1 << 20) as f64 / secs
    );
}

/// The agent keeps SIGCHLD/TERM/INT/HUP blocked for its own signal loop; no
/// exec'd process may inherit that mask, or `timeout 1 sleep 5` and a
/// container's SIGTERM would never take effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_children_start_with_no_blocked_signals() {
    let agent = ProcessAgent::start();
    let c = agent.client();
    let script = "grep SigBlk /proc/self/status";
    let mut with_cwd = sh(script);
    with_cwd.cwd = Some("/tmp".into());
    let mut with_pty = sh(script);
    with_pty.pty = Some(PtySize { rows: 24, cols: 80 });
    for (what, req) in [("plain", sh(script)), ("cwd", with_cwd), ("pty", with_pty)] {
        let text = stdout_of(&c, req).await;
        let mask = text
            .split_whitespace()
            .nth(1)
            .unwrap_or_else(|| panic!("{what}: no SigBlk line in {text:?}"));
        assert!(
            mask.chars().all(|c| c == '0'),
            "{what}: the child starts with blocked signals {mask}"
        );
    }
    // And the effect a user sees: timeout's SIGTERM ends sleep at once.
    let started = Instant::now();
    let text = stdout_of(&c, sh("timeout 1 sleep 20; echo rc=$?")).await;
    // coreutils says 124 for a timeout, busybox the signal's 128+15.
    assert!(matches!(text.trim(), "rc=124" | "rc=143"), "{text:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

async fn stdout_of(c: &capsa_agent_client::AgentClient, req: ExecRequest) -> String {
    let out = c.exec_output(req, T).await.unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}
