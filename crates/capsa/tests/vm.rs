//! Real VMs: QEMU, a Debian kernel, capsa's initramfs.

mod common;

/// Set by the `monitor_*` test binaries that include this suite.
#[allow(dead_code)]
const FORCE_MONITOR: bool = false;

use std::time::Duration;

use capsa::{ExitReason, VmStatus, GUEST_READY_MARKER};
use common::{bundle, process_exists, vm, BOOT_TIMEOUT};

#[tokio::test]
async fn boots_to_marker_and_stops_gracefully() {
    let vm = vm().await.build().await.unwrap();
    let con = vm.console().unwrap();
    con.wait_for(GUEST_READY_MARKER, BOOT_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(vm.status().await.unwrap(), VmStatus::Running);
    // A graceful stop: the guest's init shuts down and powers off by itself.
    let reason = vm.stop_timeout(Duration::from_secs(60)).await.unwrap();
    assert_eq!(reason, ExitReason::PoweredOff);
    assert!(matches!(
        vm.status().await.unwrap(),
        VmStatus::Stopped { .. }
    ));
    let log = std::fs::read_to_string(con.log_path().unwrap()).unwrap();
    assert!(
        log.contains(GUEST_READY_MARKER),
        "console log holds the boot"
    );
    assert!(
        !log.contains("Kernel panic"),
        "clean power-off, no panic: {log}"
    );
}

#[tokio::test]
async fn console_round_trip_shows_debian_kernel() {
    let b = bundle().await;
    let vm = vm().await.build().await.unwrap();
    let con = vm.console().unwrap();
    con.wait_for(GUEST_READY_MARKER, BOOT_TIMEOUT)
        .await
        .unwrap();
    // The shell echoes what we type; only the computed result has "=42" and the version.
    con.write_line("echo \"sum=$((6*7)) kernel=$(uname -r)\"")
        .await
        .unwrap();
    let expect = format!("sum=42 kernel={}", b.kernel_version);
    let seen = con
        .wait_for(&expect, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(seen.contains(&expect));
    let (which, _) = con
        .wait_for_any(&["never-printed", "$ ", "# "], Duration::from_secs(30))
        .await
        .unwrap();
    assert!(which > 0, "a prompt follows");
    vm.kill().await.unwrap();
}

#[tokio::test]
async fn raw_and_qcow2_disks_with_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("data.img");
    let mut bytes = vec![0u8; 4 << 20];
    bytes[..16].copy_from_slice(b"RAW-DISK-MAGIC-1");
    std::fs::write(&raw, &bytes).unwrap();
    // A qcow2 named .img: the format must be read from the header, not the name.
    let src = dir.path().join("src.raw");
    bytes[..16].copy_from_slice(b"QCOW-DISK-MAGIC2");
    std::fs::write(&src, &bytes).unwrap();
    let qcow = dir.path().join("second.img");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&src)
        .arg(&qcow)
        .status()
        .expect("qemu-img (apt-get install qemu-utils)");
    assert!(st.success());

    let vm = vm().await.disk(&raw).disk_ro(&qcow).build().await.unwrap();
    assert_eq!(vm.spec().disks[1].format, Some(capsa::DiskFormat::Qcow2));
    let con = vm.console().unwrap();
    con.wait_for(GUEST_READY_MARKER, BOOT_TIMEOUT)
        .await
        .unwrap();
    let t = Duration::from_secs(60);
    con.write_line("echo A=$(dd if=/dev/vda bs=16 count=1 2>/dev/null)=")
        .await
        .unwrap();
    con.wait_for("A=RAW-DISK-MAGIC-1=", t).await.unwrap();
    con.write_line("echo B=$(dd if=/dev/vdb bs=16 count=1 2>/dev/null)=")
        .await
        .unwrap();
    con.wait_for("B=QCOW-DISK-MAGIC2=", t).await.unwrap();
    // Writes to the read-only disk fail; writes to the writable one reach the host file.
    con.write_line(
        "dd if=/dev/zero of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null; echo ro_rc=$?",
    )
    .await
    .unwrap();
    let out = con.wait_for_any(&["ro_rc=0", "ro_rc=1"], t).await.unwrap();
    assert_eq!(out.0, 1, "write to read-only disk must fail");
    con.write_line(
        "printf GUEST-WROTE | dd of=/dev/vda bs=512 seek=1 conv=fsync 2>/dev/null; echo rw_rc=$?",
    )
    .await
    .unwrap();
    con.wait_for("rw_rc=0", t).await.unwrap();
    vm.stop_timeout(Duration::from_secs(60)).await.unwrap();
    let host = std::fs::read(&raw).unwrap();
    assert_eq!(&host[512..523], b"GUEST-WROTE");
    let q = std::fs::read(&qcow).unwrap();
    assert_eq!(&q[..4], b"QFI\xfb", "read-only qcow2 untouched");
}

#[tokio::test]
async fn kill_and_status() {
    let vm = vm().await.build().await.unwrap();
    vm.console()
        .unwrap()
        .wait_for(GUEST_READY_MARKER, BOOT_TIMEOUT)
        .await
        .unwrap();
    vm.pause().await.unwrap();
    assert_eq!(vm.status().await.unwrap(), VmStatus::Paused);
    vm.resume().await.unwrap();
    assert_eq!(vm.status().await.unwrap(), VmStatus::Running);
    let reason = vm.kill().await.unwrap();
    assert_eq!(reason, ExitReason::Killed { signal: 9 });
    assert_eq!(vm.wait().await.unwrap(), reason);
}

#[tokio::test]
async fn four_vms_at_once() {
    let builders = named_builders(4).await;
    let vms = futures::future::try_join_all(builders.into_iter().map(|b| b.build()))
        .await
        .unwrap();
    let waits = vms.iter().map(|v| async move {
        v.console()
            .unwrap()
            .wait_for(GUEST_READY_MARKER, BOOT_TIMEOUT * 2)
            .await
    });
    for r in futures::future::join_all(waits).await {
        r.unwrap();
    }
    let pids: Vec<u32> = vms.iter().map(|v| v.pid().unwrap()).collect();
    let mut uniq = pids.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), 4);
    futures::future::try_join_all(vms.iter().map(|v| v.kill()))
        .await
        .unwrap();
}

async fn named_builders(n: usize) -> Vec<capsa::VmBuilder> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(vm().await.name(format!("conc-{}-{i}", std::process::id())));
    }
    v
}

#[tokio::test]
async fn dropping_the_handle_reaps_qemu() {
    let vm = vm().await.build().await.unwrap();
    let pid = vm.pid().unwrap();
    assert!(process_exists(pid));
    drop(vm);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while process_exists(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "QEMU {pid} still exists (or unreaped) after drop"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
