//! Soak: many `exec true` on one sandbox, looking for leaks and drift.
//!
//! - N1 (default 10,000) through the library (an attached `Sandbox`);
//! - N2 (default 2,000) through the `capsa` CLI directly, and N2 through the
//!   CLI with `--host` (capsad);
//!
//! printing open descriptors and RSS of the monitor, QEMU and capsad before
//! and after each phase, and p50/p99 latency per thousand.
//!
//! `cargo build --release -p capsa-cli -p capsad -p capsa-vmm &&
//!  cargo run --release -p capsad --example bench_soak [N1] [N2]`

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn snapshot(label: &str, procs: &[(&str, u32)]) {
    let parts: Vec<String> = procs
        .iter()
        .map(|(n, p)| format!("{n}: {} fds, {} KiB RSS", fds(*p), status_kib(*p, "VmRSS:")))
        .collect();
    println!("  {label}: {}", parts.join("; "));
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// p50/p99 per thousand, so drift shows.
fn report(name: &str, lat: &[Duration]) {
    println!("{name}: {} execs", lat.len());
    for (i, chunk) in lat.chunks(1000).enumerate() {
        let mut c = chunk.to_vec();
        c.sort();
        println!(
            "  {:>5}-{:<5} p50 {:>8.2?} p99 {:>8.2?}",
            i * 1000,
            i * 1000 + c.len(),
            pct(&c, 0.5),
            pct(&c, 0.99)
        );
    }
}

fn cli_execs(
    capsa: &Path,
    root: &Path,
    host: Option<&Path>,
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = std::process::Command::new(capsa);
        c.env("CAPSA_STATE_DIR", root).env_remove("CAPSA_HOST");
        if let Some(h) = host {
            c.arg("--host").arg(h);
        }
        let t = Instant::now();
        let st = c.args(["exec", "soak", "--", "true"]).status()?;
        lat.push(t.elapsed());
        anyhow::ensure!(st.success(), "capsa exec failed: {st}");
    }
    Ok(lat)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n1: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let n2: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(2_000);
    let bin_dir: PathBuf = std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent())
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow::anyhow!("no target dir"))?;
    let (capsa, capsad, vmm) = (
        bin_dir.join("capsa"),
        bin_dir.join("capsad"),
        bin_dir.join("capsa-vmm"),
    );
    for b in [&capsa, &capsad, &vmm] {
        anyhow::ensure!(
            b.is_file(),
            "{} missing: cargo build --release -p capsa-cli -p capsad -p capsa-vmm",
            b.display()
        );
    }
    std::env::set_var("CAPSA_VMM", &vmm);
    let dir = tempfile::Builder::new().prefix("cs").tempdir_in("/tmp")?;
    let mut daemon = std::process::Command::new(&capsad)
        .arg("--state-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .spawn()?;
    let socket = dir.path().join("capsad.sock");
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "capsad did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let result = async {
        let reg = capsa::Sandboxes::new(Some(dir.path().to_path_buf()));
        let sb = reg
            .create(capsa::Capsa::sandbox().name("soak").memory_mb(256))
            .await?;
        let rec = sb.record()?;
        let procs = [
            ("monitor", rec.monitor_pid.unwrap_or(0)),
            ("qemu", rec.vmm_pid.unwrap_or(0)),
            ("capsad", daemon.id()),
        ];
        let cmd = capsa::Command::new("true");
        sb.exec(&cmd).await?;
        println!(
            "machine: {} cores",
            std::thread::available_parallelism()?.get()
        );

        snapshot("start", &procs);
        let mut lat = Vec::with_capacity(n1);
        for _ in 0..n1 {
            let t = Instant::now();
            let out = sb.exec(&cmd).await?;
            lat.push(t.elapsed());
            anyhow::ensure!(out.status.success());
        }
        report("library", &lat);
        snapshot("after library", &procs);

        let lat = cli_execs(&capsa, dir.path(), None, n2)?;
        report("CLI direct", &lat);
        snapshot("after CLI direct", &procs);

        let lat = cli_execs(&capsa, dir.path(), Some(&socket), n2)?;
        report("CLI through capsad", &lat);
        snapshot("after CLI through capsad", &procs);

        sb.kill().await?;
        reg.remove("soak", true).await?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let _ = daemon.wait();
    result
}
