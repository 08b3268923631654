//! Confinement errors that need no VM: a QEMU without seccomp support is a
//! clear error naming the fix, never a silently unconfined VM.

use std::os::unix::fs::PermissionsExt;

use capsa_core::{Accel, Confinement, Hypervisor, StartOptions, VmSpec};
use capsa_qemu::QemuBackend;

/// A stand-in for a QEMU built without libseccomp: it refuses `-sandbox`
/// exactly as such a build does.
fn fake_qemu(dir: &std::path::Path) -> std::path::PathBuf {
    let fake = dir.join("qemu-system-x86_64");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"qemu-system-x86_64: -sandbox on: There is no option group 'sandbox'\" >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    fake
}

#[tokio::test]
async fn a_qemu_without_seccomp_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, b"not really a kernel").unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    // Only the seccomp layer: the fake binary lives in a private temp dir.
    let conf = Confinement {
        user: false,
        cgroup: false,
        ..Confinement::default()
    };
    let backend = QemuBackend::with_binary(fake_qemu(dir.path())).with_confinement(conf);
    let mut spec = VmSpec::linux(kernel, None);
    spec.accel = Accel::Tcg;
    let opts = StartOptions {
        run_dir: run,
        name: "noseccomp".into(),
    };
    let err = match backend.start(spec, opts).await {
        Ok(_) => panic!("a QEMU that refuses -sandbox must not start"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("seccomp"), "{err}");
    assert!(err.contains("CAPSA_CONFINE"), "the opt-out is named: {err}");
    assert!(
        err.contains("option group 'sandbox'"),
        "QEMU's words: {err}"
    );
}

#[test]
fn an_invalid_setting_is_an_error_not_ignored() {
    std::env::set_var("CAPSA_CONFINE", "seccomp,jailer");
    let backend = QemuBackend::with_binary("/bin/false".into());
    let err = backend.confinement().unwrap_err().to_string();
    assert!(err.contains("jailer") && err.contains("Fix"), "{err}");
}
