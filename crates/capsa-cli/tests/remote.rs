//! The CLI against a real capsad (spawned here): `--host` snapshot commands,
//! `create --from-snapshot`, the `pool` commands, and the POOL column of
//! `capsa ps` both through the daemon and directly.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin(name: &str) -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_capsa")).with_file_name(name)
}

/// capsad and capsa-vmm are other packages' binaries: (re)build them, so a
/// stale capsad never answers for this source (a no-op when fresh).
fn ensure_binaries() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let st = Command::new(env!("CARGO"))
            .args(["build", "-p", "capsad", "-p", "capsa-vmm"])
            .status()
            .expect("running cargo");
        assert!(st.success(), "cannot build capsad and capsa-vmm");
    });
}

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn start(extra: &[&str]) -> Self {
        ensure_binaries();
        let dir = tempfile::Builder::new()
            .prefix("cr")
            .tempdir_in("/tmp")
            .unwrap();
        let child = Command::new(bin("capsad"))
            .arg("--state-dir")
            .arg(dir.path())
            .arg("--snapshot-dir")
            .arg(dir.path().join("snaps"))
            .args(extra)
            .env("CAPSA_VMM", bin("capsa-vmm"))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawning capsad");
        let sock = dir.path().join("capsad.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "capsad does not accept");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, dir }
    }

    fn capsa(&self, host: bool) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_capsa"));
        c.env_remove("CAPSA_HOST")
            .env("CAPSA_STATE_DIR", self.dir.path())
            .env("CAPSA_SNAPSHOT_DIR", self.dir.path().join("local-snaps"))
            .stdin(Stdio::null());
        if host {
            c.arg("--host").arg(self.dir.path().join("capsad.sock"));
        }
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.capsa(true).args(args).output().expect("running capsa")
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "capsa --host {args:?} failed\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn err(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(!o.status.success(), "capsa --host {args:?} succeeded");
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    fn pool_ready(&self, name: &str) -> u64 {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["pool", "ls", "--json"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .map_or(0, |p| p["ready"].as_u64().unwrap_or(0))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Members and sandboxes are kept by monitors: remove them all.
        if let Ok(rd) = std::fs::read_dir(self.dir.path().join("sandboxes")) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                let _ = self.capsa(false).args(["rm", "-f", &n]).output();
            }
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !matches!(self.child.try_wait(), Ok(Some(_))) {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn host_snapshot_and_pool_commands() {
    let d = Daemon::start(&["--pool", "p=1,memory=256"]);

    // Bad input, each with its fix.
    let e = d.err(&["pool", "create", "q", "--size", "0"]);
    assert!(e.contains("out of range") && e.contains("1 to 32"), "{e}");
    let e = d.err(&["pool", "create", "p", "--size", "1"]);
    assert!(e.contains("exists"), "{e}");
    let e = d.err(&["pool", "acquire", "nope"]);
    assert!(e.contains("no pool named"), "{e}");
    let o = d.capsa(false).args(["pool", "ls"]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--host"));

    let deadline = Instant::now() + Duration::from_secs(400);
    while d.pool_ready("p") < 1 {
        assert!(Instant::now() < deadline, "pool p never filled");
        std::thread::sleep(Duration::from_millis(300));
    }
    let table = d.ok(&["ps"]);
    assert!(table.contains("POOL"), "{table}");
    assert!(table.contains("p (ready)"), "{table}");
    assert!(table.contains("pool p: 1/1 ready"), "{table}");
    // Direct (no daemon in the path): the same label from sandbox.json.
    let direct = d.capsa(false).arg("ps").output().unwrap();
    assert!(String::from_utf8_lossy(&direct.stdout).contains("p (ready)"));

    let t = Instant::now();
    let name = d.ok(&["pool", "acquire", "p"]).trim().to_string();
    eprintln!("capsa pool acquire (whole CLI process): {:?}", t.elapsed());
    assert!(name.starts_with("p-"), "{name}");
    assert_eq!(d.ok(&["exec", &name, "--", "echo", "hi"]), "hi\n");
    d.ok(&["exec", &name, "--", "sh", "-c", "echo mark > /root/m"]);
    assert!(d.ok(&["ps"]).contains("p (acquired)"));

    // Snapshots through the daemon.
    assert_eq!(d.ok(&["snapshot", "create", &name, "s1"]).trim(), "s1");
    let e = d.err(&["snapshot", "create", &name, "s1"]);
    assert!(e.contains("already exists"), "{e}");
    let ls: serde_json::Value = serde_json::from_str(&d.ok(&["snapshot", "ls", "--json"])).unwrap();
    assert_eq!(ls[0]["name"], "s1");
    assert!(d.ok(&["snapshot", "ls"]).contains("s1"));
    assert!(d.dir.path().join("snaps/s1").is_dir(), "the daemon's store");
    d.ok(&["create", "--name", "c1", "--from-snapshot", "s1"]);
    assert_eq!(d.ok(&["exec", "c1", "--", "cat", "/root/m"]), "mark\n");
    let e = d.err(&["create", "--name", "c2", "--from-snapshot", "nosuch"]);
    assert!(e.contains("nosuch"), "{e}");
    d.ok(&["rm", "-f", "c1", &name]);
    d.ok(&["snapshot", "rm", "s1"]);
    assert!(!d.dir.path().join("snaps/s1").exists());
    let e = d.err(&["snapshot", "rm", "s1"]);
    assert!(e.contains("s1"), "{e}");

    d.ok(&["pool", "rm", "p"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: Vec<_> = std::fs::read_dir(d.dir.path().join("sandboxes"))
            .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left: {left:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!d.ok(&["ps"]).contains("pool p"));
}
