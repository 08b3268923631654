//! Benchmarks the daemon's overhead:
//! - median latency of N `exec true` through capsad (HTTP over its Unix
//!   socket, NDJSON stream) vs the library in-process (`Sandbox::exec` on an
//!   attached sandbox) on the same VM;
//! - monitor RSS per idle sandbox (`VmRSS` of each `capsa-vmm`).
//!
//! `cargo run -p capsad --example bench_api [N] [SANDBOXES]` (builds capsad
//! and capsa-vmm first: `cargo build -p capsad -p capsa-vmm`).

use std::time::{Duration, Instant};

use capsa_client::Client;
use capsad::api::{CreateSandboxRequest, ExecRequest};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(50);
    let boxes: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(3);
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("capsad"))
        .ok_or_else(|| anyhow::anyhow!("no target dir"))?;
    anyhow::ensure!(
        bin.is_file(),
        "build capsad first: cargo build -p capsad -p capsa-vmm"
    );
    let dir = tempfile::Builder::new().prefix("cb").tempdir_in("/tmp")?;
    let mut daemon = std::process::Command::new(&bin)
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
    let token = std::fs::read_to_string(dir.path().join("capsad.token"))?;
    let c = Client::connect(&socket, token.trim())?;

    let result = async {
        let mut names = Vec::new();
        for i in 0..boxes {
            let name = format!("b{i}");
            let t = Instant::now();
            c.create(&CreateSandboxRequest {
                name: Some(name.clone()),
                memory_mib: Some(256),
                start: true,
                ..Default::default()
            })
            .await?;
            println!("create {name} via capsad: {:?}", t.elapsed());
            names.push(name);
        }
        let req = ExecRequest {
            argv: vec!["true".into()],
            ..Default::default()
        };
        // Warm up both paths (the daemon attaches on first use).
        c.exec_output("b0", &req).await?;
        let sb = capsa::Sandboxes::new(Some(dir.path().to_path_buf()))
            .open("b0")
            .await?;
        sb.exec(&capsa::Command::new("true")).await?;

        let mut via_api = Vec::new();
        let mut via_lib = Vec::new();
        for _ in 0..n {
            let t = Instant::now();
            let out = c.exec_output("b0", &req).await?;
            via_api.push(t.elapsed());
            anyhow::ensure!(out.code == Some(0));
            let t = Instant::now();
            let out = sb.exec(&capsa::Command::new("true")).await?;
            via_lib.push(t.elapsed());
            anyhow::ensure!(out.status.success());
        }
        let (a, l) = (median(via_api), median(via_lib));
        println!(
            "exec true, median of {n}: capsad {a:?}, library {l:?}, overhead {:?}",
            a.saturating_sub(l)
        );

        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut rss = Vec::new();
        for s in c.list().await? {
            if let Some(k) = s.monitor_pid.and_then(vm_rss_kib) {
                rss.push(k);
                println!("{}: monitor pid {:?} VmRSS {k} KiB", s.name, s.monitor_pid);
            }
        }
        if !rss.is_empty() {
            println!(
                "monitor RSS per idle sandbox: mean {} KiB over {}",
                rss.iter().sum::<u64>() / rss.len() as u64,
                rss.len()
            );
        }
        if let Some(k) = vm_rss_kib(daemon.id()) {
            println!("capsad RSS: {k} KiB");
        }
        drop(sb);
        for name in &names {
            c.delete(name, true).await?;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let _ = daemon.wait();
    result
}
