//! Sandbox benchmarks (BENCHMARKS.md, issue 3), side by side in one run:
//! - cold `capsa run -- true` (the CLI binary) vs bare QEMU boot to init;
//! - exec round trip of `true` vs a raw vsock echo round trip on the same VM;
//! - host->guest file throughput vs a raw vsock stream of the same bytes;
//! - host memory per idle sandbox.
//!
//! `cargo build --release -p capsa-cli && cargo run --release -p capsa --example bench_sandbox -- [runs]`

mod common;

use std::time::{Duration, Instant};

use capsa::{Capsa, Command};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn cli_run_true() -> anyhow::Result<f64> {
    let exe = std::env::current_exe()?;
    let cli = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("capsa"))
        .unwrap();
    let start = Instant::now();
    let st = std::process::Command::new(&cli)
        .args(["run", "--accel", "tcg", "--", "true"])
        .status()?;
    anyhow::ensure!(st.success(), "capsa run failed");
    Ok(start.elapsed().as_secs_f64())
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("RssShmem:"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let b = capsa::default_bundle().await?;

    let (mut bare, mut cold) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        bare.push(common::bare_boot(&b, "512M").await?);
        cold.push(tokio::task::spawn_blocking(cli_run_true).await??);
    }
    let (mb, mc) = (common::median(bare), common::median(cold));
    println!("cold start, median of {runs}: bare QEMU boot to init {mb:.3}s; `capsa run -- true` {mc:.3}s; ratio {:.2}x", mc / mb);

    let sb = Capsa::sandbox()
        .fast_start(false)
        .memory_mb(512)
        .accel(capsa::Accel::Tcg)
        .build()
        .await?;
    // A raw vsock echo service in the guest, through capsa-init's vsock tool.
    let mut serve = sb
        .spawn(&Command::new("/init").args(["vsock-serve", "5000", "--", "cat"]))
        .await?;
    let _keep = serve.stdout();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut s = sb.vsock_connect(5000).await?;
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    for _ in 0..200 {
        let t = Instant::now();
        s.write_all(b"x").await?;
        s.read_exact(&mut byte).await?;
        raw.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let mut exec = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        sb.exec(&Command::new("true")).await?;
        exec.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let (mr, me) = (common::median(raw), common::median(exec));
    println!("round trip: raw vsock echo {mr:.0}us (median of 200); exec `true` {me:.0}us (median of 50); ratio {:.1}x", me / mr);
    drop(s);

    // Throughput: the same 64 MiB through the file API and through a raw stream to a sink.
    let data = vec![0x5au8; 64 << 20];
    let mut sink = sb
        .spawn(&Command::new("/init").args([
            "vsock-serve",
            "5001",
            "--",
            "sh",
            "-c",
            "cat > /dev/null",
        ]))
        .await?;
    let _keep2 = sink.stdout();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut rawt, mut filet) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let mut s = sb.vsock_connect(5001).await?;
        let t = Instant::now();
        s.write_all(&data).await?;
        s.shutdown().await?;
        let mut end = [0u8; 1];
        let _ = s.read(&mut end).await; // the sink closes once it has read everything
        rawt.push(64.0 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        sb.write_file_from("/tmp/blob", &data[..], 0o644, None)
            .await?;
        filet.push(64.0 / t.elapsed().as_secs_f64());
    }
    let (mrt, mft) = (common::median(rawt), common::median(filet));
    println!("host->guest 64 MiB, median of 5: raw vsock {mrt:.0} MiB/s; write_file {mft:.0} MiB/s ({:.0}% of raw)", mft / mrt * 100.0);
    serve.kill().await?;
    sink.kill().await?;

    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = sb.vm().pid().unwrap();
    let (rss, shmem) = rss_kib(pid);
    let me = rss_kib(std::process::id());
    println!(
        "idle sandbox (512 MiB guest): QEMU RSS {} MiB of which guest RAM (memfd shmem) {} MiB -> QEMU overhead {} MiB; this host process (vsock device + agent client + runtime) RSS {} MiB",
        rss / 1024,
        shmem / 1024,
        (rss - shmem) / 1024,
        me.0 / 1024
    );
    sb.kill().await?;
    Ok(())
}
