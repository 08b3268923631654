//! The CLI against a real capsad (spawned here): `--host` snapshot commands,
//! `create --from-snapshot`, the `pool` commands, and the POOL column of
//! `capsa ps` both through the daemon and directly.

use std::process::Output;
use std::time::{Duration, Instant};

mod common;

use common::Daemon;

/// The `--host` face of the daemon, and the helpers of these tests.
trait Host {
    fn run(&self, args: &[&str]) -> Output;
    fn ok(&self, args: &[&str]) -> String;
    fn err(&self, args: &[&str]) -> String;
    fn pool_ready(&self, name: &str) -> u64;
}

impl Host for Daemon {
    fn run(&self, args: &[&str]) -> Output {
        self.run_on(true, args)
    }

    fn ok(&self, args: &[&str]) -> String {
        self.ok_on(true, args)
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

#[test]
fn host_snapshot_and_pool_commands() {
    let d = Daemon::start("cr", &["--pool", "p=1,memory=256"]);

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
