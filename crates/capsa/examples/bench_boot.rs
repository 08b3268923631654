//! Boot benchmark (BENCHMARKS.md): time from the capsa library call to the
//! guest's init marker, against a bare `qemu-system-x86_64` invocation of the
//! same kernel and initramfs to the same marker, interleaved run by run.
//! Also the bundle build time from scratch (fresh cache) and cached.
//!
//! `cargo run --release -p capsa --example bench_boot -- [runs]`

mod common;

use std::time::{Duration, Instant};

use capsa::{image::BundleOptions, Accel, Capsa, LinuxDirectBoot, GUEST_READY_MARKER};

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
        tb.push(common::bare_boot(&b, "256M").await?);
        tl.push(library(&b).await?);
        println!("run {i}: bare {:.3}s capsa {:.3}s", tb[i], tl[i]);
    }
    let (mb, ml) = (common::median(tb), common::median(tl));
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
        common::median(scratch),
        common::median(cached) * 1000.0
    );
    Ok(())
}
