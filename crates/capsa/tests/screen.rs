//! The guest's screen on real VMs: the busybox guest draws a known pattern
//! into /dev/fb0 and the host's screenshot matches it pixel for pixel (also
//! cropped and downscaled); input sent from the host is read back inside the
//! guest from evdev (`/init input-events`) and must be exactly what was sent.

mod common;

#[allow(dead_code)]
const FORCE_MONITOR: bool = false;

use std::time::{Duration, Instant};

use capsa::screen::{Region, ScrollDirection};
use capsa::{Capsa, Command, ImageFormat, Sandbox, ScreenAction, ShotOptions, Strategy};

/// The test pattern: every pixel differs from its neighbours.
fn pattern(x: u32, y: u32) -> [u8; 3] {
    [
        (x & 0xff) as u8,
        (y & 0xff) as u8,
        (((x >> 8) & 0xf) | (((y >> 8) & 0xf) << 4)) as u8 ^ 0x5a,
    ]
}

async fn sh(sb: &Sandbox, script: &str) -> String {
    let out = sb
        .exec(&Command::new("sh").args(["-c", script]))
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

/// Draws the pattern into /dev/fb0 (XRGB8888, honouring the stride) after
/// unbinding the framebuffer console so its cursor cannot draw over it.
async fn draw_pattern(sb: &Sandbox, w: u32, h: u32) {
    let info = sh(
        sb,
        "cat /sys/class/graphics/fb0/virtual_size /sys/class/graphics/fb0/bits_per_pixel \
         /sys/class/graphics/fb0/stride",
    )
    .await;
    let v: Vec<&str> = info.split_whitespace().collect();
    assert_eq!(
        v[0],
        format!("{w},{h}"),
        "fb0 has the requested size: {info}"
    );
    assert_eq!(v[1], "32", "{info}");
    let stride: usize = v[2].parse().unwrap();
    assert!(stride >= w as usize * 4);
    let mut raw = vec![0u8; stride * h as usize];
    for y in 0..h {
        for x in 0..w {
            let [r, g, b] = pattern(x, y);
            let i = y as usize * stride + x as usize * 4;
            raw[i..i + 4].copy_from_slice(&[b, g, r, 0]);
        }
    }
    sb.write_file("/tmp/pattern.raw", &raw).await.unwrap();
    sh(
        sb,
        "for v in /sys/class/vtconsole/vtcon*; do \
           grep -q 'frame buffer' $v/name && echo 0 > $v/bind; done; \
         cat /tmp/pattern.raw > /dev/fb0",
    )
    .await;
}

fn decode_png(png: &[u8]) -> (u32, u32, Vec<u8>) {
    let dec = png::Decoder::new(std::io::Cursor::new(png));
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    let info = r.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

async fn check_screenshots(sb: &Sandbox, w: u32, h: u32) {
    let screen = sb.screen().unwrap();
    let frame = screen.frame().await.unwrap();
    assert_eq!((frame.width, frame.height), (w, h));
    let mut wrong = 0;
    for y in 0..h {
        for x in 0..w {
            if frame.pixel(x, y) != Some(pattern(x, y)) {
                wrong += 1;
            }
        }
    }
    assert_eq!(wrong, 0, "every pixel of the dump matches the pattern");

    let full = screen.screenshot().await.unwrap();
    assert_eq!((full.width, full.height, full.scale), (w, h, 1.0));
    let (pw, ph, px) = decode_png(&full.data);
    assert_eq!((pw, ph), (w, h));
    assert_eq!(px, frame.rgb, "the PNG holds the same pixels");

    let region = Region {
        x: 101,
        y: 37,
        width: 300,
        height: 120,
    };
    let crop = screen
        .screenshot_with(&ShotOptions {
            region: Some(region),
            ..Default::default()
        })
        .await
        .unwrap();
    let (cw, ch, cpx) = decode_png(&crop.data);
    assert_eq!((cw, ch, crop.x, crop.y), (300, 120, 101, 37));
    for y in 0..ch {
        for x in 0..cw {
            let i = ((y * cw + x) * 3) as usize;
            assert_eq!(&cpx[i..i + 3], &pattern(101 + x, 37 + y), "crop at {x},{y}");
        }
    }

    let small = screen
        .screenshot_with(&ShotOptions {
            max_width: Some(w / 4),
            ..Default::default()
        })
        .await
        .unwrap();
    let (sw, shh, spx) = decode_png(&small.data);
    assert_eq!((sw, shh), (w / 4, h / 4));
    assert!((small.scale - 0.25).abs() < 1e-9);
    for y in 0..shh {
        for x in 0..sw {
            // Each image pixel maps back to the screen pixel at its centre.
            let (ox, oy) = (
                ((2 * x + 1) as f64 / (2.0 * small.scale)) as u32,
                ((2 * y + 1) as f64 / (2.0 * small.scale)) as u32,
            );
            let i = ((y * sw + x) * 3) as usize;
            assert_eq!(&spx[i..i + 3], &pattern(ox, oy), "scaled at {x},{y}");
        }
    }

    // Lossless WebP holds the same pixels; JPEG is the size it says.
    let webp = screen
        .screenshot_with(&ShotOptions {
            format: ImageFormat::Webp,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut dec = image_webp::WebPDecoder::new(std::io::Cursor::new(&webp.data)).unwrap();
    assert_eq!(dec.dimensions(), (w, h));
    let mut wpx = vec![0u8; dec.output_buffer_size().unwrap()];
    dec.read_image(&mut wpx).unwrap();
    assert_eq!(wpx, frame.rgb, "the WebP holds the same pixels");
    let jpeg = screen
        .screenshot_with(&ShotOptions {
            format: ImageFormat::Jpeg,
            quality: Some(90),
            max_width: Some(w / 2),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut dec = jpeg_decoder::Decoder::new(&jpeg.data[..]);
    dec.decode().unwrap();
    let info = dec.info().unwrap();
    assert_eq!(
        (u32::from(info.width), u32::from(info.height)),
        (w / 2, h / 2)
    );
    assert_eq!((jpeg.format, jpeg.width), (ImageFormat::Jpeg, w / 2));
}

/// Runs the guest's evdev reader in the background and returns once its
/// devices are open.
async fn start_reader(sb: &Sandbox) {
    sh(
        sb,
        "rm -f /tmp/ev; (/init input-events 2000 60000 > /tmp/ev 2>&1 &) ; true",
    )
    .await;
    let t = Instant::now();
    loop {
        let ev = sb.read_file("/tmp/ev").await.unwrap_or_default();
        let s = String::from_utf8_lossy(&ev);
        if let Some(line) = s.lines().next() {
            assert!(line.starts_with("ready "), "{s}");
            let n: usize = line[6..].trim().parse().unwrap();
            assert!(n >= 2, "tablet and keyboard are evdev devices: {s}");
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "reader never started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The reader's events (type, code, value) once `want` of them arrived.
async fn events(sb: &Sandbox, want: usize) -> Vec<(u16, u16, i32)> {
    let t = Instant::now();
    loop {
        let ev = sb.read_file("/tmp/ev").await.unwrap();
        let v: Vec<(u16, u16, i32)> = String::from_utf8_lossy(&ev)
            .lines()
            .filter_map(|l| {
                let mut p = l.strip_prefix("EV ")?.split(' ');
                Some((
                    p.next()?.parse().ok()?,
                    p.next()?.parse().ok()?,
                    p.next()?.parse().ok()?,
                ))
            })
            .collect();
        if v.len() >= want || t.elapsed() > Duration::from_secs(30) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const EV_KEY: u16 = 1;
const EV_REL: u16 = 2;
const EV_ABS: u16 = 3;
const BTN_LEFT: u16 = 272;

async fn check_input(sb: &Sandbox, w: u32, h: u32) {
    let screen = sb.screen().unwrap();
    start_reader(sb).await;
    let points = [(0, 0), (w - 1, h - 1), (w / 3, h / 2 + 7)];
    for (x, y) in points {
        screen.click(x, y).await.unwrap();
    }
    let got = events(sb, points.len() * 4).await;
    let mut abs = got.iter().filter(|e| e.0 == EV_ABS);
    let mut pos = (None, None);
    let mut landed = Vec::new();
    // Positions are reported as they change; a click lands where the last
    // X and Y put the pointer.
    for e in &got {
        match *e {
            (EV_ABS, 0, v) => pos.0 = Some(v),
            (EV_ABS, 1, v) => pos.1 = Some(v),
            (EV_KEY, BTN_LEFT, 1) => {
                let (ax, ay) = (pos.0.unwrap() as u64, pos.1.unwrap() as u64);
                landed.push((
                    (ax * w as u64 / 32768) as u32,
                    (ay * h as u64 / 32768) as u32,
                ));
            }
            _ => {}
        }
    }
    assert!(abs.next().is_some());
    assert_eq!(landed, points.to_vec(), "clicks land on the pixel: {got:?}");
    let clicks: Vec<i32> = got
        .iter()
        .filter(|e| e.0 == EV_KEY && e.1 == BTN_LEFT)
        .map(|e| e.2)
        .collect();
    assert_eq!(clicks, [1, 0, 1, 0, 1, 0]);

    // Keys: typed text with shifted characters, then a combination.
    start_reader(sb).await;
    screen.type_text("aB!").await.unwrap();
    screen.key("ctrl+c").await.unwrap();
    screen.scroll(ScrollDirection::Down, 2).await.unwrap();
    let keys = events(sb, 16).await;
    let key_events: Vec<(u16, i32)> = keys
        .iter()
        .filter(|e| e.0 == EV_KEY)
        .map(|e| (e.1, e.2))
        .collect();
    // Linux key codes: A=30, B=48, 1=2, LEFTSHIFT=42, LEFTCTRL=29, C=46.
    assert_eq!(
        key_events,
        [
            (30, 1),
            (30, 0),
            (42, 1),
            (48, 1),
            (48, 0),
            (42, 0),
            (42, 1),
            (2, 1),
            (2, 0),
            (42, 0),
            (29, 1),
            (46, 1),
            (46, 0),
            (29, 0),
        ],
        "{keys:?}"
    );
    let wheel: Vec<i32> = keys
        .iter()
        .filter(|e| e.0 == EV_REL && e.1 == 8)
        .map(|e| e.2)
        .collect();
    assert_eq!(wheel, [-1, -1], "two notches down: {keys:?}");

    // Refused before anything is sent.
    let e = screen.type_text("naïve").await.unwrap_err().to_string();
    assert!(e.contains('ï') && e.contains("Fix"), "{e}");
    let e = screen.click(w, 0).await.unwrap_err().to_string();
    assert!(e.contains("outside"), "{e}");
    let e = screen
        .perform(&[ScreenAction::Key {
            keys: "ctrl+nokey".into(),
        }])
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("nokey"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framebuffer_and_input_on_a_booted_sandbox() {
    let sb = common::sandbox()
        .memory_mb(256)
        .display(640, 480)
        .build()
        .await
        .expect("sandbox with a display boots");
    draw_pattern(&sb, 640, 480).await;
    check_screenshots(&sb, 640, 480).await;
    check_input(&sb, 640, 480).await;
    let _ = sb.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_sandboxes_have_a_working_screen() {
    common::init_tracing();
    let nonce = format!(
        "capsa.test_nonce=screen-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let spec = || {
        Capsa::sandbox()
            .memory_mb(256)
            .display(1280, 800)
            .cmdline_arg(&nonce)
    };
    // The fast start: the second build restores the spec's base snapshot
    // (the display device's state included).
    let base = capsa::base_snapshot::dir_for(&spec())
        .await
        .unwrap()
        .unwrap();
    let first = spec().build().await.expect("first build");
    let sb = spec().build().await.expect("second build");
    assert!(sb.restored(), "the second build restores the base");
    let _ = first.kill().await;
    draw_pattern(&sb, 1280, 800).await;
    check_screenshots(&sb, 1280, 800).await;

    // A snapshot with the pattern on screen, restored under a monitor: the
    // framebuffer comes back as it was, and the screen works through the
    // monitor's RPCs.
    let tmp = tempfile::tempdir().unwrap();
    let snap = sb
        .snapshot(tmp.path().join("snap"))
        .await
        .expect("snapshot");
    let _ = sb.kill().await;
    let _ = std::fs::remove_dir_all(&base);
    let state = tempfile::tempdir().unwrap();
    let clone = Capsa::restore(snap.path())
        .strategy(Strategy::Monitor)
        .state_root(state.path())
        .name("screen-clone")
        .build()
        .await
        .expect("monitor restore");
    assert!(clone.vm().monitor_pid().is_some(), "runs under a monitor");
    check_screenshots(&clone, 1280, 800).await;
    check_vnc(&clone, 1280, 800).await;
    check_input(&clone, 1280, 800).await;
    let _ = clone.kill().await;
}

/// A viewer on the monitor's vnc.sock speaks RFB with QEMU's VNC server and
/// receives the screen: the pattern, pixel for pixel, in a raw update.
async fn check_vnc(sb: &Sandbox, w: u32, h: u32) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let path = sb.vm().state_dir().unwrap().join("vnc.sock");
    let mut s = tokio::time::timeout(Duration::from_secs(20), async {
        let mut s = tokio::net::UnixStream::connect(&path)
            .await
            .expect("vnc.sock");
        let mut version = [0u8; 12];
        s.read_exact(&mut version).await.unwrap();
        assert_eq!(&version, b"RFB 003.008\n");
        s.write_all(b"RFB 003.008\n").await.unwrap();
        let n = s.read_u8().await.unwrap() as usize;
        let mut types = vec![0u8; n];
        s.read_exact(&mut types).await.unwrap();
        assert!(
            types.contains(&1),
            "no authentication on a private socket: {types:?}"
        );
        s.write_u8(1).await.unwrap();
        assert_eq!(s.read_u32().await.unwrap(), 0, "security result");
        s.write_u8(1).await.unwrap(); // shared
        s
    })
    .await
    .expect("RFB handshake in time");
    let (fw, fh) = (s.read_u16().await.unwrap(), s.read_u16().await.unwrap());
    assert_eq!(
        (u32::from(fw), u32::from(fh)),
        (w, h),
        "the viewer sees the display size"
    );
    let mut pf = [0u8; 16];
    s.read_exact(&mut pf).await.unwrap();
    let (bpp, big_endian, true_colour) = (pf[0], pf[2], pf[3]);
    assert_eq!((bpp, big_endian, true_colour), (32, 0, 1), "{pf:?}");
    let (rs, gs, bs) = (pf[10], pf[11], pf[12]);
    let name_len = s.read_u32().await.unwrap() as usize;
    assert!(name_len < 4096);
    let mut name = vec![0u8; name_len];
    s.read_exact(&mut name).await.unwrap();
    // FramebufferUpdateRequest for the top-left 64x32, not incremental.
    s.write_all(&[3, 0, 0, 0, 0, 0, 0, 64, 0, 32])
        .await
        .unwrap();
    let mut got = std::collections::HashMap::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while got.len() < 64 * 32 {
            let ty = s.read_u8().await.unwrap();
            assert_eq!(ty, 0, "a framebuffer update");
            s.read_u8().await.unwrap();
            let rects = s.read_u16().await.unwrap();
            for _ in 0..rects {
                let (x, y, rw, rh) = (
                    s.read_u16().await.unwrap(),
                    s.read_u16().await.unwrap(),
                    s.read_u16().await.unwrap(),
                    s.read_u16().await.unwrap(),
                );
                assert_eq!(s.read_i32().await.unwrap(), 0, "raw encoding");
                let mut data = vec![0u8; rw as usize * rh as usize * 4];
                s.read_exact(&mut data).await.unwrap();
                for (i, px) in data.chunks_exact(4).enumerate() {
                    let v = u32::from_le_bytes([px[0], px[1], px[2], px[3]]);
                    let (px_x, px_y) = (
                        x as u32 + (i % rw as usize) as u32,
                        y as u32 + (i / rw as usize) as u32,
                    );
                    got.insert(
                        (px_x, px_y),
                        [(v >> rs) as u8, (v >> gs) as u8, (v >> bs) as u8],
                    );
                }
            }
        }
    })
    .await
    .expect("a framebuffer update in time");
    for y in 0..32 {
        for x in 0..64 {
            assert_eq!(got.get(&(x, y)), Some(&pattern(x, y)), "VNC pixel {x},{y}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headless_sandbox_refuses_screen_calls() {
    let sb = common::sandbox().memory_mb(256).build().await.unwrap();
    let e = sb.screen().unwrap_err().to_string();
    assert!(e.contains("--display"), "{e}");
    let _ = sb.kill().await;
}
