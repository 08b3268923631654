//! Choosing the accelerator by a real probe, never by the device file alone.
//!
//! `/dev/kvm` can exist and open while a stock Linux guest still stalls or dies
//! under it (nested or paravirtual setups such as PVM). So `auto` boots the
//! guest kernel under KVM once, watches for the kernel reaching init, and
//! caches the verdict per host kernel and QEMU binary.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

/// What the kernel prints just before it runs init (KERN_INFO, shown without `quiet`).
const REACHED_INIT: &[&str] = &["Freeing unused kernel image", "Run /init as init process"];

/// How long a KVM probe boot may take before KVM is declared unusable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether `/dev/kvm` opens read-write and answers the KVM API version ioctl.
pub fn kvm_device_usable() -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int.
    let v = unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if v != 12 {
        return Err(format!("/dev/kvm answered API version {v}, expected 12"));
    }
    Ok(())
}

/// A cached probe verdict.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProbeRecord {
    /// What the verdict depends on: host kernel and QEMU binary.
    pub key: String,
    /// Whether a guest reached init under KVM.
    pub kvm_works: bool,
    /// Why, in words.
    pub detail: String,
}

/// The cache key for this host and QEMU binary.
pub fn probe_key(qemu: &Path) -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let meta = std::fs::metadata(qemu).ok();
    let stamp = meta
        .and_then(|m| m.modified().ok().map(|t| (m.len(), t)))
        .map(|(len, t)| format!("{len}:{:?}", t))
        .unwrap_or_default();
    format!("{}|{}|{}", release.trim(), qemu.display(), stamp)
}

/// Reads a cached verdict for `key`, if one exists.
pub fn read_cached(cache: &Path, key: &str) -> Option<ProbeRecord> {
    let text = std::fs::read_to_string(cache).ok()?;
    let rec: ProbeRecord = serde_json::from_str(&text).ok()?;
    (rec.key == key).then_some(rec)
}

/// Stores a verdict; failures only cost a re-probe next time.
pub fn write_cached(cache: &Path, rec: &ProbeRecord) {
    if let Some(dir) = cache.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let tmp = cache.with_extension(format!("tmp{}", std::process::id()));
    if let Ok(text) = serde_json::to_string_pretty(rec) {
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, cache);
        }
    }
}

/// Default location of the probe cache.
pub fn default_cache_file() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("capsa").join("accel-probe.json")
}

/// Boots `kernel` under KVM and reports whether it reached init within `timeout`.
pub async fn boot_probe(
    qemu: &Path,
    kernel: &Path,
    initrd: Option<&Path>,
    timeout: Duration,
) -> (bool, String) {
    let mut cmd = tokio::process::Command::new(qemu);
    cmd.args([
        "-machine",
        crate::args::MACHINE,
        "-accel",
        "kvm",
        "-cpu",
        "host",
    ])
    .args(["-m", "256M", "-smp", "1", "-nodefaults", "-no-user-config"])
    .args(["-display", "none", "-no-reboot", "-serial", "stdio"])
    .arg("-kernel")
    .arg(kernel)
    .args([
        "-append",
        "console=ttyS0 panic=-1 rdinit=/capsa-kvm-probe-none",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    if let Some(i) = initrd {
        cmd.arg("-initrd").arg(i);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return (false, format!("cannot start {}: {e}", qemu.display())),
    };
    let Some(mut out) = child.stdout.take() else {
        return (false, "no stdout from QEMU".into());
    };
    let watch = async {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match out.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    seen.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&seen);
                    if REACHED_INIT.iter().any(|m| text.contains(m)) {
                        return true;
                    }
                    // Keep only a tail large enough to hold a marker split across reads.
                    if seen.len() > 8192 {
                        seen.drain(..seen.len() - 256);
                    }
                }
            }
        }
    };
    let verdict = match tokio::time::timeout(timeout, watch).await {
        Ok(true) => (true, "a guest kernel reached init under KVM".to_string()),
        Ok(false) => {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), e.read_to_string(&mut err)).await;
            }
            (
                false,
                format!("the guest died under KVM before init: {}", err.trim()),
            )
        }
        Err(_) => (
            false,
            format!("the guest did not reach init under KVM within {timeout:?}"),
        ),
    };
    let _ = child.start_kill();
    let _ = child.wait().await;
    verdict
}
