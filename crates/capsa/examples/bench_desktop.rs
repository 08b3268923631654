//! The desktop image at 1280x800 under TCG, side by side in one VM: screenshots by capsa
//! (QMP screendump + PNG) against `scrot` in the guest, pointer input to pixel by capsa (QMP
//! input) against `xdotool mousemove` in the guest, and a headless chromium screenshot in the
//! guest. Run by `scripts/bench-desktop.sh` (which builds the image and times the host's
//! chromium too):
//! `cargo run --release -p capsa --example bench_desktop -- IMAGE [N]`

use std::time::{Duration, Instant};

use capsa::screen::Frame;
use capsa::{Capsa, Command, Sandbox};

const W: u32 = 1280;
const H: u32 = 800;

fn pct(v: &[Duration], p: usize) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

async fn sh(sb: &Sandbox, script: &str) -> String {
    let out = sb
        .exec(
            &Command::new("sh")
                .args(["-c", script])
                .timeout(Duration::from_secs(600)),
        )
        .await
        .expect("exec");
    assert_eq!(
        out.status.code,
        Some(0),
        "{script}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether any pixel of the 16x24 box at `(x, y)` (where the pointer's arrow is drawn) is
/// not black: the root window is black, so that is the pointer.
fn pointer_at(f: &Frame, x: u32, y: u32) -> bool {
    (y..y + 24).any(|yy| (x..x + 16).any(|xx| f.pixel(xx, yy).is_some_and(|p| p != [0, 0, 0])))
}

/// Polls screendumps until the pointer shows at `(x, y)`; the time since `t0`.
async fn until_pointer(sb: &Sandbox, x: u32, y: u32, t0: Instant) -> Duration {
    let screen = sb.screen().unwrap();
    loop {
        let f = screen.frame().await.unwrap();
        if pointer_at(&f, x, y) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "pointer never moved"
        );
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let image = args.next().unwrap_or_else(|| "desktop:bookworm".into());
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(30);

    let t = Instant::now();
    let sb = Capsa::sandbox()
        .image(&image)
        .memory_mb(2048)
        .display(W, H)
        .build()
        .await
        .expect("boot");
    let boot = t.elapsed();
    let t = Instant::now();
    let started = sh(&sb, "capsa-desktop --no-terminal").await;
    let desktop = t.elapsed();
    eprintln!("{}", started.trim());
    let screen = sb.screen().unwrap();

    // Screenshots: capsa (host) against scrot (guest, timed inside the guest).
    let mut host = Vec::new();
    let mut dump = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let s = screen.screenshot().await.unwrap();
        host.push(t.elapsed());
        assert_eq!((s.width, s.height), (W, H));
        let t = Instant::now();
        screen.frame().await.unwrap();
        dump.push(t.elapsed());
    }
    let out = sh(
        &sb,
        &format!(
            "for i in $(seq {n}); do a=$(date +%s%N); scrot -o /tmp/s.png; b=$(date +%s%N); \
             echo $(( (b - a) / 1000 )); done"
        ),
    )
    .await;
    let scrot: Vec<Duration> = out
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .map(Duration::from_micros)
        .collect();
    let mut scrot_exec = Vec::new();
    for _ in 0..n.min(10) {
        let t = Instant::now();
        sh(&sb, "scrot -o /tmp/s.png").await;
        scrot_exec.push(t.elapsed());
    }
    let mut exec_true = Vec::new();
    for _ in 0..n.min(10) {
        let t = Instant::now();
        sh(&sb, "true").await;
        exec_true.push(t.elapsed());
    }

    // Pointer move to pixel: the pointer alternates between two spots on the black root
    // window; the time from the move to the first screendump that shows it at the target.
    let spots = [(100u32, 100u32), (300u32, 650u32)];
    screen.move_to(spots[0].0, spots[0].1).await.unwrap();
    until_pointer(&sb, spots[0].0, spots[0].1, Instant::now()).await;
    let mut capsa_move = Vec::new();
    let mut xdo_move = Vec::new();
    for i in 0..n {
        let (x, y) = spots[(i + 1) % 2];
        let t0 = Instant::now();
        screen.move_to(x, y).await.unwrap();
        capsa_move.push(until_pointer(&sb, x, y, t0).await);
    }
    for i in 0..n {
        let (x, y) = spots[(i + 1) % 2];
        let t0 = Instant::now();
        sh(&sb, &format!("xdotool mousemove {x} {y}")).await;
        xdo_move.push(until_pointer(&sb, x, y, t0).await);
    }

    // A headless browser screenshot in the guest (three runs; the first is cold).
    let page = "data:text/html,<h1>capsa</h1><p>hello from a headless browser</p>";
    let mut browser = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        sh(
            &sb,
            &format!(
                "cd /tmp && chromium --headless --no-sandbox --disable-gpu \
                 --window-size={W},{H} --screenshot=/tmp/c.png '{page}' >/dev/null 2>&1; \
                 test -s /tmp/c.png && rm /tmp/c.png"
            ),
        )
        .await;
        browser.push(t.elapsed());
    }
    let _ = sb.kill().await;

    println!("| 1280x800 under TCG, {n} samples | p50 | p95 |");
    println!("|---|---|---|");
    let row = |name: &str, v: &[Duration]| {
        println!("| {name} | {} | {} |", ms(pct(v, 50)), ms(pct(v, 95)));
    };
    row("capsa screenshot (QMP screendump + PNG, host)", &host);
    row("capsa screendump only (raw frame, host)", &dump);
    row("scrot in the guest (timed in the guest)", &scrot);
    row("scrot in the guest through `exec` (host)", &scrot_exec);
    row("`exec true` round trip (host)", &exec_true);
    row(
        "pointer move to pixel, capsa (QMP input, host screendumps)",
        &capsa_move,
    );
    row(
        "pointer move to pixel, `exec xdotool mousemove` (host screendumps)",
        &xdo_move,
    );
    println!(
        "| headless chromium screenshot in the guest, 3 runs | {} | cold {} |",
        ms(pct(&browser, 50)),
        ms(browser[0])
    );
    println!(
        "| boot / capsa-desktop (Xorg + udev + openbox) | {} | {} |",
        ms(boot),
        ms(desktop)
    );
}
