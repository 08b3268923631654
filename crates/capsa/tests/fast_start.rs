//! `Capsa::sandbox().build()` starts from the spec's base snapshot by
//! default, as `capsa run` does: the first build of a spec boots and saves
//! the base, later builds restore it with a fresh identity.

use capsa::{Capsa, Command, DiskSpec};

/// The in-process strategy (the library's default).
const FORCE_MONITOR: bool = false;

mod common;

async fn hostname(sb: &capsa::Sandbox) -> String {
    let out = sb
        .exec(&Command::new("cat").arg("/proc/sys/kernel/hostname"))
        .await
        .expect("exec");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_restores_a_base_snapshot_by_default() {
    common::init_tracing();
    // A spec no other run has used, so its first build is the cold one.
    let nonce = format!(
        "capsa.test_nonce={}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let spec = || Capsa::sandbox().memory_mb(256).cmdline_arg(&nonce);
    let dir = capsa::base_snapshot::dir_for(&spec())
        .await
        .unwrap()
        .expect("a disk-less spec has a base snapshot");
    assert!(!dir.exists());

    let first = spec().build().await.expect("first build");
    assert!(!first.restored(), "the first build of a spec boots");
    assert!(
        dir.join(capsa_core::SNAPSHOT_META_FILE).is_file(),
        "the first build saved the base snapshot in {}",
        dir.display()
    );
    let h1 = hostname(&first).await;

    let second = spec()
        .env("WHO", "second")
        .build()
        .await
        .expect("second build");
    assert!(second.restored(), "the second build restores the base");
    let out = second
        .exec(&Command::new("sh").args(["-c", "echo $WHO"]))
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "second");
    let h2 = hostname(&second).await;
    assert_ne!(h1, h2, "a restore gets a fresh identity");

    // Opting out boots, and so does a sandbox with a writable disk.
    let cold = spec().fast_start(false).build().await.expect("cold build");
    assert!(!cold.restored());
    let img = tempfile::NamedTempFile::new().unwrap();
    img.as_file().set_len(8 << 20).unwrap();
    let with_disk = spec()
        .disk(DiskSpec::new(img.path()))
        .build()
        .await
        .expect("build with a disk");
    assert!(!with_disk.restored(), "writable disks boot cold");

    for sb in [first, second, cold, with_disk] {
        let _ = sb.kill().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
