//! `capsa screen view` in a real headless Chromium, on a real VM: the guest
//! draws a pattern into its framebuffer and the page's canvas shows it; with
//! --input a click in the page reaches the guest's evdev devices, and in a
//! view-only session even a page forced to send input gets nothing through
//! (the host drops it); the page and the WebSocket refuse anyone without the
//! one-time token's cookie. Chromium is driven over the DevTools protocol on
//! a pipe (`--remote-debugging-pipe`), so no node and no extra port.
//!
//! Also measures the viewer's connect time (navigation start to the first
//! framebuffer drawn), printed as `viewer connect ms`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::Daemon;
use serde_json::{json, Value};

const W: u32 = 1280;
const H: u32 = 800;

fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("chromium"))
        .find(|p| p.is_file())
}

/// Headless Chromium driven over its DevTools pipe (fd 3 in, fd 4 out,
/// NUL-terminated JSON), attached to one page.
struct Browser {
    child: Child,
    to: std::fs::File,
    from: mpsc::Receiver<Value>,
    next: u64,
    session: String,
    _dir: tempfile::TempDir,
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid 2-int array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 returned two fresh fds we now own.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

impl Browser {
    fn start(exe: &std::path::Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (cmd_r, cmd_w) = pipe();
        let (out_r, out_w) = pipe();
        let (cr, ow) = (cmd_r.as_raw_fd(), out_w.as_raw_fd());
        let mut c = Command::new(exe);
        c.args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--remote-debugging-pipe",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-domain-reliability",
            "--disable-client-side-phishing-detection",
            "--no-pings",
            "--dns-prefetch-disable",
            // Nothing but loopback is ever resolved.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--window-size=1400,1000",
        ])
        .arg(format!("--user-data-dir={}", dir.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("chromium.log")).unwrap());
        // SAFETY: only async-signal-safe fcntl/dup2 calls between fork and
        // exec. Copies above 3 and 4 first, so neither dup2 clobbers the
        // other's source; dup2 clears close-on-exec on 3 and 4.
        unsafe {
            c.pre_exec(move || {
                let a = libc::fcntl(cr, libc::F_DUPFD_CLOEXEC, 10);
                let b = libc::fcntl(ow, libc::F_DUPFD_CLOEXEC, 10);
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = c.spawn().expect("spawning chromium");
        drop((cmd_r, out_w));
        let (tx, from) = mpsc::channel();
        let mut r = BufReader::new(std::fs::File::from(out_r));
        std::thread::spawn(move || loop {
            let mut msg = Vec::new();
            match r.read_until(0, &mut msg) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    msg.pop();
                    if let Ok(v) = serde_json::from_slice::<Value>(&msg) {
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let mut b = Browser {
            child,
            to: std::fs::File::from(cmd_w),
            from,
            next: 0,
            session: String::new(),
            _dir: dir,
        };
        let t = b.call(None, "Target.createTarget", json!({"url": "about:blank"}));
        let target = t["targetId"].as_str().unwrap().to_string();
        let a = b.call(
            None,
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
        );
        b.session = a["sessionId"].as_str().unwrap().to_string();
        b
    }

    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        if let Err(e) = self.to.write_all(&bytes) {
            let log =
                std::fs::read_to_string(self._dir.path().join("chromium.log")).unwrap_or_default();
            panic!("writing to chromium: {e}\n{log}");
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .from
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("chromium did not answer {method}"));
            if v["id"].as_u64() == Some(id) {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    fn page(&mut self, method: &str, params: Value) -> Value {
        let s = self.session.clone();
        self.call(Some(&s), method, params)
    }

    /// Evaluates `expr` in the page; its value (null on an exception).
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.page(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        r["result"]["value"].clone()
    }

    fn navigate(&mut self, url: &str) {
        let r = self.page("Page.navigate", json!({"url": url}));
        assert!(r.get("errorText").is_none(), "{url}: {r}");
    }

    fn click(&mut self, x: f64, y: f64) {
        for ty in ["mouseMoved", "mousePressed", "mouseReleased"] {
            self.page(
                "Input.dispatchMouseEvent",
                json!({"type": ty, "x": x, "y": y, "button": "left", "buttons": if ty == "mousePressed" {1} else {0}, "clickCount": 1}),
            );
        }
    }

    /// Waits until the canvas shows the guest's pattern; the page's clock
    /// (ms since its navigation started) at that moment.
    fn wait_pattern(&mut self, what: &str) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = Value::Null;
        while Instant::now() < deadline {
            last = self.eval(PROBE);
            if let Some(t) = last["t"].as_f64() {
                let px = |k: &str| -> Vec<u64> {
                    last[k]
                        .as_array()
                        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
                        .unwrap_or_default()
                };
                let near = |p: Vec<u64>, want: u64| {
                    p.len() == 3 && p.iter().all(|c| c.abs_diff(want) <= 8)
                };
                if near(px("left"), 0x80) && near(px("right"), 0xff) {
                    return t;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{what}: the canvas never showed the guest's pattern; last probe: {last}");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The canvas's size and two pixels (left half, right half), with the page's clock.
const PROBE: &str = r#"(() => {
  const c = document.querySelector('#screen canvas');
  if (!c || c.width !== 1280 || c.height !== 800) return null;
  const ctx = c.getContext('2d');
  const a = ctx.getImageData(320, 400, 1, 1).data, b = ctx.getImageData(960, 400, 1, 1).data;
  return { t: performance.now(), left: [a[0], a[1], a[2]], right: [b[0], b[1], b[2]] };
})()"#;

/// Where the canvas's pixel (x, y) is in the page (CSS pixels).
fn canvas_point(b: &mut Browser, x: u32, y: u32) -> (f64, f64) {
    let r = b.eval(
        "(() => { const r = document.querySelector('#screen canvas').getBoundingClientRect(); return [r.left, r.top]; })()",
    );
    (
        r[0].as_f64().unwrap() + f64::from(x) + 0.5,
        r[1].as_f64().unwrap() + f64::from(y) + 0.5,
    )
}

fn connection_state(b: &mut Browser) -> String {
    b.eval("window.capsaViewer.rfb._rfbConnectionState")
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// `capsa screen view` running; its printed URL.
struct Viewer {
    child: Child,
    url: String,
}

impl Viewer {
    fn start(d: &Daemon, host: bool, args: &[&str]) -> Self {
        let mut child = d
            .capsa(host)
            .args(["screen", "view"])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning capsa screen view");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let url = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("capsa screen view prints its URL")
            .trim()
            .to_string();
        assert!(
            url.starts_with("http://127.0.0.1:") && url.contains("/?token="),
            "{url:?}"
        );
        Viewer { child, url }
    }

    fn base(&self) -> &str {
        self.url.split("/?").next().unwrap()
    }

    fn port(&self) -> u16 {
        self.base().rsplit(':').next().unwrap().parse().unwrap()
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One raw HTTP/1.1 request to the viewer (no cookie); its status code.
fn status_of(port: u16, path: &str, extra: &str) -> u16 {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n{extra}\r\n"
    )
    .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    String::from_utf8_lossy(&head[9..12]).parse().unwrap()
}

fn sh(d: &Daemon, script: &str) -> String {
    d.ok_on(false, &["exec", "v", "--", "sh", "-c", script])
}

/// Starts the guest's evdev reader writing to `file`; waits until it is ready.
fn start_reader(d: &Daemon, file: &str) {
    sh(
        d,
        &format!("(/init input-events 100 120000 > {file} 2>&1 &); true"),
    );
    let t = Instant::now();
    while !sh(d, &format!("cat {file} 2>/dev/null; true")).starts_with("ready") {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "input reader not ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[test]
fn screen_view_in_a_real_browser() {
    let Some(exe) = chromium() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium is missing in CI: .ci/run installs it (apt-get install chromium)"
        );
        eprintln!(
            "SKIPPED: chromium is not installed (apt-get install chromium, or scripts/setup.sh)"
        );
        return;
    };
    common::ensure_binaries();
    let d = Daemon::start("cview", &[]);
    d.ok_on(
        false,
        &[
            "create",
            "--name",
            "v",
            "--memory",
            "256M",
            "--display",
            &format!("{W}x{H}"),
        ],
    );
    // Left half grey 0x80, right half white (XRGB8888, 1280 pixels a row).
    sh(
        &d,
        "for v in /sys/class/vtconsole/vtcon*; do grep -q 'frame buffer' $v/name && echo 0 > $v/bind; done; \
         test $(cat /sys/class/graphics/fb0/stride) = 5120; \
         head -c 2560 /dev/zero | tr '\\0' '\\200' > /tmp/g; head -c 2560 /dev/zero | tr '\\0' '\\377' > /tmp/w; \
         cat /tmp/g /tmp/w > /tmp/row; i=0; \
         while [ $i -lt 800 ]; do cat /tmp/row; i=$((i+1)); done > /tmp/fb; cat /tmp/fb > /dev/fb0",
    );
    let mut b = Browser::start(&exe);

    // View-only, through capsad (the daemon enforces it).
    let v = Viewer::start(&d, true, &["v"]);
    let port = v.port();
    // Nothing without the token.
    assert_eq!(status_of(port, "/", ""), 403);
    assert_eq!(status_of(port, "/assets/viewer.js", ""), 403);
    assert_eq!(status_of(port, "/?token=00", ""), 403);
    b.navigate(&v.url);
    let first = b.wait_pattern("view-only");
    assert_eq!(
        b.eval("location.href").as_str(),
        Some(&*format!("{}/", v.base())),
        "the token left the address bar"
    );
    assert_eq!(
        b.eval("document.body.dataset.viewOnly").as_str(),
        Some("true")
    );
    // The used link is refused now, and so is a WebSocket without the cookie.
    let token_path = &v.url[v.base().len()..];
    assert_eq!(
        status_of(port, token_path, ""),
        403,
        "a used link must not work again"
    );
    let ws = format!(
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: {}\r\n",
        v.base()
    );
    assert_eq!(status_of(port, "/vnc", &ws), 403);
    // Connect time: the first load (redirect included), then reloads.
    let mut times = vec![first];
    for _ in 0..4 {
        b.navigate(&format!("{}/", v.base()));
        times.push(b.wait_pattern("reload"));
    }
    let all = times.clone();
    eprintln!(
        "viewer connect ms (navigation start to the first framebuffer drawn, {W}x{H}): {all:?}, median {:.0}",
        median(&mut times)
    );

    // Even a page that sends input gets none through a view-only session.
    start_reader(&d, "/tmp/ev0");
    assert_eq!(connection_state(&mut b), "connected");
    b.eval("window.capsaViewer.rfb.viewOnly = false; true");
    let (x, y) = canvas_point(&mut b, 200, 300);
    b.click(x, y);
    b.eval("window.capsaViewer.rfb.sendKey(0x61, 'KeyA'); true");
    std::thread::sleep(Duration::from_millis(1500));
    let ev = sh(&d, "cat /tmp/ev0");
    assert!(
        !ev.contains("EV "),
        "a view-only session let input through:\n{ev}"
    );
    assert_eq!(
        connection_state(&mut b),
        "connected",
        "dropping input keeps the view"
    );
    drop(v);

    // With --input, directly (this process's service enforces nothing): a
    // click reaches the guest's tablet where it was made.
    let v = Viewer::start(&d, false, &["v", "--input"]);
    b.navigate(&v.url);
    b.wait_pattern("input");
    assert_eq!(
        b.eval("document.body.dataset.viewOnly").as_str(),
        Some("false")
    );
    assert_eq!(
        b.eval("document.getElementById('status').textContent")
            .as_str(),
        Some("connected")
    );
    // To look at the page: CAPSA_VIEWER_SHOT=/tmp/viewer.png.
    if let Some(path) = std::env::var_os("CAPSA_VIEWER_SHOT") {
        use base64::Engine as _;
        let shot = b.page("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }
    start_reader(&d, "/tmp/ev1");
    let (x, y) = canvas_point(&mut b, 200, 300);
    b.click(x, y);
    let t = Instant::now();
    let ev = loop {
        let ev = sh(&d, "cat /tmp/ev1");
        if ev.contains("EV 1 272 0") || t.elapsed() > Duration::from_secs(30) {
            break ev;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let buttons: Vec<&str> = ev.lines().filter(|l| l.starts_with("EV 1 272 ")).collect();
    assert_eq!(buttons, ["EV 1 272 1", "EV 1 272 0"], "{ev}");
    // The tablet's last x and y: pixel 200,300 of 1280x800 on 0..32767.
    let last_abs = |code: &str| -> i64 {
        ev.lines()
            .rev()
            .filter_map(|l| l.strip_prefix(&format!("EV 3 {code} ")))
            .find_map(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no ABS {code} event:\n{ev}"))
    };
    let (ax, ay) = (last_abs("0"), last_abs("1"));
    assert!((ax - 200 * 32767 / 1279).abs() <= 64, "x {ax}\n{ev}");
    assert!((ay - 300 * 32767 / 799).abs() <= 64, "y {ay}\n{ev}");
}
