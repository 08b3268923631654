//! What the CLI tests share: the binaries next to `capsa`, and a real capsad
//! on a private state directory that the direct CLI uses too.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Another binary of this workspace, next to `capsa`.
pub fn bin(name: &str) -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_capsa")).with_file_name(name)
}

/// capsad and capsa-vmm are other packages' binaries: (re)build them, so a
/// stale capsad never answers for this source (a no-op when fresh).
pub fn ensure_binaries() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let st = Command::new(env!("CARGO"))
            .args(["build", "-p", "capsad", "-p", "capsa-vmm"])
            .status()
            .expect("running cargo");
        assert!(st.success(), "cannot build capsad and capsa-vmm");
    });
}

/// Spawns capsad on `state` (snapshots in `snapshots`) and waits until it accepts.
pub fn spawn_capsad(state: &Path, snapshots: &Path, extra: &[&str]) -> Child {
    ensure_binaries();
    let child = Command::new(bin("capsad"))
        .arg("--state-dir")
        .arg(state)
        .arg("--snapshot-dir")
        .arg(snapshots)
        .args(extra)
        .env("CAPSA_VMM", bin("capsa-vmm"))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawning capsad");
    let sock = state.join("capsad.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "capsad does not accept");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// SIGTERM, then SIGKILL after 20 s.
pub fn stop_child(child: &mut Child) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(child.try_wait(), Ok(Some(_))) {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A capsad on a private state dir; the direct CLI uses the same dir.
/// Dropping it removes every sandbox there and stops the daemon.
pub struct Daemon {
    pub child: Child,
    pub dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts capsad on a fresh short dir under /tmp (socket paths <= 107 bytes).
    pub fn start(prefix: &str, extra: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in("/tmp")
            .unwrap();
        let child = spawn_capsad(dir.path(), &dir.path().join("snaps"), extra);
        Self { child, dir }
    }

    /// The daemon's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("capsad.sock")
    }

    /// A `capsa` command on this state dir, through the daemon if `host`.
    pub fn capsa(&self, host: bool) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_capsa"));
        c.env_remove("CAPSA_HOST")
            .env("CAPSA_STATE_DIR", self.dir.path())
            .env("CAPSA_SNAPSHOT_DIR", self.dir.path().join("local-snaps"))
            .env("CAPSA_VMM", bin("capsa-vmm"))
            .stdin(Stdio::null());
        if host {
            c.arg("--host").arg(self.socket());
        }
        c
    }

    /// Runs `capsa ARGS`.
    pub fn run_on(&self, host: bool, args: &[&str]) -> Output {
        self.capsa(host).args(args).output().expect("running capsa")
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok_on(&self, host: bool, args: &[&str]) -> String {
        let o = self.run_on(host, args);
        assert!(
            o.status.success(),
            "capsa {args:?} (through capsad: {host}) failed\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Sandboxes are kept by monitors: remove them all.
        if let Ok(rd) = std::fs::read_dir(self.dir.path().join("sandboxes")) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                let _ = self.capsa(false).args(["rm", "-f", &n]).output();
            }
        }
        stop_child(&mut self.child);
    }
}
