//! Spawns the real `capsad` binary on a temp state dir and connects a client.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use capsa_client::Client;

/// A running daemon; killed (SIGTERM, then SIGKILL) on drop.
pub struct Daemon {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub token: String,
    pub tcp: Option<String>,
    _tmp: Option<tempfile::TempDir>,
}

impl Daemon {
    /// Starts capsad on a fresh temp state dir (short path under /tmp: socket paths ≤ 107 bytes).
    pub fn start() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("cd")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut d = Self::start_on(&dir, &[]);
        d._tmp = Some(tmp);
        d
    }

    /// Starts capsad on `dir` with extra args.
    pub fn start_on(dir: &Path, extra: &[&str]) -> Self {
        ensure_monitor_binary();
        let socket = dir.join("capsad.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_capsad"))
            .arg("--state-dir")
            .arg(dir)
            .arg("--snapshot-dir")
            .arg(dir.join("snapshots"))
            .args(extra)
            .env("RUST_LOG", "capsad=debug,info,tarpc=warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawning capsad");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(socket.exists() && dir.join("capsad.token").exists()) {
            assert!(
                Instant::now() < deadline,
                "capsad did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The socket file appears at bind, before the server accepts: wait for a connect.
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "capsad does not accept");
            std::thread::sleep(Duration::from_millis(20));
        }
        let token = std::fs::read_to_string(dir.join("capsad.token"))
            .expect("token")
            .trim()
            .to_string();
        Self {
            child: Some(child),
            dir: dir.to_path_buf(),
            socket,
            token,
            tcp: None,
            _tmp: None,
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.socket, &self.token).expect("client")
    }

    /// SIGKILLs the daemon (sandboxes kept by monitors must survive).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Makes this daemon own (and clean up) `tmp`.
    pub fn set_tmp(&mut self, tmp: tempfile::TempDir) {
        self._tmp = Some(tmp);
    }

    /// Keeps the temp dir alive past this daemon (for a restart on it).
    pub fn take_tmp(&mut self) -> Option<tempfile::TempDir> {
        self._tmp.take()
    }
}

/// Builds `capsa-vmm` next to `capsad` if missing (capsad finds it there).
pub fn ensure_monitor_binary() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let bin = Path::new(env!("CARGO_BIN_EXE_capsad")).with_file_name("capsa-vmm");
        if bin.is_file() {
            return;
        }
        let st = Command::new(env!("CARGO"))
            .args(["build", "-p", "capsa-vmm", "--bin", "capsa-vmm"])
            .status()
            .expect("running cargo");
        assert!(st.success() && bin.is_file(), "cannot build capsa-vmm");
    });
}

/// SIGKILLs every process whose command line mentions `dir` (test cleanup
/// after a failure: monitors keep running on purpose).
pub fn kill_mentioning(dir: &Path) -> usize {
    let needle = dir.display().to_string();
    let found = processes_mentioning(&needle);
    for (pid, _) in &found {
        // SAFETY: signalling a pid we just found; a test machine.
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    found.len()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if self._tmp.is_some() {
            let n = kill_mentioning(&self.dir);
            if n > 0 {
                eprintln!(
                    "cleanup: killed {n} leftover processes under {}",
                    self.dir.display()
                );
            }
        }
    }
}

/// Processes whose command line mentions `needle` (to check for leaks).
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                if cmd.contains(needle) {
                    out.push((pid, cmd));
                }
            }
        }
    }
    out
}
