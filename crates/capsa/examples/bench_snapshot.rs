//! Snapshot benchmarks (BENCHMARKS.md, issue 5), side by side in one run:
//! - cold start-to-first-exec vs restore start-to-first-exec, same spec;
//! - pool acquire-to-first-exec (from a full pool);
//! - snapshot save time and size for 256 MiB and 1 GiB guests (and their restore).
//!
//! `cargo run -p capsa --example bench_snapshot -- [runs]` (default 10)

#[allow(dead_code)] // the shared helpers include ones this benchmark does not use
mod common;

use std::time::Instant;

use capsa::{Capsa, Command, Sandbox};

async fn first_exec(sb: &Sandbox) -> anyhow::Result<()> {
    let out = sb.exec(&Command::new("true")).await?;
    anyhow::ensure!(out.status.success(), "true failed: {:?}", out.status);
    Ok(())
}

fn ms(v: f64) -> String {
    format!("{:.0} ms", v * 1e3)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let bundle = capsa::default_bundle().await?;
    let builder = |mib: u64| {
        Capsa::sandbox()
            .fast_start(false)
            .memory_mb(mib)
            .accel(capsa::Accel::Tcg)
            .bundle(bundle.clone())
    };
    let scratch = tempfile::tempdir()?;

    // A snapshot of the spec under test, taken from a freshly booted sandbox.
    let snap = {
        let sb = builder(256).build().await?;
        sb.snapshot(scratch.path().join("s256")).await?
    };

    // Cold and restore, interleaved so that both see the same host load.
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        let sb = builder(256).build().await?;
        first_exec(&sb).await?;
        cold.push(t.elapsed().as_secs_f64());
        drop(sb);
        let t = Instant::now();
        let sb = Capsa::restore(snap.path()).build().await?;
        first_exec(&sb).await?;
        warm.push(t.elapsed().as_secs_f64());
        drop(sb);
    }
    let (mc, mw) = (common::median(cold), common::median(warm));
    println!(
        "start-to-first-exec, 256 MiB, median of {runs}: cold boot {}; restore {}; restore/cold = 1/{:.1}",
        ms(mc),
        ms(mw),
        mc / mw
    );

    // Pool: acquire from a full pool, then the first exec.
    let pool = Capsa::pool(builder(256))
        .size(2)
        .from_snapshot(snap.path())
        .build()
        .await?;
    let mut acq = Vec::new();
    let mut handover = Vec::new();
    for _ in 0..runs {
        pool.wait_ready(2).await?;
        let t = Instant::now();
        let sb = pool.acquire().await?;
        handover.push(t.elapsed().as_secs_f64());
        first_exec(&sb).await?;
        acq.push(t.elapsed().as_secs_f64());
        drop(sb);
    }
    println!(
        "pool (size 2), median of {runs}: acquire {:.2} ms; acquire-to-first-exec {}",
        common::median(handover) * 1e3,
        ms(common::median(acq))
    );
    drop(pool);

    // Save time and size per guest size, plus a restore of each.
    for mib in [256u64, 1024] {
        let sb = builder(mib).build().await?;
        let mut save = Vec::new();
        let mut last = None;
        for i in 0..3 {
            let t = Instant::now();
            let s = sb
                .snapshot(scratch.path().join(format!("m{mib}-{i}")))
                .await?;
            save.push(t.elapsed().as_secs_f64());
            last = Some(s);
        }
        let s = last.expect("three snapshots");
        let ram = std::fs::metadata(s.path().join("ram.bin"))?.len();
        let state = std::fs::metadata(s.path().join("state.bin"))?.len();
        let mut restore = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            let c = Capsa::restore(s.path()).build().await?;
            first_exec(&c).await?;
            restore.push(t.elapsed().as_secs_f64());
        }
        println!(
            "{mib} MiB guest, median of 3: save {} (sandbox keeps running); on disk {:.1} MiB (RAM file {} MiB apparent, device state {} KiB); restore-to-first-exec {}",
            ms(common::median(save)),
            s.size_on_disk() as f64 / (1 << 20) as f64,
            ram >> 20,
            state >> 10,
            ms(common::median(restore)),
        );
    }
    Ok(())
}
