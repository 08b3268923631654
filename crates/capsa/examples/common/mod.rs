//! Shared by the benchmark examples: the bare-QEMU baseline and medians.

use std::process::Stdio;
use std::time::Instant;

use capsa::GUEST_READY_MARKER;
use tokio::io::AsyncReadExt;

/// The median of `v` (upper middle for even lengths).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Seconds from spawning a bare `qemu-system-x86_64` with the bundle's kernel
/// and initramfs (same machine, accelerator and memory as capsa uses) until
/// the guest prints capsa's init marker.
pub async fn bare_boot(b: &capsa::image::Bundle, memory: &str) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut child = tokio::process::Command::new("qemu-system-x86_64")
        .args([
            "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", memory,
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-serial", "stdio", "-kernel"])
        .arg(&b.kernel)
        .arg("-initrd")
        .arg(&b.initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut out = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = out.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "bare QEMU exited before the marker");
        seen.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&seen).contains(GUEST_READY_MARKER) {
            break;
        }
    }
    let t = start.elapsed().as_secs_f64();
    child.kill().await?;
    Ok(t)
}
