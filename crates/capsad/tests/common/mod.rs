//! Spawns the real `capsad` binary on a temp state dir and connects a client.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use capsad::client::Client;

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
        let socket = dir.join("capsad.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_capsad"))
            .arg("--state-dir")
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", "capsad=debug,info")
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

    /// Keeps the temp dir alive past this daemon (for a restart on it).
    pub fn take_tmp(&mut self) -> Option<tempfile::TempDir> {
        self._tmp.take()
    }
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
