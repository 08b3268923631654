//! Snapshots, restores and warm pools on real VMs (TCG).

mod common;

/// Snapshots are taken of in-process VMs here (see `monitor.rs` for the monitor's).
#[allow(dead_code)]
const FORCE_MONITOR: bool = false;

use std::time::{Duration, Instant};

use capsa::{Capsa, Command, DiskSpec, Error, Sandbox};

async fn sandbox() -> Sandbox {
    common::init_tracing();
    Capsa::sandbox()
        .fast_start(false)
        .memory_mb(256)
        .build()
        .await
        .expect("sandbox boots")
}

async fn sh(sb: &Sandbox, script: &str) -> String {
    let out = sb
        .exec(&Command::new("sh").args(["-c", script]))
        .await
        .expect("exec");
    assert!(
        out.status.success(),
        "{script}: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Files and processes from before the snapshot are there after a restore,
/// exec works right away (50 in a row), and the source keeps working.
#[tokio::test]
async fn state_survives_and_exec_works_at_once() {
    let sb = sandbox().await;
    sb.write_file("/work/before.txt", b"written before the snapshot")
        .await
        .unwrap();
    // A process outside the agent's per-command process group survives its exec.
    sh(
        &sb,
        "setsid sh -c 'echo $$ > /work/daemon.pid; exec sleep 100000' >/dev/null 2>&1 &",
    )
    .await;
    let pid = loop {
        let p = sh(&sb, "cat /work/daemon.pid 2>/dev/null || true").await;
        if !p.is_empty() {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let snap = sb
        .snapshot(dir.path().join("snap"))
        .await
        .expect("snapshot");
    eprintln!(
        "snapshot took {:?}, {} MiB on disk",
        t.elapsed(),
        snap.size_on_disk() >> 20
    );
    // The source still answers (its vsock device came back).
    assert_eq!(sh(&sb, "echo source-ok").await, "source-ok");

    let t = Instant::now();
    let clone = Capsa::restore(snap.path()).build().await.expect("restore");
    let out = clone.exec(&Command::new("true")).await.unwrap();
    assert!(out.status.success());
    eprintln!("restore to first exec: {:?}", t.elapsed());
    eprintln!(
        "clone console: {}",
        clone.vm().console().unwrap().read_available()
    );
    assert_eq!(
        clone.read_file("/work/before.txt").await.unwrap(),
        b"written before the snapshot"
    );
    assert_eq!(
        sh(&clone, &format!("cat /proc/{pid}/cmdline | tr '\\0' ' '")).await,
        "sleep 100000"
    );
    for i in 0..50 {
        let out = clone
            .exec(&Command::new("echo").arg(i.to_string()))
            .await
            .unwrap_or_else(|e| panic!("exec {i} after restore: {e}"));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), i.to_string());
    }
    // Writes in the clone do not show in the source.
    clone.write_file("/work/clone.txt", b"x").await.unwrap();
    assert_eq!(
        sh(&sb, "test -e /work/clone.txt && echo yes || echo no").await,
        "no"
    );
}

/// Two clones of one snapshot: different hostnames, machine ids and random
/// output, and writes to their disks stay their own.
#[tokio::test]
async fn clones_differ_and_do_not_share_disks() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("data.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let sb = Capsa::sandbox()
        .fast_start(false)
        .memory_mb(256)
        .disk(DiskSpec::new(&img))
        .build()
        .await
        .expect("sandbox with a disk");
    sh(
        &sb,
        "printf base | dd of=/dev/vda bs=512 seek=0 conv=fsync 2>/dev/null",
    )
    .await;
    let snap = sb
        .snapshot(dir.path().join("snap"))
        .await
        .expect("snapshot");
    // The source writes after the snapshot: no clone may see it.
    sh(
        &sb,
        "printf SRC1 | dd of=/dev/vda bs=512 seek=2 conv=fsync 2>/dev/null",
    )
    .await;

    let a = Capsa::restore(snap.path()).build().await.expect("clone a");
    let b = Capsa::restore(snap.path()).build().await.expect("clone b");
    let ident =
        "hostname; cat /etc/machine-id; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    let (ia, ib, is) = (
        sh(&a, ident).await,
        sh(&b, ident).await,
        sh(&sb, ident).await,
    );
    let (la, lb, ls): (Vec<_>, Vec<_>, Vec<_>) = (
        ia.lines().collect(),
        ib.lines().collect(),
        is.lines().collect(),
    );
    assert_eq!(la.len(), 3, "{ia}");
    for i in 0..3 {
        assert_ne!(la[i], lb[i], "clones share line {i}: {ia} / {ib}");
    }
    // The cold-booted source has no machine id; hostname and RNG must differ.
    assert_ne!(la[0], ls[0], "clone and source share a hostname");
    assert_ne!(la[2], ls[ls.len() - 1], "clone and source share RNG output");
    assert_eq!(la[1].len(), 32, "machine id {}", la[1]);
    // Clocks were set from the host, not left at the snapshot's instant.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let guest: i64 = sh(&a, "date +%s").await.parse().unwrap();
    assert!(
        (guest - now).abs() < 30,
        "guest clock {guest} vs host {now}"
    );

    let read = |sector: u32| {
        format!("echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=512 skip={sector} count=1 2>/dev/null | head -c 4 | tr -d '\\0'")
    };
    assert_eq!(sh(&a, &read(0)).await, "base");
    assert_eq!(sh(&b, &read(0)).await, "base");
    assert_eq!(
        sh(&a, &read(2)).await,
        "",
        "clone sees the source's later write"
    );
    sh(
        &a,
        "printf AAAA | dd of=/dev/vda bs=512 seek=1 conv=fsync 2>/dev/null",
    )
    .await;
    sh(
        &b,
        "printf BBBB | dd of=/dev/vda bs=512 seek=1 conv=fsync 2>/dev/null",
    )
    .await;
    assert_eq!(sh(&a, &read(1)).await, "AAAA");
    assert_eq!(sh(&b, &read(1)).await, "BBBB");
    assert_eq!(
        sh(&sb, &read(1)).await,
        "",
        "the source sees a clone's write"
    );
    // The source's own image took its writes; the snapshot's base did not.
    let data = std::fs::read(&img).unwrap();
    assert_eq!(&data[1024..1028], b"SRC1");
    let base = std::fs::read(snap.path().join("disk0.raw")).unwrap();
    assert_eq!(&base[..4], b"base");
    assert_eq!(&base[512..516], &[0; 4]);
}

/// A snapshot is refused, with the fix, when the kernel changed, when it
/// came from another spec, or from another capsa version.
#[tokio::test]
async fn mismatches_are_refused_clearly() {
    common::init_tracing();
    let bundle = common::bundle().await;
    let dir = tempfile::tempdir().unwrap();
    let mut own = bundle.clone();
    own.kernel = dir.path().join("vmlinux");
    own.initrd = dir.path().join("initrd.img");
    std::fs::copy(&bundle.kernel, &own.kernel).unwrap();
    std::fs::copy(&bundle.initrd, &own.initrd).unwrap();
    let builder = Capsa::sandbox()
        .fast_start(false)
        .memory_mb(256)
        .bundle(own.clone());
    let sb = builder.clone().build().await.expect("sandbox");
    let snap = sb
        .snapshot(dir.path().join("snap"))
        .await
        .expect("snapshot");
    drop(sb);

    // Another spec.
    let other = builder.clone().memory_mb(320).vm_spec().await.unwrap();
    let e = Capsa::restore(snap.path())
        .expect_spec(other)
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Core(capsa_core::Error::SnapshotMismatch { what, .. }) if what == "memory"),
        "{e}"
    );
    assert!(e.fix().is_some(), "{e}");
    // The same spec is accepted.
    let same = builder.vm_spec().await.unwrap();
    let ok = Capsa::restore(snap.path())
        .expect_spec(same)
        .build()
        .await
        .expect("restore with the right spec");
    drop(ok);

    // Another capsa version.
    let meta_path = snap.path().join(capsa_core::SNAPSHOT_META_FILE);
    let original = std::fs::read_to_string(&meta_path).unwrap();
    std::fs::write(
        &meta_path,
        original.replace(
            &format!("\"capsa_version\": \"{}\"", capsa::CAPSA_VERSION),
            "\"capsa_version\": \"0.0.1-elsewhere\"",
        ),
    )
    .unwrap();
    let e = Capsa::restore(snap.path()).build().await.unwrap_err();
    assert!(e.to_string().contains("capsa version"), "{e}");
    std::fs::write(&meta_path, original).unwrap();

    // Another kernel at the same path (no QEMU may start for it).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !common::qemu_children().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut k = std::fs::OpenOptions::new()
        .append(true)
        .open(&own.kernel)
        .unwrap();
    std::io::Write::write_all(&mut k, b"different build").unwrap();
    let e = Capsa::restore(snap.path()).build().await.unwrap_err();
    assert!(
        matches!(&e, Error::Core(capsa_core::Error::SnapshotMismatch { what, .. }) if what == "kernel"),
        "{e}"
    );
    assert!(e.to_string().contains("Fix:"), "{e}");
    assert!(
        common::qemu_children().is_empty(),
        "a refused restore started QEMU"
    );
}

/// Entries of a directory (0 if it does not exist).
fn entries(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A pool of 4 survives 100 acquire/release cycles and leaves nothing behind.
#[tokio::test]
async fn pool_cycles_without_leaks() {
    common::init_tracing();
    let _bundle = common::bundle().await;
    // Private run and temp directories, to count what the pool leaves.
    let scratch = tempfile::tempdir().unwrap();
    let (run, tmp) = (scratch.path().join("run"), scratch.path().join("tmp"));
    std::fs::create_dir_all(&run).unwrap();
    std::fs::create_dir_all(&tmp).unwrap();
    std::env::set_var("XDG_RUNTIME_DIR", &run);
    std::env::set_var("TMPDIR", &tmp);

    let t = Instant::now();
    let pool = Capsa::pool(Capsa::sandbox().memory_mb(256))
        .size(4)
        .build()
        .await
        .expect("pool");
    eprintln!("pool ready in {:?}", t.elapsed());
    let mut waits = Vec::new();
    let mut hostnames = std::collections::HashSet::new();
    for i in 0..100 {
        let t = Instant::now();
        let sb = pool
            .acquire()
            .await
            .unwrap_or_else(|e| panic!("acquire {i}: {e}"));
        waits.push(t.elapsed());
        // Exec on every tenth, to keep the test's CPU for the restores.
        if i % 10 == 0 {
            let h = sh(&sb, "hostname").await;
            assert!(hostnames.insert(h.clone()), "hostname {h} reused");
        }
        drop(sb);
    }
    let stats = pool.stats();
    eprintln!("stats {stats:?}; acquire waits median {:?}", {
        waits.sort();
        waits[waits.len() / 2]
    });
    assert_eq!(stats.acquired, 100);
    assert_eq!(stats.failed, 0, "{stats:?}");
    drop(pool);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (procs, runs, tmps) = (
            common::qemu_children(),
            entries(&run.join("capsa")),
            entries(&tmp),
        );
        if procs.is_empty() && runs.is_empty() && tmps.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leaked: qemu {procs:?}, run dirs {runs:?}, temp {tmps:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `capsa run`'s base snapshot: the first build boots cold and saves it,
/// the next restores it.
#[tokio::test]
async fn base_snapshot_is_made_once_then_restored() {
    common::init_tracing();
    let bundle = common::bundle().await;
    let cache = tempfile::tempdir().unwrap();
    std::env::set_var("XDG_CACHE_HOME", cache.path());
    let builder = Capsa::sandbox()
        .fast_start(false)
        .memory_mb(256)
        .bundle(bundle);
    let dir = capsa::base_snapshot::dir_for(&builder)
        .await
        .unwrap()
        .expect("a diskless sandbox has a base");
    assert!(dir.starts_with(cache.path()));
    let t = Instant::now();
    let first = capsa::base_snapshot::build(builder.clone()).await.unwrap();
    let cold = t.elapsed();
    assert!(dir.join(capsa_core::SNAPSHOT_META_FILE).is_file());
    assert_eq!(sh(&first, "echo one").await, "one");
    let t = Instant::now();
    let second = capsa::base_snapshot::build(builder.clone()).await.unwrap();
    let warm = t.elapsed();
    assert_eq!(sh(&second, "echo two").await, "two");
    eprintln!("first (cold + save) {cold:?}, second (restore) {warm:?}");
    assert!(
        warm < cold,
        "restoring ({warm:?}) was not faster than booting ({cold:?})"
    );
    let names = entries(dir.parent().unwrap());
    assert_eq!(names.len(), 1, "temporary directories left: {names:?}");
}
