//! The `desktop` image recipe on a real VM: the image is built from apt (offline: only the
//! .deb cache that `scripts/test.sh` provisions can serve mmdebstrap; the image lands in the
//! shared store under `capsa-test-desktop:bookworm`, so later runs reuse it), a sandbox with
//! a 1280x800 display runs `capsa-desktop`, the xterm shows up in the host's screenshots,
//! and text typed from the host runs in it: its output file appears and the screen changes.

mod common;

#[allow(dead_code)]
const FORCE_MONITOR: bool = false;

use std::time::{Duration, Instant};

use capsa::screen::Frame;
use capsa::{Command, Sandbox};

const IMAGE: &str = "capsa-test-desktop:bookworm";
const W: u32 = 1280;
const H: u32 = 800;

fn need(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is missing; fix: run scripts/setup.sh (apt-get install mmdebstrap erofs-utils)"
    );
}

/// Builds the recipe's image without the network (a dead proxy for every HTTP request), or
/// reuses the stored one built from the same inputs.
fn build_image() {
    need("mmdebstrap");
    need("mkfs.erofs");
    // Before anything else runs in this process: mmdebstrap's apt inherits it.
    std::env::set_var("http_proxy", "http://127.0.0.1:9");
    std::env::set_var("https_proxy", "http://127.0.0.1:9");
    let store = capsa_oci::Store::open_default().expect("image store");
    let mut opts = capsa_oci::debian::DebianOptions::new("bookworm", Vec::new()).unwrap();
    opts.recipe = Some(capsa_oci::debian::Recipe::Desktop);
    assert!(
        opts.cache_dir.join("bookworm/lists").is_dir(),
        "no Debian package cache in {}; fix: run scripts/test.sh (it provisions it and this \
         image from the mirror)",
        opts.cache_dir.display()
    );
    let t = Instant::now();
    let built = capsa_oci::debian::build(&store, IMAGE, &opts, &mut |_| {}).unwrap_or_else(|e| {
        panic!("{e}\nfix: run scripts/test.sh once online (it provisions the .deb cache)")
    });
    eprintln!(
        "image {} in {:.1?} (reused: {})",
        built.record.digest,
        t.elapsed(),
        built.cached_image
    );
}

async fn sh(sb: &Sandbox, script: &str, limit: Duration) -> String {
    let out = sb
        .exec(&Command::new("sh").args(["-c", script]).timeout(limit))
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

/// Pixels inside `(x, y, w, h)` that are (near) white: an xterm's background.
fn white_in(f: &Frame, r: (u32, u32, u32, u32)) -> usize {
    let mut n = 0;
    for y in r.1..(r.1 + r.3).min(f.height) {
        for x in r.0..(r.0 + r.2).min(f.width) {
            if f.pixel(x, y).is_some_and(|p| p.iter().all(|&c| c > 0xe0)) {
                n += 1;
            }
        }
    }
    n
}

/// Pixels that differ between two frames: inside `r`, and outside it (with their bounding box).
fn diff(a: &Frame, b: &Frame, r: (u32, u32, u32, u32)) -> (usize, usize, [u32; 4]) {
    let (mut inside, mut outside) = (0, 0);
    let mut bbox = [u32::MAX, u32::MAX, 0, 0];
    for y in 0..a.height {
        for x in 0..a.width {
            if a.pixel(x, y) != b.pixel(x, y) {
                if x >= r.0 && x < r.0 + r.2 && y >= r.1 && y < r.1 + r.3 {
                    inside += 1;
                } else {
                    outside += 1;
                    bbox = [
                        bbox[0].min(x),
                        bbox[1].min(y),
                        bbox[2].max(x),
                        bbox[3].max(y),
                    ];
                }
            }
        }
    }
    (inside, outside, bbox)
}

/// A frame once the screen stopped changing (two equal frames 300 ms apart; at most 20 s).
async fn settled(screen: &capsa::screen::Screen<'_>) -> Frame {
    let t = Instant::now();
    let mut last = screen.frame().await.unwrap();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let f = screen.frame().await.unwrap();
        if f.rgb == last.rgb || t.elapsed() > Duration::from_secs(20) {
            return f;
        }
        last = f;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desktop_image_xterm_takes_typed_commands() {
    tokio::task::spawn_blocking(build_image).await.unwrap();
    let t = Instant::now();
    let sb = common::sandbox()
        .image(IMAGE)
        .memory_mb(1024)
        .display(W, H)
        .build()
        .await
        .expect("desktop sandbox boots");
    eprintln!("booted in {:.1?}", t.elapsed());
    let screen = sb.screen().unwrap();
    let blank = screen.frame().await.unwrap();
    assert_eq!((blank.width, blank.height), (W, H));

    // The image's Env carries DISPLAY, so plain execs find the desktop.
    assert_eq!(
        sh(&sb, "echo $DISPLAY", Duration::from_secs(30))
            .await
            .trim(),
        ":0"
    );
    let t = Instant::now();
    let out = sh(&sb, "capsa-desktop", Duration::from_secs(180)).await;
    eprintln!("{} ({:.1?})", out.trim(), t.elapsed());
    assert!(out.contains("ready"), "{out}");
    // Again: the display answers, nothing else starts.
    let again = sh(&sb, "capsa-desktop", Duration::from_secs(60)).await;
    assert!(again.contains("already running"), "{again}");

    // Where the window manager put the xterm (X's own view of it).
    let geo = sh(
        &sb,
        "xdotool search --onlyvisible --class xterm | head -n 1 | \
         xargs -r xdotool getwindowgeometry --shell",
        Duration::from_secs(30),
    )
    .await;
    let field = |k: &str| -> u32 {
        geo.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {geo:?}"))
    };
    let win = (field("X"), field("Y"), field("WIDTH"), field("HEIGHT"));
    eprintln!("xterm at {win:?}");
    assert!(win.2 >= 100 && win.3 >= 100 && win.0 + win.2 <= W && win.1 + win.3 <= H);

    // The host's screenshots show it: poll until its white background is drawn.
    let t = Instant::now();
    let area = (win.2 * win.3) as usize;
    let shown = loop {
        let f = screen.frame().await.unwrap();
        let white = white_in(&f, win);
        if white * 2 > area {
            break f;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the xterm never appeared on the screen ({white} of {area} pixels white)"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        white_in(&blank, win) * 10 < area,
        "the screen was already white before the desktop started"
    );

    // Focus it with a click from the tablet, then type a command from the keyboard.
    let (cx, cy) = (win.0 + win.2 / 2, win.1 + win.3 / 2);
    screen.click(cx, cy).await.unwrap();
    let before = settled(&screen).await;
    screen
        .type_text("echo typed-by-capsa > /tmp/out\n")
        .await
        .unwrap();
    let t = Instant::now();
    loop {
        let got = sb.read_file("/tmp/out").await.unwrap_or_default();
        if got == b"typed-by-capsa\n" {
            break;
        }
        if t.elapsed() > Duration::from_secs(60) {
            let png = std::env::temp_dir().join("capsa-desktop-test-failed.png");
            if let Ok(s) = screen.screenshot().await {
                let _ = std::fs::write(&png, &s.data);
            }
            let focus = sh(
                &sb,
                "xdotool getwindowfocus getwindowname; ps -e -o pid,stat,cmd | tail -n 12",
                Duration::from_secs(30),
            )
            .await;
            panic!(
                "the typed command did not run in the xterm: /tmp/out = {:?}; focus and \
                 processes: {focus}; screen in {}",
                String::from_utf8_lossy(&got),
                png.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("typed command ran in {:.1?}", t.elapsed());
    // The echoed command line is on the screen now, inside the xterm and nowhere else.
    let t = Instant::now();
    let after = loop {
        let f = screen.frame().await.unwrap();
        let (inside, _, _) = diff(&before, &f, win);
        if inside >= 200 || t.elapsed() > Duration::from_secs(20) {
            break f;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let (inside, outside, bbox) = diff(&before, &after, win);
    eprintln!("pixels changed by typing: {inside} in the xterm, {outside} outside (in {bbox:?})");
    assert!(
        inside >= 200,
        "the typed text did not show: {inside} pixels changed"
    );
    // Outside the xterm only its frame may change (bash sets the title after a command).
    let frame = (
        win.0.saturating_sub(10),
        win.1.saturating_sub(40),
        win.2 + 20,
        win.3 + 50,
    );
    let (_, outside, bbox) = diff(&before, &after, frame);
    assert_eq!(
        outside, 0,
        "typing changed pixels outside the xterm's window (in {bbox:?})"
    );
    drop(shown);
    let _ = sb.kill().await;
}
