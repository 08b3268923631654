//! `Capsa::sandbox().build()` + first exec: the default (restore the spec's
//! base snapshot) against `.fast_start(false)` (boot), interleaved run by
//! run. `cargo run --release -p capsa --example bench_fast_start -- 5`

use std::time::{Duration, Instant};

use capsa::{Capsa, Command};

async fn once(fast: bool) -> Duration {
    let t = Instant::now();
    let sb = Capsa::sandbox()
        .memory_mb(256)
        .fast_start(fast)
        .build()
        .await
        .expect("build");
    sb.exec(&Command::new("true")).await.expect("exec");
    let took = t.elapsed();
    let _ = sb.kill().await;
    took
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    // Make sure the base exists, so every timed default run is a restore.
    once(true).await;
    let (mut fast, mut cold) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        fast.push(once(true).await);
        cold.push(once(false).await);
    }
    println!("build + first exec, median of {runs}:");
    println!("  default (base snapshot restore): {:?}", median(fast));
    println!("  fast_start(false) (cold boot):   {:?}", median(cold));
}
