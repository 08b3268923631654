//! The screen at 1280x800 under TCG: screenshot latency (p50/p95), sustained
//! screenshots per second, input call latency, idle CPU of a display against
//! none, and the boot cost of the display drivers.
//! `cargo run --release -p capsa --example bench_screen -- 40`
//! (`CAPSA_BENCH_MONITOR=1`: the sandboxes run under `capsa-vmm` monitors).

use std::time::{Duration, Instant};

use capsa::{Capsa, Command, Sandbox, ShotOptions};

fn pct(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

/// QEMU's user+system CPU time in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

async fn idle_cpu(sb: &Sandbox, secs: u64) -> f64 {
    let pid = sb.vm().pid().expect("qemu pid");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let b = cpu_ticks(pid);
    // 100 ticks per second.
    (b - a) as f64 / (secs as f64 * 100.0) * 100.0
}

async fn boot(display: bool) -> (Sandbox, Duration) {
    let t = Instant::now();
    let mut b = Capsa::sandbox().memory_mb(256).fast_start(false);
    if std::env::var_os("CAPSA_BENCH_MONITOR").is_some() {
        // Through the monitor's RPCs, as named sandboxes and capsad are.
        b = b.strategy(capsa::Strategy::Monitor);
    }
    if display {
        b = b.display(1280, 800);
    }
    let sb = b.build().await.expect("build");
    sb.exec(&Command::new("true")).await.expect("exec");
    (sb, t.elapsed())
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let (mut boots_d, mut boots_h) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let (sb, t) = boot(true).await;
        boots_d.push(t);
        let _ = sb.kill().await;
        let (sb, t) = boot(false).await;
        boots_h.push(t);
        let _ = sb.kill().await;
    }
    println!(
        "boot + first exec, median of 3: display {:?}, headless {:?}",
        pct(&mut boots_d, 50),
        pct(&mut boots_h, 50)
    );

    let (sb, _) = boot(true).await;
    // A busy picture: every pixel differs from its neighbours.
    let mut raw = Vec::with_capacity(1280 * 800 * 4);
    for y in 0u32..800 {
        for x in 0u32..1280 {
            raw.extend_from_slice(&[(x ^ y) as u8, y as u8, x as u8, 0]);
        }
    }
    sb.write_file("/tmp/p.raw", &raw).await.unwrap();
    sb.exec(&Command::new("sh").args([
        "-c",
        "for v in /sys/class/vtconsole/vtcon*; do grep -q 'frame buffer' $v/name && echo 0 > $v/bind; done; cat /tmp/p.raw > /dev/fb0",
    ]))
    .await
    .unwrap();
    let screen = sb.screen().unwrap();
    for _ in 0..3 {
        screen.screenshot().await.unwrap();
    }
    for (label, opts) in [
        ("full PNG", ShotOptions::default()),
        (
            "max_width 640",
            ShotOptions {
                max_width: Some(640),
                ..Default::default()
            },
        ),
    ] {
        let mut lat = Vec::with_capacity(n);
        let mut bytes = 0;
        let t = Instant::now();
        for _ in 0..n {
            let s = Instant::now();
            let shot = screen.screenshot_with(&opts).await.unwrap();
            lat.push(s.elapsed());
            bytes = shot.data.len();
        }
        let rate = n as f64 / t.elapsed().as_secs_f64();
        println!(
            "screenshot {label}: p50 {:?} p95 {:?}, {rate:.1}/s sustained, {} KiB",
            pct(&mut lat, 50),
            pct(&mut lat, 95),
            bytes / 1024
        );
    }
    let mut raw_lat = Vec::with_capacity(n);
    for _ in 0..n {
        let s = Instant::now();
        screen.frame().await.unwrap();
        raw_lat.push(s.elapsed());
    }
    println!(
        "screendump + PPM parse only: p50 {:?} p95 {:?}",
        pct(&mut raw_lat, 50),
        pct(&mut raw_lat, 95)
    );
    let mut input = Vec::with_capacity(n);
    for i in 0..n {
        let s = Instant::now();
        screen
            .move_to((i as u32 * 7) % 1280, (i as u32 * 3) % 800)
            .await
            .unwrap();
        input.push(s.elapsed());
    }
    println!(
        "pointer move call: p50 {:?} p95 {:?}",
        pct(&mut input, 50),
        pct(&mut input, 95)
    );
    let d = idle_cpu(&sb, 10).await;
    let _ = sb.kill().await;
    let (h, _) = boot(false).await;
    let hc = idle_cpu(&h, 10).await;
    let _ = h.kill().await;
    println!("idle QEMU CPU over 10 s: display {d:.2}% of a core, headless {hc:.2}%");
}
