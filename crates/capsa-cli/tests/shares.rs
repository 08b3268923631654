//! Shared directories through the `capsa` binary (no daemon): `run -v`,
//! `create -v`, `share add|ls|rm` on a running sandbox (through its monitor),
//! `snapshot create` refused while a share is attached, and a restored
//! sandbox getting its share hot-plugged. Run with `-j 1`.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cs")
            .tempdir_in("/tmp")
            .expect("temp state dir");
        Self { dir }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_capsa"))
            .env("CAPSA_STATE_DIR", self.root().join("state"))
            .env("CAPSA_SNAPSHOT_DIR", self.root().join("snaps"))
            .env_remove("CAPSA_HOST")
            .stdin(Stdio::null())
            .args(args)
            .output()
            .expect("running capsa")
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "capsa {args:?} failed: {:?}\nstdout: {}\nstderr: {}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(!o.status.success(), "capsa {args:?} should fail");
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    /// A directory for sharing, beside the state dir.
    fn dir(&self, name: &str) -> String {
        let d = self.root().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d.display().to_string()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Ok(rd) = std::fs::read_dir(self.root().join("state").join("sandboxes")) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                let _ = self.run(&["rm", "--force", &n]);
            }
        }
    }
}

/// virtiofsd processes serving a directory below `root`.
fn virtiofsd_for(root: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "virtiofsd" {
            continue;
        }
        // Tied to this test by its environment (inherited from the monitor,
        // which got CAPSA_STATE_DIR from the CLI).
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if String::from_utf8_lossy(&env).contains(&root.display().to_string()) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn create_with_a_volume_then_add_rm_and_snapshot_only_without_shares() {
    let env = Env::new();
    let work = env.dir("work");
    let data = env.dir("data");
    std::fs::write(Path::new(&work).join("in.txt"), b"hello share").unwrap();
    std::fs::write(Path::new(&data).join("d.txt"), b"data").unwrap();
    env.ok(&[
        "create",
        "--name",
        "sh1",
        "--memory",
        "256M",
        "-v",
        &format!("{work}:/work"),
    ]);
    assert_eq!(
        env.ok(&["exec", "sh1", "--", "cat", "/work/in.txt"]),
        "hello share"
    );
    env.ok(&["share", "add", "sh1", &format!("{data}:/data:ro")]);
    assert_eq!(env.ok(&["exec", "sh1", "--", "cat", "/data/d.txt"]), "data");
    let o = env.run(&["exec", "sh1", "--", "sh", "-c", "echo x > /data/new"]);
    assert!(!o.status.success(), "read-only share took a write");
    let ls: Vec<serde_json::Value> =
        serde_json::from_str(&env.ok(&["share", "ls", "sh1", "--json"])).unwrap();
    assert_eq!(ls.len(), 2, "{ls:?}");
    assert!(!virtiofsd_for(env.root()).is_empty(), "virtiofsd runs");

    // Snapshot refused, naming the share and the command that fixes it.
    let err = env.fails(&["snapshot", "create", "sh1", "snap1"]);
    assert!(
        err.contains("/work") && err.contains("capsa share rm sh1 /work"),
        "{err}"
    );
    assert!(
        !err.to_lowercase().contains("vhost-user-fs"),
        "no QEMU message: {err}"
    );

    env.ok(&["share", "rm", "sh1", "/work"]);
    env.ok(&["share", "rm", "sh1", "/data"]);
    let err = env.fails(&["share", "rm", "sh1", "/data"]);
    assert!(err.contains("no share is attached at /data"), "{err}");
    env.ok(&["snapshot", "create", "sh1", "snap1"]);

    // A restored sandbox gets its share hot-plugged.
    env.ok(&[
        "create",
        "--name",
        "sh2",
        "--from-snapshot",
        "snap1",
        "-v",
        &format!("{work}:/work"),
    ]);
    env.ok(&[
        "exec",
        "sh2",
        "--",
        "sh",
        "-c",
        "echo from-restored > /work/out.txt",
    ]);
    assert_eq!(
        std::fs::read_to_string(Path::new(&work).join("out.txt")).unwrap(),
        "from-restored\n"
    );
    env.ok(&["rm", "--force", "sh1", "sh2"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !virtiofsd_for(env.root()).is_empty() {
        assert!(Instant::now() < deadline, "virtiofsd left behind");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn run_with_volumes_and_bad_volumes_refused_up_front() {
    let env = Env::new();
    let work = env.dir("work");
    std::fs::write(Path::new(&work).join("in.txt"), b"input").unwrap();
    let out = env.ok(&[
        "run",
        "--memory",
        "256M",
        "-v",
        &format!("{work}:/work"),
        "--",
        "sh",
        "-c",
        "cat /work/in.txt; echo result > /work/out.txt",
    ]);
    assert_eq!(out, "input");
    assert_eq!(
        std::fs::read_to_string(Path::new(&work).join("out.txt")).unwrap(),
        "result\n"
    );
    let file = Path::new(&work).join("in.txt").display().to_string();
    for (v, want) in [
        (format!("{work}/missing:/w"), "missing"),
        (format!("{file}:/w"), "not a directory"),
        (format!("{work}:w"), "not absolute"),
        (work.clone(), "no ':'"),
    ] {
        let t = Instant::now();
        let err = env.fails(&["run", "-v", &v, "--", "true"]);
        assert!(err.contains(want) && err.contains("Fix:"), "{v}: {err}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "refused before booting"
        );
        let err = env.fails(&["create", "--name", "bad", "-v", &v]);
        assert!(err.contains(want), "{v}: {err}");
    }
    assert!(!env.root().join("state/sandboxes/bad").exists());
}

/// virtiofsd belongs to the monitor: `kill -9` of the monitor takes QEMU
/// and every virtiofsd with it.
#[test]
fn a_killed_monitor_leaves_no_virtiofsd() {
    let env = Env::new();
    let work = env.dir("work");
    let data = env.dir("data");
    env.ok(&[
        "create",
        "--name",
        "k1",
        "--memory",
        "256M",
        "-v",
        &format!("{work}:/work"),
    ]);
    env.ok(&["share", "add", "k1", &format!("{data}:/data:ro")]);
    let before = virtiofsd_for(env.root());
    assert!(
        before.len() >= 2,
        "one virtiofsd (or two with its sandboxed child) per share: {before:?}"
    );
    let ps: Vec<serde_json::Value> = serde_json::from_str(&env.ok(&["ps", "--json"])).unwrap();
    let pid = ps
        .iter()
        .find(|v| v["name"] == "k1")
        .and_then(|v| v["monitor_pid"].as_u64())
        .expect("monitor pid");
    // SAFETY: kill on a pid we just read from our own sandbox's record.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !virtiofsd_for(env.root()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "virtiofsd outlived its monitor: {:?}",
            virtiofsd_for(env.root())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
