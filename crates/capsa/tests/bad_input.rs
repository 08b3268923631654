//! Bad input is refused before anything starts, with a typed error and a fix.
//! (Own test binary: no test here starts QEMU, so any QEMU child is a leak.)

mod common;

/// Set by the `monitor_*` test binaries that include this suite.
#[allow(dead_code)]
const FORCE_MONITOR: bool = false;

use capsa::{Capsa, Error, LinuxDirectBoot};
use capsa_core::{DiskProbeError, Error as CoreError};
use common::{bundle, qemu_children, strategy};

fn assert_no_qemu() {
    assert!(qemu_children().is_empty(), "a QEMU process was left behind");
}

#[tokio::test]
async fn missing_kernel() {
    let e = Capsa::vm(LinuxDirectBoot::new("/nonexistent/vmlinux", None::<&str>))
        .strategy(strategy())
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Core(CoreError::InvalidSpec {
                field: "kernel",
                ..
            })
        ),
        "{e}"
    );
    assert!(e.fix().unwrap().contains("--kernel"));
    assert_no_qemu();
}

#[tokio::test]
async fn memory_zero_and_beyond_host() {
    let b = bundle().await;
    for mib in [0, u64::MAX / 2] {
        let e = Capsa::vm(LinuxDirectBoot::from_bundle(&b))
            .strategy(strategy())
            .memory_mb(mib)
            .build()
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::Core(CoreError::InvalidSpec {
                    field: "memory",
                    ..
                })
            ),
            "{e}"
        );
        assert!(e.to_string().contains("Fix:"), "{e}");
    }
    assert_no_qemu();
}

#[tokio::test]
async fn unknown_accel() {
    let e = "warp-drive".parse::<capsa::Accel>().unwrap_err();
    assert!(matches!(e, CoreError::InvalidSpec { field: "accel", .. }));
    assert!(e.to_string().contains("auto, kvm, tcg"));
}

#[tokio::test]
async fn corrupt_and_missing_disks() {
    let b = bundle().await;
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("corrupt.qcow2");
    let mut bytes = b"QFI\xfb".to_vec();
    bytes.extend_from_slice(&[0xee; 508]);
    std::fs::write(&bad, bytes).unwrap();
    let e = Capsa::vm(LinuxDirectBoot::from_bundle(&b))
        .strategy(strategy())
        .disk(&bad)
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Core(CoreError::Disk {
                source: DiskProbeError::Corrupt(_),
                ..
            })
        ),
        "{e}"
    );
    assert!(e.fix().unwrap().contains("qemu-img"));
    let e = Capsa::vm(LinuxDirectBoot::from_bundle(&b))
        .strategy(strategy())
        .disk(dir.path().join("nope.img"))
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Core(CoreError::Disk {
                source: DiskProbeError::NotFound,
                ..
            })
        ),
        "{e}"
    );
    assert_no_qemu();
}

#[tokio::test]
async fn bad_cmdline_and_name() {
    let b = bundle().await;
    let e = Capsa::vm(LinuxDirectBoot::from_bundle(&b))
        .strategy(strategy())
        .cmdline_arg("a=\"open")
        .build()
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Core(CoreError::Cmdline(_))), "{e}");
    let e = Capsa::vm(LinuxDirectBoot::from_bundle(&b))
        .strategy(strategy())
        .name("../etc")
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Core(CoreError::InvalidSpec { field: "name", .. })),
        "{e}"
    );
    assert_no_qemu();
}

#[tokio::test]
async fn forced_kvm_where_guests_cannot_run_is_refused_before_start() {
    let b = bundle().await;
    let r = Capsa::vm(LinuxDirectBoot::from_bundle(&b))
        .strategy(strategy())
        .memory_mb(256)
        .accel(capsa::Accel::Kvm)
        .build()
        .await;
    match r {
        Err(e) => {
            // This machine (and CI's): /dev/kvm exists, but a probe boot shows
            // guests die under it; the force must fail clearly, not crash QEMU.
            assert!(
                matches!(e, Error::Core(CoreError::Unsupported { .. })),
                "expected Unsupported, got {e}"
            );
            assert!(e.to_string().contains("KVM"), "{e}");
            assert!(e.fix().unwrap_or_default().contains("tcg"), "{e}");
            assert_no_qemu();
        }
        Ok(vm) => {
            // A host where KVM really runs guests: the force is honoured.
            assert_eq!(vm.spec().accel, capsa::Accel::Kvm);
            vm.kill().await.expect("kill");
        }
    }
}
