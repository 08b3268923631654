//! Test agents on Unix sockets, and raw-frame helpers for hostile-peer tests.
#![allow(dead_code)] // each test file uses a different subset

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capsa_agent_client::{AgentClient, BoxedStream};
use capsa_guest::agent::{Agent, AgentConfig, Reaping, AGENT_LISTENING_MARKER};
use capsa_proto::{encode, AgentFrame, ClientFrame, MAX_FRAME};

/// `capsa-init --agent-unix PATH` as a child process: the agent exactly as
/// in the guest (central reaping, subreaper), minus the vsock transport.
pub struct ProcessAgent {
    child: Child,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl ProcessAgent {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        // CAPSA_TEST_AGENT_BIN runs the suite against another build, e.g.
        // the static guest binary that capsa-guest-bin embeds.
        let bin = std::env::var_os("CAPSA_TEST_AGENT_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_capsa-init")));
        let mut child = Command::new(bin)
            .arg("--agent-unix")
            .arg(&path)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn capsa-init --agent-unix");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Keep draining so the agent never blocks on its console.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line == AGENT_LISTENING_MARKER {
                    let _ = tx.send(());
                } else {
                    eprintln!("[agent] {line}");
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("agent printed its listening marker");
        Self {
            child,
            path,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn client(&self) -> AgentClient {
        unix_client(self.path.clone())
    }

    /// Resident memory of the agent process in KiB.
    pub fn rss_kib(&self) -> u64 {
        status_kib(self.pid(), "VmRSS")
    }

    /// Threads of the agent process.
    pub fn threads(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ProcessAgent {
    fn drop(&mut self) {
        // SIGTERM: the agent kills its exec'd process groups and exits.
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The agent inside the test process ([`Reaping::PerChild`]), serving a
/// Unix listener through `Agent::dispatch`.
pub struct InProcessAgent {
    pub agent: Arc<Agent>,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl InProcessAgent {
    pub fn start(config: AgentConfig) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let agent = Agent::new(config, Reaping::PerChild);
        let a = Arc::clone(&agent);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => a.dispatch(s),
                    Err(_) => return,
                }
            }
        });
        Self {
            agent,
            path,
            _dir: dir,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn client(&self) -> AgentClient {
        unix_client(self.path.clone())
    }
}

pub fn unix_client(path: PathBuf) -> AgentClient {
    AgentClient::new(move || {
        let path = path.clone();
        async move {
            let s = tokio::net::UnixStream::connect(path).await?;
            Ok(Box::new(s) as BoxedStream)
        }
    })
}

/// One end of a socketpair whose other end is served by
/// `Agent::serve_connection` on a thread (the transport-agnostic handler).
pub fn socketpair_conn(agent: &Arc<Agent>) -> UnixStream {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let a = Arc::clone(agent);
    std::thread::spawn(move || a.serve_connection(theirs));
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    ours
}

pub fn send_raw(s: &mut UnixStream, bytes: &[u8]) {
    // The agent may close early; write errors are part of what is tested.
    let _ = s.write_all(bytes);
}

pub fn send_frame(s: &mut UnixStream, f: &ClientFrame) {
    send_raw(s, &encode(f).unwrap());
}

/// Reads one agent frame: `Ok(None)` on a clean close.
pub fn read_reply(s: &mut UnixStream) -> Result<Option<AgentFrame>, String> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
        Err(e) => return Err(format!("read: {e}")),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(format!("agent sent an oversized frame ({len})"));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)
        .map_err(|e| format!("read body: {e}"))?;
    capsa_proto::decode(&body)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// Reads frames until the agent closes; returns them.
pub fn read_until_close(s: &mut UnixStream) -> Vec<AgentFrame> {
    let mut frames = Vec::new();
    while let Ok(Some(f)) = read_reply(s) {
        frames.push(f);
        assert!(frames.len() < 100_000, "agent never closes");
    }
    frames
}

/// Whether a process group still has members.
pub fn group_alive(pgid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(-(pgid as libc::pid_t), 0) == 0 }
}

/// Polls `cond` for up to `timeout`.
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Lowercase hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Deterministic pseudo-random bytes (xorshift), for content that must not compress or repeat.
pub fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(len);
    v
}
