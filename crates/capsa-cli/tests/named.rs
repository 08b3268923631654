//! Named sandboxes through the `capsa` binary: create, ps, exec, cp, logs,
//! stop, start, kill, rm, snapshots, attach, and the crash cases. Every test
//! body runs twice: straight to the monitors (`direct::`) and through a
//! capsad spawned for it (`through_capsad::`), so both services behave the
//! same for every verb.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

/// Which service the CLI talks to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// The monitors in the state directory.
    Direct,
    /// A capsad on the same state directory (`--host`).
    Host,
}

/// Runs each named test body once per [`Mode`].
macro_rules! both_ways {
    ($($name:ident),* $(,)?) => {
        mod direct {
            $( #[test] fn $name() { super::$name(super::Mode::Direct) } )*
        }
        mod through_capsad {
            $( #[test] fn $name() { super::$name(super::Mode::Host) } )*
        }
    };
}

both_ways!(
    lifecycle_create_exec_cp_logs_stop_start_kill_rm,
    kill_9_of_the_cli_during_exec_leaves_the_sandbox_healthy,
    kill_9_of_a_monitor_marks_it_dead_and_rm_cleans_up,
    bad_names_and_missing_sandboxes_get_clear_errors,
    snapshot_create_restore_twice_ls_rm,
    snapshot_bad_input_gets_clear_errors,
    attach_shows_the_console_and_ctrl_close_bracket_detaches,
);

/// A private state directory (short: Unix socket paths are limited to 108
/// bytes), with a capsad on it in [`Mode::Host`].
struct Env {
    dir: tempfile::TempDir,
    daemon: Option<Child>,
}

impl Env {
    fn new(mode: Mode) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cn")
            .tempdir_in("/tmp")
            .expect("temp state dir");
        let daemon = (mode == Mode::Host)
            .then(|| common::spawn_capsad(dir.path(), &dir.path().join("snaps"), &[]));
        Self { dir, daemon }
    }

    /// `capsa` on this state dir, never through a daemon.
    fn capsa_direct(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_capsa"));
        c.env("CAPSA_STATE_DIR", self.root())
            .env("CAPSA_SNAPSHOT_DIR", self.root().join("snaps"))
            .env("CAPSA_VMM", common::bin("capsa-vmm"))
            .env_remove("CAPSA_HOST")
            .stdin(Stdio::null());
        c
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// `capsa` through this test's service.
    fn capsa(&self) -> Command {
        let mut c = self.capsa_direct();
        if self.daemon.is_some() {
            c.arg("--host").arg(self.root().join("capsad.sock"));
        }
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.capsa().args(args).output().expect("running capsa")
    }

    /// Runs and asserts success; returns stdout.
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

    fn ps(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["ps", "--json"])).expect("ps --json is JSON")
    }

    fn state_of(&self, name: &str) -> Option<String> {
        self.ps()
            .into_iter()
            .find(|v| v["name"] == name)
            .map(|v| v["state"].as_str().unwrap_or_default().to_string())
    }

    fn create(&self, name: &str) {
        self.ok(&["create", "--name", name, "--memory", "256M"]);
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Never leave VMs behind, whatever the test did.
        if let Ok(rd) = std::fs::read_dir(self.root().join("sandboxes")) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                let _ = self.capsa_direct().args(["rm", "--force", &n]).output();
            }
        }
        if let Some(mut d) = self.daemon.take() {
            common::stop_child(&mut d);
        }
    }
}

fn pid_alive(pid: u64) -> bool {
    // A zombie is dead for our purpose.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_none_or(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn lifecycle_create_exec_cp_logs_stop_start_kill_rm(mode: Mode) {
    let env = Env::new(mode);
    env.create("life");
    assert_eq!(env.state_of("life").as_deref(), Some("running"));
    let table = env.ok(&["ps"]);
    assert!(table.contains("NAME") && table.contains("life"), "{table}");

    // Exit codes pass through; output streams to our stdout/stderr.
    assert_eq!(
        env.ok(&["exec", "life", "--", "uname", "-s"]).trim(),
        "Linux"
    );
    let o = env.run(&["exec", "life", "--", "sh", "-c", "echo oops >&2; exit 7"]);
    assert_eq!(o.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&o.stderr).trim(), "oops");
    let o = env.run(&[
        "exec",
        "life",
        "-e",
        "A=b",
        "-w",
        "/tmp",
        "--",
        "sh",
        "-c",
        "echo $A $PWD",
    ]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "b /tmp");

    // State set by one exec is seen by the next: it is one long-lived VM.
    env.ok(&["exec", "life", "--", "sh", "-c", "echo kept > /tmp/state"]);
    assert_eq!(
        env.ok(&["exec", "life", "--", "cat", "/tmp/state"]).trim(),
        "kept"
    );

    // cp both ways, with a checksum.
    let host = tempfile::tempdir().unwrap();
    let src = host.path().join("in.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    env.ok(&["cp", src.to_str().unwrap(), "life:/tmp/in.bin"]);
    let dst = host.path().join("out.bin");
    env.ok(&["cp", "life:/tmp/in.bin", dst.to_str().unwrap()]);
    assert_eq!(std::fs::read(&dst).unwrap(), data);

    // The console log holds the guest's boot.
    let logs = env.ok(&["logs", "life"]);
    assert!(logs.contains("capsa-agent: listening"), "{logs}");

    let inspect: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "life"])).unwrap();
    assert_eq!(inspect["name"], "life");
    assert_eq!(inspect["spec"]["memory_mib"], 256);

    // rm refuses a running sandbox and says how to proceed.
    let o = env.run(&["rm", "life"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--force") || err.contains("stop"), "{err}");

    env.ok(&["stop", "life"]);
    assert_eq!(env.state_of("life").as_deref(), Some("stopped"));
    let o = env.run(&["exec", "life", "--", "true"]);
    assert!(!o.status.success(), "exec into a stopped sandbox must fail");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("start"),
        "the error should say how to start it: {err}"
    );

    env.ok(&["start", "life"]);
    assert_eq!(
        env.ok(&["exec", "life", "--", "echo", "back"]).trim(),
        "back"
    );
    env.ok(&["kill", "life"]);
    assert_eq!(env.state_of("life").as_deref(), Some("stopped"));
    env.ok(&["rm", "life"]);
    assert!(env.ps().is_empty());
    assert!(!env.root().join("sandboxes/life").exists());
}

fn kill_9_of_the_cli_during_exec_leaves_the_sandbox_healthy(mode: Mode) {
    let env = Env::new(mode);
    env.create("crash");
    let mut child = env
        .capsa()
        .args(["exec", "crash", "--", "sh", "-c", "echo started; sleep 30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the command really runs in the guest.
    let mut out = child.stdout.take().unwrap();
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut out, &mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("started"));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();

    // The sandbox still works, and the orphaned command was ended with its connection.
    assert_eq!(
        env.ok(&["exec", "crash", "--", "echo", "alive"]).trim(),
        "alive"
    );
    wait_until(
        "the orphaned sleep is gone",
        Duration::from_secs(20),
        || {
            let ps = env.ok(&["exec", "crash", "--", "ps"]);
            !ps.contains("sleep 30")
        },
    );
    assert_eq!(env.state_of("crash").as_deref(), Some("running"));
}

fn kill_9_of_a_monitor_marks_it_dead_and_rm_cleans_up(mode: Mode) {
    let env = Env::new(mode);
    env.create("doomed");
    let rec = env
        .ps()
        .into_iter()
        .find(|v| v["name"] == "doomed")
        .expect("listed");
    let monitor = rec["monitor_pid"].as_u64().expect("monitor pid");
    let qemu = rec["vmm_pid"].as_u64().expect("qemu pid");
    // SAFETY: a process this test created (through capsa).
    unsafe { libc::kill(monitor as i32, libc::SIGKILL) };
    wait_until("QEMU is gone", Duration::from_secs(20), || !pid_alive(qemu));
    wait_until(
        "the sandbox is reported dead",
        Duration::from_secs(20),
        || env.state_of("doomed").as_deref() == Some("dead"),
    );
    let o = env.run(&["exec", "doomed", "--", "true"]);
    assert!(!o.status.success());
    env.ok(&["rm", "doomed"]);
    assert!(env.ps().is_empty());
    assert!(!env.root().join("sandboxes/doomed").exists());
}

fn bad_names_and_missing_sandboxes_get_clear_errors(mode: Mode) {
    let env = Env::new(mode);
    for (args, needle) in [
        (vec!["create", "--name", "../evil"], "name"),
        (vec!["create", "--name", "UPPER"], "name"),
        (vec!["exec", "nosuch", "--", "true"], "nosuch"),
        (vec!["logs", "nosuch"], "nosuch"),
        (vec!["rm", "nosuch"], "nosuch"),
        (vec!["cp", "/etc/hosts", "/tmp/x"], "NAME:"),
        (vec!["cp", "a:/x", "b:/y"], "host"),
    ] {
        let o = env.run(&args);
        assert!(!o.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(needle),
            "{args:?}: error should mention {needle:?}: {err}"
        );
    }
    // Nothing was created by the failures.
    assert!(env.ps().is_empty());
    let leftover: Vec<PathBuf> = std::fs::read_dir(env.root().join("sandboxes"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftover.is_empty(), "{leftover:?}");
}

/// Pids of the live monitors of this test's sandboxes.
fn monitor_pids(env: &Env) -> Vec<u64> {
    env.ps()
        .iter()
        .filter_map(|v| v["monitor_pid"].as_u64())
        .collect()
}

fn snapshot_create_restore_twice_ls_rm(mode: Mode) {
    let env = Env::new(mode);
    env.create("orig");
    env.ok(&[
        "exec",
        "orig",
        "--",
        "sh",
        "-c",
        "echo from-orig > /tmp/shared",
    ]);
    assert_eq!(
        env.ok(&["snapshot", "create", "orig", "snap1"]).trim(),
        "snap1"
    );
    // The source keeps running.
    assert_eq!(env.state_of("orig").as_deref(), Some("running"));
    assert_eq!(
        env.ok(&["exec", "orig", "--", "cat", "/tmp/shared"]).trim(),
        "from-orig"
    );
    // A duplicate name is refused with the fix.
    let o = env.run(&["snapshot", "create", "orig", "snap1"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("already exists") && err.contains("snapshot rm"),
        "{err}"
    );

    env.ok(&["create", "--name", "c1", "--from-snapshot", "snap1"]);
    env.ok(&["create", "--name", "c2", "--from-snapshot", "snap1"]);
    let host = |n: &str| {
        env.ok(&["exec", n, "--", "cat", "/proc/sys/kernel/hostname"])
            .trim()
            .to_string()
    };
    let (h0, h1, h2) = (host("orig"), host("c1"), host("c2"));
    assert!(h0 != h1 && h1 != h2 && h0 != h2, "{h0} {h1} {h2}");
    for n in ["c1", "c2"] {
        assert_eq!(
            env.ok(&["exec", n, "--", "cat", "/tmp/shared"]).trim(),
            "from-orig"
        );
        assert_eq!(env.state_of(n).as_deref(), Some("running"));
    }
    // Writes stay in the clone that made them.
    env.ok(&["exec", "c1", "--", "sh", "-c", "echo c1 > /tmp/shared"]);
    assert_eq!(
        env.ok(&["exec", "c2", "--", "cat", "/tmp/shared"]).trim(),
        "from-orig"
    );
    assert_eq!(
        env.ok(&["exec", "orig", "--", "cat", "/tmp/shared"]).trim(),
        "from-orig"
    );
    assert_eq!(
        env.ok(&["exec", "c1", "--", "cat", "/tmp/shared"]).trim(),
        "c1"
    );

    // ls shows it with its size and source.
    let ls: Vec<serde_json::Value> =
        serde_json::from_str(&env.ok(&["snapshot", "ls", "--json"])).unwrap();
    assert_eq!(ls.len(), 1, "{ls:?}");
    assert_eq!(ls[0]["name"], "snap1");
    assert_eq!(ls[0]["source"], "orig");
    assert_eq!(ls[0]["memory_mib"], 256);
    assert!(ls[0]["size_bytes"].as_u64().unwrap() > 0, "{ls:?}");
    let table = env.ok(&["snapshot", "ls"]);
    assert!(table.contains("SIZE") && table.contains("snap1"), "{table}");

    // rm the snapshot: the clones keep running.
    assert_eq!(env.ok(&["snapshot", "rm", "snap1"]).trim(), "snap1");
    assert!(env.ok(&["snapshot", "ls", "--json"]).trim() == "[]");
    assert_eq!(env.ok(&["exec", "c2", "--", "echo", "ok"]).trim(), "ok");

    let monitors = monitor_pids(&env);
    assert_eq!(monitors.len(), 3, "{monitors:?}");
    env.ok(&["rm", "--force", "orig", "c1", "c2"]);
    assert!(env.ps().is_empty());
    wait_until("every monitor to exit", Duration::from_secs(30), || {
        monitors.iter().all(|p| !pid_alive(*p))
    });
}

fn snapshot_bad_input_gets_clear_errors(mode: Mode) {
    let env = Env::new(mode);
    let o = env.run(&["create", "--name", "x", "--from-snapshot", "nosuch"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("nosuch") && err.contains("capsa snapshot ls"),
        "{err}"
    );
    assert!(env.ps().is_empty(), "nothing is created");

    // Spec flags conflict with --from-snapshot.
    let o = env.run(&[
        "create",
        "--name",
        "x",
        "--from-snapshot",
        "s",
        "--memory",
        "1G",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--from-snapshot") && err.contains("--memory"),
        "{err}"
    );

    let o = env.run(&["snapshot", "create", "nobox", "s1"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nobox"));
    let o = env.run(&["snapshot", "create", "nobox", "Bad/Name"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("invalid snapshot name"), "{err}");
    let o = env.run(&["snapshot", "rm", "nosuch"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("capsa snapshot ls"));
    // Through a daemon that is not there: said plainly, with the way out.
    for args in [
        &["--host", "/tmp/nosuch.sock", "snapshot", "ls"][..],
        &[
            "--host",
            "/tmp/nosuch.sock",
            "create",
            "--name",
            "x",
            "--from-snapshot",
            "s",
        ],
    ] {
        let o = env.capsa_direct().args(args).output().unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("capsad") && err.contains("fix"), "{err}");
    }
}

fn attach_shows_the_console_and_ctrl_close_bracket_detaches(mode: Mode) {
    let env = Env::new(mode);
    env.create("att");
    let mut child = env
        .capsa()
        .args(["attach", "att"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    // The console history comes first: the guest's boot, up to the agent.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut out, &mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains("capsa-agent: listening") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("attach shows the console history");
    // Ctrl-] detaches: the CLI exits 0 and the sandbox keeps running.
    let mut stdin = child.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, &[0x1d]).unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "attach did not detach on Ctrl-]");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    assert_eq!(env.state_of("att").as_deref(), Some("running"));
    assert_eq!(env.ok(&["exec", "att", "--", "echo", "ok"]).trim(), "ok");
}
