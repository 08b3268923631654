//! Confinement on real VMs (see ARCHITECTURE.md, "Threat model"): QEMU under
//! its seccomp filter, as a per-sandbox uid when the tests run as root, in a
//! cgroup with the spec's limits; the vsock device's threads under capsa's
//! seccomp filter. Each check fails on a capsa that does not confine.

mod common;

/// Set by `monitor_confine.rs`, which runs this suite under the monitor.
#[allow(dead_code)]
const FORCE_MONITOR: bool = false;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use capsa::{Capsa, LinuxDirectBoot, Sandbox};

fn status_field(path: &Path, field: &str) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    s.lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("no {field} in {}", path.display()))
}

fn proc_status(pid: u32, field: &str) -> String {
    status_field(Path::new(&format!("/proc/{pid}/status")), field)
}

/// The real uid of `pid`.
fn uid_of(pid: u32) -> u32 {
    proc_status(pid, "Uid:")
        .split_whitespace()
        .next()
        .and_then(|u| u.parse().ok())
        .expect("a uid")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// QEMU's directory for its sockets, from its `-qmp unix:DIR/qmp.sock,...`.
fn qemu_dir(pid: u32) -> PathBuf {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("QEMU's cmdline");
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let qmp = args
        .iter()
        .skip_while(|a| *a != "-qmp")
        .nth(1)
        .expect("a -qmp argument");
    let path = qmp
        .strip_prefix("unix:")
        .and_then(|p| p.split(",server").next())
        .expect("a unix QMP socket");
    Path::new(path).parent().expect("a directory").to_path_buf()
}

/// Whether `uid` (with gid `uid` and no other groups) can list `dir`.
fn can_list_as(uid: u32, dir: &Path) -> bool {
    use std::os::unix::process::CommandExt;
    std::process::Command::new("ls")
        .arg(dir)
        .uid(uid)
        .gid(uid)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("running ls")
        .success()
}

/// The limits of the cgroup `pid` is in: (memory bytes, CPU quota per period).
fn cgroup_limits(pid: u32) -> Option<(u64, String)> {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path_for = |ctrl: Option<&str>| {
        own.lines().find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (id, ctrls, path) = (p.next()?, p.next()?, p.next()?);
            let hit = match ctrl {
                None => id == "0" && ctrls.is_empty(),
                Some(c) => ctrls.split(',').any(|x| x == c),
            };
            hit.then(|| path.trim_start_matches('/').to_string())
        })
    };
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        let dir = root.join(path_for(None)?);
        let mem = std::fs::read_to_string(dir.join("memory.max")).ok()?;
        let cpu = std::fs::read_to_string(dir.join("cpu.max")).ok()?;
        Some((mem.trim().parse().ok()?, cpu.trim().to_string()))
    } else {
        let mem_dir = root.join("memory").join(path_for(Some("memory"))?);
        let cpu_dir = root.join("cpu").join(path_for(Some("cpu"))?);
        let mem = std::fs::read_to_string(mem_dir.join("memory.limit_in_bytes")).ok()?;
        let quota = std::fs::read_to_string(cpu_dir.join("cpu.cfs_quota_us")).ok()?;
        let period = std::fs::read_to_string(cpu_dir.join("cpu.cfs_period_us")).ok()?;
        Some((
            mem.trim().parse().ok()?,
            format!("{} {}", quota.trim(), period.trim()),
        ))
    }
}

/// (name, Seccomp mode) of every thread of `pid`.
fn threads(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        let seccomp = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:").map(|v| v.trim().to_string()))
            .unwrap_or_default();
        out.push((comm.trim().to_string(), seccomp));
    }
    out
}

async fn sandbox(mem: u64, cpus: u32) -> Sandbox {
    common::sandbox()
        .memory_mb(mem)
        .cpus(cpus)
        .build()
        .await
        .expect("sandbox boots")
}

#[tokio::test]
async fn qemu_and_the_vsock_device_run_confined_and_apart() {
    let a = sandbox(256, 1).await;
    let b = sandbox(320, 1).await;
    // Work goes on under every filter.
    let out = a.exec(&capsa::Command::new("true")).await.unwrap();
    assert_eq!(out.status.code, Some(0));
    let qa = a.vm().pid().expect("QEMU pid");
    let qb = b.vm().pid().expect("QEMU pid");

    // seccomp (mode 2 = filter) and no_new_privs.
    for pid in [qa, qb] {
        assert_eq!(proc_status(pid, "Seccomp:"), "2", "QEMU {pid} has a filter");
        assert_eq!(proc_status(pid, "NoNewPrivs:"), "1");
    }

    // The vsock device's threads are filtered, and only they: they live in
    // this process in-process, in the monitor otherwise.
    let host = a.vm().monitor_pid().unwrap_or_else(std::process::id);
    let ts = threads(host);
    let device: Vec<_> = ts
        .iter()
        .filter(|(name, _)| name.starts_with("capsa-vsock") || name == "vring_worker")
        .collect();
    assert!(device.len() >= 2, "the device's threads are found: {ts:?}");
    for (name, mode) in &device {
        assert_eq!(mode, "2", "device thread {name} is filtered: {ts:?}");
    }
    assert!(
        ts.iter().any(|(_, mode)| mode == "0"),
        "other threads of the host process are not filtered: {ts:?}"
    );

    // The cgroup caps memory at the spec's plus the stated overhead, and CPU
    // at one per vCPU plus the overhead.
    let overhead = capsa_qemu::cgroup::MEMORY_OVERHEAD_MIB;
    let period = capsa_qemu::cgroup::CPU_PERIOD_US;
    let quota = period + capsa_qemu::cgroup::CPU_OVERHEAD_US;
    match capsa_qemu::cgroup::status() {
        Ok(kind) => {
            let (mem_a, cpu_a) = cgroup_limits(qa).expect("QEMU's cgroup limits");
            assert_eq!(mem_a, (256 + overhead) << 20, "{kind}");
            assert_eq!(cpu_a, format!("{quota} {period}"), "{kind}");
            let (mem_b, _) = cgroup_limits(qb).expect("QEMU's cgroup limits");
            assert_eq!(mem_b, (320 + overhead) << 20, "{kind}");
        }
        // Root on CI can always make one; elsewhere it is reported, not faked.
        Err(why) if !is_root() => eprintln!("no cgroup here ({why}); limits not checked"),
        Err(why) => panic!("running as root but no VM cgroup: {why}"),
    }

    if is_root() {
        // Each QEMU runs as its own unprivileged uid...
        let (ua, ub) = (uid_of(qa), uid_of(qb));
        assert_ne!(ua, 0, "QEMU does not run as root");
        assert_ne!(ub, 0);
        assert_ne!(ua, ub, "each sandbox has its own uid");
        assert_eq!(proc_status(qa, "Groups:"), "", "no supplementary groups");
        // ...that reaches its own directory but not the other sandbox's, nor
        // capsa's state and run directories.
        let (da, db) = (qemu_dir(qa), qemu_dir(qb));
        assert_ne!(da, db);
        assert!(
            can_list_as(ua, &da),
            "A's uid lists its own {}",
            da.display()
        );
        assert!(
            !can_list_as(ua, &db),
            "A's uid cannot open B's {}",
            db.display()
        );
        assert!(
            !can_list_as(ub, &da),
            "B's uid cannot open A's {}",
            da.display()
        );
        for dir in [a.vm().run_dir(), b.vm().run_dir()] {
            assert!(
                !can_list_as(ua, dir),
                "A's uid cannot open {}",
                dir.display()
            );
        }
        // No host path of capsa's reaches QEMU's command line.
        let cmdline =
            String::from_utf8_lossy(&std::fs::read(format!("/proc/{qa}/cmdline")).unwrap())
                .replace('\0', " ");
        assert!(cmdline.contains("-kernel /proc/self/fd/"), "{cmdline}");
        assert!(!cmdline.contains(".cache/capsa"), "{cmdline}");
    } else {
        eprintln!("not root: QEMU runs as this user (no privilege drop to check)");
    }

    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test]
async fn a_confined_vm_is_cleaned_up_and_confinement_off_is_real() {
    if crate::FORCE_MONITOR {
        // The backend setting is per process; the monitor reads CAPSA_CONFINE.
        return;
    }
    let bundle = common::bundle().await;
    let confined = Capsa::vm(LinuxDirectBoot::from_bundle(&bundle))
        .memory_mb(256)
        .build()
        .await
        .expect("VM boots");
    let pid = confined.pid().expect("pid");
    let dir = qemu_dir(pid);
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    confined.kill().await.unwrap();
    drop(confined);
    if is_root() {
        assert!(
            !dir.exists(),
            "the jail directory {} is removed",
            dir.display()
        );
    }
    // The VM's cgroup went with it.
    if capsa_qemu::cgroup::status().is_ok() {
        let leaf = cgroup
            .lines()
            .find_map(|l| l.rsplit('/').next().filter(|n| n.starts_with("capsa-")))
            .expect("QEMU was in a capsa cgroup")
            .to_string();
        let found = walkdir_named(Path::new("/sys/fs/cgroup"), &leaf, 6);
        assert!(found.is_empty(), "cgroup {leaf} removed: {found:?}");
    }

    // The documented opt-out really turns every layer off.
    let backend = capsa_qemu::QemuBackend::new()
        .unwrap()
        .with_confinement(capsa_core::Confinement::off());
    let plain = Capsa::vm(LinuxDirectBoot::from_bundle(&bundle))
        .memory_mb(256)
        .backend(Arc::new(backend))
        .build()
        .await
        .expect("VM boots");
    let pid = plain.pid().expect("pid");
    assert_eq!(proc_status(pid, "Seccomp:"), "0");
    // SAFETY: geteuid has no preconditions.
    assert_eq!(uid_of(pid), unsafe { libc::geteuid() });
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(!cg.contains("capsa-"), "no VM cgroup: {cg}");
    plain.kill().await.unwrap();
}

/// Directories named `name` beneath `root`, `depth` levels deep at most.
fn walkdir_named(root: &Path, name: &str, depth: usize) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if depth == 0 {
        return out;
    }
    let Ok(rd) = std::fs::read_dir(root) else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if !ft.is_dir() {
            continue;
        }
        if e.file_name() == name {
            out.push(e.path());
        }
        out.extend(walkdir_named(&e.path(), name, depth - 1));
    }
    out
}
