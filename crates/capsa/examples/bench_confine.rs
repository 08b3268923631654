//! The cost of confinement (BENCHMARKS.md, issue 9): `exec true` latency on
//! sandboxes that differ only in `CAPSA_CONFINE` (off, each layer alone, all),
//! booted side by side and exec'd round-robin so that drift on a shared host
//! hits every variant alike. Also prints what a confined QEMU's cgroup saw:
//! peak memory beyond guest RAM (the base for the stated overhead).
//!
//! `cargo run --release -p capsa --example bench_confine -- [rounds] [variants]`
//! (variants: a `/`-separated list, default `off/seccomp/user/cgroup/on`)
//! (as root for the `user` layer; the cgroup layer needs a writable cgroup).

#[allow(dead_code)]
mod common;

use std::time::Instant;

use capsa::{Capsa, Command, Sandbox};

const VARIANTS: &[&str] = &["off", "seccomp", "user", "cgroup", "on"];
const MEMORY_MIB: u64 = 256;

/// `nr_throttled/nr_periods` of the CPU cgroup `pid` is in, if capsa made it.
fn cpu_throttled(pid: u32) -> Option<String> {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for l in own.lines() {
        let mut p = l.splitn(3, ':');
        let (_, ctrls, path) = (p.next()?, p.next()?, p.next()?);
        if !path.contains("/capsa-") {
            continue;
        }
        let path = path.trim_start_matches('/');
        let file = if ctrls.split(',').any(|c| c == "cpu") {
            format!("/sys/fs/cgroup/cpu/{path}/cpu.stat")
        } else if ctrls.is_empty() {
            format!("/sys/fs/cgroup/{path}/cpu.stat")
        } else {
            continue;
        };
        let stat = std::fs::read_to_string(file).ok()?;
        let get = |k: &str| {
            stat.lines()
                .find_map(|l| l.strip_prefix(k)?.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        return Some(format!(
            "; CPU throttled in {}/{} periods",
            get("nr_throttled"),
            get("nr_periods")
        ));
    }
    None
}

/// Peak memory of the cgroup `pid` is in (v1 `memory.max_usage_in_bytes`,
/// v2 `memory.peak`), if it is in one capsa made.
fn cgroup_peak(pid: u32) -> Option<u64> {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for l in own.lines() {
        let mut p = l.splitn(3, ':');
        let (_, ctrls, path) = (p.next()?, p.next()?, p.next()?);
        if !path.contains("/capsa-") {
            continue;
        }
        let path = path.trim_start_matches('/');
        let file = if ctrls.split(',').any(|c| c == "memory") {
            format!("/sys/fs/cgroup/memory/{path}/memory.max_usage_in_bytes")
        } else if ctrls.is_empty() {
            format!("/sys/fs/cgroup/{path}/memory.peak")
        } else {
            continue;
        };
        return std::fs::read_to_string(file).ok()?.trim().parse().ok();
    }
    None
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let chosen: Vec<String> = std::env::args()
        .nth(2)
        .map(|s| s.split('/').map(str::to_string).collect())
        .unwrap_or_else(|| VARIANTS.iter().map(|s| s.to_string()).collect());
    let _ = capsa::default_bundle().await?;
    let mut boxes: Vec<(&str, Sandbox)> = Vec::new();
    for v in &chosen {
        // Read by the QEMU backend when the builder makes it.
        std::env::set_var(capsa_core::CONFINE_ENV, v);
        let sb = Capsa::sandbox()
            .fast_start(false)
            .memory_mb(MEMORY_MIB)
            .accel(capsa::Accel::Tcg)
            .build()
            .await?;
        for _ in 0..10 {
            sb.exec(&Command::new("true")).await?;
        }
        boxes.push((v.as_str(), sb));
    }
    std::env::remove_var(capsa_core::CONFINE_ENV);
    let mut lat: Vec<Vec<f64>> = vec![Vec::new(); boxes.len()];
    for _ in 0..rounds {
        for (i, (_, sb)) in boxes.iter().enumerate() {
            let t = Instant::now();
            let out = sb.exec(&Command::new("true")).await?;
            anyhow::ensure!(out.status.code == Some(0), "exec failed");
            lat[i].push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    println!(
        "exec `true`, {rounds} rounds round-robin over {} sandboxes of {MEMORY_MIB} MiB:",
        boxes.len()
    );
    // Relative to the first variant (`off` by default).
    let base = common::median(lat[0].clone());
    for (i, (v, sb)) in boxes.iter().enumerate() {
        let med = common::median(lat[i].clone());
        let p90 = percentile(&mut lat[i], 0.9);
        let pid = sb.vm().pid().unwrap_or(0);
        let peak = cgroup_peak(pid)
            .map(|b| {
                format!(
                    "; memory peak {} MiB of a {} MiB cap",
                    b >> 20,
                    MEMORY_MIB + capsa_qemu::cgroup::MEMORY_OVERHEAD_MIB
                )
            })
            .unwrap_or_default();
        let throttled = cpu_throttled(pid).unwrap_or_default();
        println!(
            "  CAPSA_CONFINE={v:<8} median {med:.2} ms (p90 {p90:.2} ms), {:+.1} % vs {}{peak}{throttled}",
            (med / base - 1.0) * 100.0,
            boxes[0].0
        );
    }
    for (_, sb) in boxes {
        sb.stop().await?;
    }
    Ok(())
}
