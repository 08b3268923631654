//! Restore and pool benchmarks per kind of sandbox (BENCHMARKS.md, issues 11
//! and 13), side by side in one run: the busybox default, the same with a
//! network (policy `public`), and an image root filesystem. For each:
//! - restore-to-first-exec through the library's fast start (base snapshot);
//! - pool (size 2) acquire-to-first-exec, from a full pool.
//!
//! `cargo run --release -p capsa --example bench_image_pool -- IMAGE [runs]`
//! (IMAGE: a reference in the image store, e.g. one `capsa image build` made;
//! runs default 10). The network variant dials nothing.

#[allow(dead_code)] // the shared helpers include ones this benchmark does not use
mod common;

use std::time::Instant;

use capsa::{Capsa, Command, NetworkMode, Sandbox, SandboxBuilder};

async fn first_exec(sb: &Sandbox) -> anyhow::Result<()> {
    let out = sb.exec(&Command::new("true")).await?;
    anyhow::ensure!(out.status.success(), "true failed: {:?}", out.status);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let image = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: bench_image_pool IMAGE [runs]"))?;
    let runs: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(10);
    let bundle = capsa::default_bundle().await?;
    let base = || {
        Capsa::sandbox()
            .memory_mb(512)
            .accel(capsa::Accel::Tcg)
            .bundle(bundle.clone())
    };
    let variants: Vec<(&str, SandboxBuilder)> = vec![
        ("busybox default", base()),
        (
            "busybox + network (public)",
            base().network_mode(NetworkMode::Public),
        ),
        ("image", base().image(image.clone())),
    ];
    println!("| sandbox | restore-to-first-exec (base snapshot) | pool acquire-to-first-exec |");
    println!("|---|---|---|");
    for (what, builder) in variants {
        // The first build boots cold and saves the base snapshot.
        builder.clone().build().await?.kill().await?;
        let mut restore = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            let sb = builder.clone().build().await?;
            first_exec(&sb).await?;
            restore.push(t.elapsed().as_secs_f64());
            sb.kill().await?;
        }
        let pool = Capsa::pool(builder.clone().fast_start(false))
            .size(2)
            .build()
            .await?;
        let mut acquire = Vec::new();
        for _ in 0..runs {
            pool.wait_ready(2).await?;
            let t = Instant::now();
            let sb = pool.acquire().await?;
            first_exec(&sb).await?;
            acquire.push(t.elapsed().as_secs_f64());
            drop(sb);
        }
        drop(pool);
        println!(
            "| {what} | {:.0} ms | {:.1} ms |",
            common::median(restore) * 1e3,
            common::median(acquire) * 1e3
        );
    }
    Ok(())
}
