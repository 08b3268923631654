//! Boot benchmark (BENCHMARKS.md): time from the capsa library call to the
//! guest's init marker, against a bare `qemu-system-x86_64` invocation of the
//! same kernel and initramfs to the same marker, interleaved run by run.
//! Also the bundle build time from scratch (fresh cache) and cached.
//!
//! `cargo run --release -p capsa --example bench_boot -- [runs]`

use std::process::Stdio;
use std::time::{Duration, Instant};

use capsa::{image::BundleOptions, Accel, Capsa, LinuxDirectBoot, GUEST_READY_MARKER};
use tokio::io::AsyncReadExt;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn bare(b: &capsa::image::Bundle) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut child = tokio::process::Command::new("qemu-system-x86_64")
        .args([
            "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "256M",
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
    let mut out = child.stdout.take().unwrap();
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

async fn library(b: &capsa::image::Bundle) -> anyhow::Result<f64> {
    let start = Instant::now();
    let vm = Capsa::vm(LinuxDirectBoot::from_bundle(b))
        .memory_mb(256)
        .accel(Accel::Tcg)
        .console()
        .build()
        .await?;
    vm.console()?
        .wait_for(GUEST_READY_MARKER, Duration::from_secs(120))
        .await?;
    let t = start.elapsed().as_secs_f64();
    vm.kill().await?;
    Ok(t)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let b = capsa::default_bundle().await?;
    let (mut tb, mut tl) = (Vec::new(), Vec::new());
    for i in 0..runs {
        tb.push(bare(&b).await?);
        tl.push(library(&b).await?);
        println!("run {i}: bare {:.3}s capsa {:.3}s", tb[i], tl[i]);
    }
    let (mb, ml) = (median(tb), median(tl));
    println!("boot to marker, median of {runs}: bare QEMU {mb:.3}s, capsa library {ml:.3}s, overhead {:+.1}%", (ml / mb - 1.0) * 100.0);

    let mut scratch = Vec::new();
    for _ in 0..3 {
        let dir = tempfile::tempdir()?;
        let opts = BundleOptions {
            cache_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        };
        let t = Instant::now();
        capsa::bundle(opts).await?;
        scratch.push(t.elapsed().as_secs_f64());
    }
    let mut cached = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        capsa::default_bundle().await?;
        cached.push(t.elapsed().as_secs_f64());
    }
    println!(
        "bundle build: from scratch (kernel download + unpack + initramfs) median of 3 {:.2}s; cached median of 5 {:.1}ms",
        median(scratch),
        median(cached) * 1000.0
    );
    Ok(())
}
