//! The host's promises under repeated and hostile use, through the real
//! `capsa` binary, directly and through a real capsad: no descriptor leaks
//! per command, a frozen sandbox stalls no other, shell exit codes for
//! programs that cannot start, no silently ignored `CAPSA_HOST`.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;

use common::Daemon;

/// The record of `name` from `capsa ps --json`.
fn record(d: &Daemon, name: &str) -> serde_json::Value {
    let ps: Vec<serde_json::Value> =
        serde_json::from_str(&d.ok_on(false, &["ps", "--json"])).unwrap();
    ps.into_iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not listed"))
}

fn fd_count(pid: u64) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn within(before: usize, after: usize, what: &str) {
    assert!(
        after.abs_diff(before) <= 2,
        "{what}: {before} open descriptors before, {after} after"
    );
}

#[test]
fn exec_leaks_no_descriptors_direct_or_through_capsad() {
    let d = Daemon::start("ch", &[]);
    d.ok_on(false, &["create", "--name", "fd", "--memory", "256M"]);
    let monitor = record(&d, "fd")["monitor_pid"].as_u64().unwrap();
    let capsad = u64::from(d.child.id());
    // Warm both paths once (capsad caches its attachment on first use).
    d.ok_on(false, &["exec", "fd", "--", "true"]);
    d.ok_on(true, &["exec", "fd", "--", "true"]);

    let before = fd_count(monitor);
    for i in 0..500 {
        let o = d.run_on(false, &["exec", "fd", "--", "true"]);
        assert!(o.status.success(), "direct exec {i}: {o:?}");
    }
    // A few stop/kill-free verbs that used to attach the console too.
    d.ok_on(false, &["inspect", "fd"]);
    within(before, fd_count(monitor), "monitor after 500 direct execs");

    let (m0, c0) = (fd_count(monitor), fd_count(capsad));
    for i in 0..500 {
        let o = d.run_on(true, &["exec", "fd", "--", "true"]);
        assert!(o.status.success(), "exec via capsad {i}: {o:?}");
    }
    within(m0, fd_count(monitor), "monitor after 500 execs via capsad");
    within(c0, fd_count(capsad), "capsad after 500 execs");
}

#[test]
fn a_frozen_sandbox_stalls_no_other_and_can_still_be_killed() {
    let d = Daemon::start("ch", &[]);
    // `frozen` is made without the daemon, so capsad has never attached it.
    d.ok_on(false, &["create", "--name", "frozen", "--memory", "256M"]);
    d.ok_on(true, &["create", "--name", "fine", "--memory", "256M"]);
    d.ok_on(true, &["exec", "fine", "--", "true"]);
    let qemu = record(&d, "frozen")["vmm_pid"].as_u64().unwrap() as i32;
    // SAFETY: stopping a QEMU this test started; its agent then never answers.
    assert_eq!(unsafe { libc::kill(qemu, libc::SIGSTOP) }, 0);

    // An exec into the frozen sandbox waits for its agent in the background...
    let stuck = d
        .capsa(true)
        .args(["exec", "frozen", "--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // ...while another sandbox's exec through the same daemon goes on.
    for _ in 0..3 {
        let t = Instant::now();
        assert_eq!(
            d.ok_on(true, &["exec", "fine", "--", "echo", "ok"]).trim(),
            "ok"
        );
        let took = t.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "an exec took {took:?} while another sandbox was frozen"
        );
    }
    // kill needs only the monitor, not the frozen agent.
    let t = Instant::now();
    d.ok_on(true, &["kill", "frozen"]);
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "kill took {:?}",
        t.elapsed()
    );
    assert_eq!(record(&d, "frozen")["state"], "stopped");
    let mut stuck = stuck;
    let _ = stuck.kill();
    let _ = stuck.wait();
}

#[test]
fn programs_that_cannot_start_exit_127_and_126_everywhere() {
    let d = Daemon::start("ch", &[]);
    d.ok_on(true, &["create", "--name", "codes", "--memory", "256M"]);
    for host in [false, true] {
        let o = d.run_on(host, &["exec", "codes", "--", "no-such-program"]);
        assert_eq!(o.status.code(), Some(127), "host {host}: {o:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("no-such-program"), "host {host}: {err}");
        // The interactive path (a WebSocket through capsad) agrees.
        let o = d.run_on(host, &["exec", "-i", "codes", "--", "no-such-program"]);
        assert_eq!(o.status.code(), Some(127), "-i, host {host}: {o:?}");
        let o = d.run_on(host, &["exec", "codes", "--", "/etc/passwd"]);
        assert_eq!(o.status.code(), Some(126), "host {host}: {o:?}");
        // A missing working directory is not a missing program.
        let o = d.run_on(host, &["exec", "codes", "-w", "/nope", "--", "true"]);
        assert_eq!(o.status.code(), Some(1), "host {host}: {o:?}");
    }
    let o = d.run_on(false, &["run", "--memory", "256M", "--", "no-such-program"]);
    assert_eq!(o.status.code(), Some(127), "{o:?}");
    let o = d.run_on(false, &["run", "--memory", "256M", "--", "/etc/passwd"]);
    assert_eq!(o.status.code(), Some(126), "{o:?}");

    // CAPSA_HOST is never ignored silently by a local-only command.
    let sock = d.socket();
    for args in [&["run", "--", "true"][..], &["doctor"][..]] {
        let o = d
            .capsa(false)
            .env("CAPSA_HOST", &sock)
            .args(args)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {o:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("CAPSA_HOST"),
            "{args:?}: {o:?}"
        );
    }
}

/// Every file below `root` with its mode and mtime (seconds), relative paths.
fn tree(root: &Path) -> Vec<(String, u32, i64, Vec<u8>)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let data = if m.is_file() {
                std::fs::read(&p).unwrap()
            } else {
                stack.push(p.clone());
                Vec::new()
            };
            out.push((rel, m.mode() & 0o7777, m.mtime(), data));
        }
    }
    out.sort();
    out
}

#[test]
fn cp_is_recursive_both_ways_direct_and_through_capsad() {
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::start("ch", &[]);
    d.ok_on(true, &["create", "--name", "cpy", "--memory", "256M"]);
    let host = tempfile::tempdir().unwrap();
    let src = host.path().join("src");
    std::fs::create_dir_all(src.join("a/b/c")).unwrap();
    std::fs::create_dir_all(src.join("empty")).unwrap();
    std::fs::write(src.join("top.txt"), b"top").unwrap();
    std::fs::write(src.join("a/b/c/deep.bin"), vec![7u8; 200_000]).unwrap();
    std::fs::write(src.join("a/script.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(
        src.join("a/script.sh"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    std::fs::File::options()
        .write(true)
        .open(src.join("top.txt"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    let want = tree(&src);
    for host_face in [false, true] {
        let guest = format!("cpy:/tmp/t-{host_face}");
        d.ok_on(host_face, &["cp", src.to_str().unwrap(), &guest]);
        let back = host.path().join(format!("back-{host_face}"));
        d.ok_on(host_face, &["cp", &guest, back.to_str().unwrap()]);
        let got = tree(&back);
        // Directory mtimes change as the copy fills them; files keep theirs.
        let files = |t: &[(String, u32, i64, Vec<u8>)]| {
            t.iter()
                .map(|(p, m, t, d)| (p.clone(), *m, if d.is_empty() { 0 } else { *t }, d.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(files(&got), files(&want), "host face {host_face}");
    }
}
