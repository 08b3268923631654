//! Throw-away probe: can a VM with capsa's vhost-user vsock device be saved
//! and restored under QEMU 7.2 by hot-unplugging the device around the save?

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use capsa_image::{BundleOptions, Progress};
use capsa_vsock::{VsockConfig, VsockDevice};

#[derive(Default)]
struct Console {
    lines: Mutex<Vec<String>>,
    cv: Condvar,
}
impl Console {
    fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.lock().unwrap();
        loop {
            if lines.iter().any(|l| l.contains(needle)) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            lines = self.cv.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }
}

struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
    events: Vec<String>,
}
impl Qmp {
    fn connect(p: &Path) -> Qmp {
        let s = loop {
            match UnixStream::connect(p) {
                Ok(s) => break s,
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut q = Qmp {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
            events: vec![],
        };
        let mut l = String::new();
        q.r.read_line(&mut l).unwrap();
        q.cmd(r#"{"execute":"qmp_capabilities"}"#);
        q
    }
    fn cmd(&mut self, c: &str) -> String {
        self.w.write_all(c.as_bytes()).unwrap();
        self.w.write_all(b"\n").unwrap();
        loop {
            let mut l = String::new();
            self.r.read_line(&mut l).unwrap();
            if l.contains("\"event\"") {
                self.events.push(l);
                continue;
            }
            return l;
        }
    }
    fn wait_event(&mut self, name: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.events.iter().any(|e| e.contains(name)) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            self.w.set_read_timeout(Some(Duration::from_millis(50))).ok();
            let mut l = String::new();
            if self.r.read_line(&mut l).is_ok() && l.contains("\"event\"") {
                self.events.push(l);
            }
        }
    }
    fn wait_migrate(&mut self) -> String {
        loop {
            let r = self.cmd(r#"{"execute":"query-migrate"}"#);
            if r.contains("\"completed\"") || r.contains("\"failed\"") {
                return r;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn qemu(
    b: &capsa_image::Bundle,
    dir: &Path,
    tag: &str,
    vhost: &Path,
    vsock_at_boot: bool,
    incoming: bool,
    mem: u32,
    memfd: Option<i32>,
) -> (Child, Arc<Console>, PathBuf) {
    let qmp = dir.join(format!("qmp-{tag}.sock"));
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "1"])
        .args(["-m", &format!("{mem}M")])
        .args([
            "-object",
            &if shared() {
                format!("memory-backend-file,id=mem,size={mem}M,share=on,mem-path=/dev/fd/3")
            } else {
                format!("memory-backend-memfd,id=mem,size={mem}M,share=on")
            },
            "-machine",
            "memory-backend=mem",
        ])
        .args(["-device", "pcie-root-port,id=rp0,chassis=1"]);
    if vsock_at_boot {
        c.args(["-chardev", &format!("socket,id=vsock0,path={}", vhost.display())])
            .args(["-device", "vhost-user-vsock-pci,chardev=vsock0,bus=rp0,id=vs0"]);
    }
    c.args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .args(["-serial", "stdio"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-kernel")
        .arg(&b.kernel)
        .arg("-initrd")
        .arg(&b.initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet capsa.mode=agent"]);
    if let Some(fd) = memfd {
        use std::os::unix::process::CommandExt;
        unsafe {
            c.pre_exec(move || {
                if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    if incoming {
        if std::env::var("PROBE_FD").is_ok() {
            c.args(["-incoming", "fd:3"]);
            let f = std::fs::File::open(dir.join("state")).unwrap();
            use std::os::fd::IntoRawFd;
            use std::os::unix::process::CommandExt;
            let fd = f.into_raw_fd();
            unsafe {
                c.pre_exec(move || {
                    if libc::dup2(fd, 3) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        } else {
            c.args(["-incoming", "defer"]);
        }
    }
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let console = Arc::new(Console::default());
    for pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let console = console.clone();
        let tag = tag.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                eprintln!("[{tag}] {}", line.trim_end());
                console.lines.lock().unwrap().push(line.replace('\r', ""));
                console.cv.notify_all();
            }
        });
    }
    (child, console, qmp)
}

fn shared() -> bool {
    std::env::var("PROBE_SHARED").is_ok()
}

fn memfd(mem: u32) -> std::fs::File {
    use std::os::fd::FromRawFd;
    let fd = unsafe { libc::memfd_create(c"capsa-ram".as_ptr(), 0) };
    assert!(fd >= 0);
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(u64::from(mem) << 20).unwrap();
    f
}

/// Copies the data of `src` into `dst` (same size), skipping holes and zero pages.
fn sparse_copy(src: &std::fs::File, dst: &std::fs::File, len: u64) -> u64 {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut off: i64 = 0;
    let mut copied = 0;
    while (off as u64) < len {
        let data = unsafe { libc::lseek(src.as_raw_fd(), off, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole };
        let mut pos = data;
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], pos as u64).unwrap();
            for (i, page) in buf[..n].chunks(4096).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    dst.write_all_at(page, pos as u64 + (i * 4096) as u64).unwrap();
                    copied += page.len() as u64;
                }
            }
            pos += n as i64;
        }
        off = end;
    }
    copied
}

fn agent_ok(uds: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(uds) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    if s.write_all(b"CONNECT 1024\n").is_err() {
        return false;
    }
    let mut b = [0u8; 3];
    matches!(s.read_exact(&mut b), Ok(())) && &b == b"OK "
}

fn wait_agent(uds: &Path, timeout: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if agent_ok(uds) {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

fn main() {
    let mem: u32 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let b = capsa_image::build(&BundleOptions::default(), &Progress::new()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let dev1 = VsockDevice::spawn({
        let mut c = VsockConfig::new(d.join("vh1.sock"), d.join("v1.sock"));
        c.guest_cid = 3;
        c
    })
    .unwrap();
    let ram1 = memfd(mem);
    use std::os::fd::AsRawFd;
    let t0 = Instant::now();
    let (mut q1, c1, qmp1) = qemu(&b, d, "src", &d.join("vh1.sock"), true, false, mem, Some(ram1.as_raw_fd()));
    assert!(c1.wait_for("capsa-agent: listening", Duration::from_secs(60)));
    println!("boot to agent listening: {:?}", t0.elapsed());
    println!("agent ok: {}", agent_ok(&d.join("v1.sock")));
    let mut m1 = Qmp::connect(&qmp1);
    let state = d.join("state");
    let r = m1.cmd(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"exec:cat > {}"}}}}"#,
        state.display()
    ));
    println!("migrate with vsock: {}", r.trim());
    let t = Instant::now();
    let r = m1.cmd(r#"{"execute":"device_del","arguments":{"id":"vs0"}}"#);
    println!("device_del: {}", r.trim());
    let ok = m1.wait_event("DEVICE_DELETED", Duration::from_secs(20));
    println!("DEVICE_DELETED {ok} after {:?}", t.elapsed());
    let r = m1.cmd(r#"{"execute":"chardev-remove","arguments":{"id":"vsock0"}}"#);
    println!("chardev-remove: {}", r.trim());
    let t = Instant::now();
    m1.cmd(r#"{"execute":"stop"}"#);
    if shared() {
        let r = m1.cmd(r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"x-ignore-shared","state":true}]}}"#);
        println!("caps: {}", r.trim());
    }
    let r = m1.cmd(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"exec:cat > {}"}}}}"#,
        state.display()
    ));
    println!("migrate: {}", r.trim());
    let r = m1.wait_migrate();
    println!(
        "save: {:?} size {} MiB: {}",
        t.elapsed(),
        std::fs::metadata(&state).map(|m| m.len() >> 20).unwrap_or(0),
        r.trim()
    );
    if shared() {
        let t = Instant::now();
        let out = std::fs::File::create(d.join("ram")).unwrap();
        out.set_len(u64::from(mem) << 20).unwrap();
        let n = sparse_copy(&ram1, &out, u64::from(mem) << 20);
        println!("ram saved: {} MiB in {:?}", n >> 20, t.elapsed());
    }
    // Source resumes with a re-plugged device.
    let t = Instant::now();
    m1.cmd(r#"{"execute":"cont"}"#);
    let r = m1.cmd(&format!(r#"{{"execute":"chardev-add","arguments":{{"id":"vsock0","backend":{{"type":"socket","data":{{"addr":{{"type":"unix","data":{{"path":"{}"}}}},"server":false}}}}}}}}"#, d.join("vh1.sock").display()));
    println!("chardev-add: {}", r.trim());
    let r = m1.cmd(r#"{"execute":"device_add","arguments":{"driver":"vhost-user-vsock-pci","chardev":"vsock0","bus":"rp0","id":"vs0"}}"#);
    println!("device_add: {} ({:?})", r.trim(), t.elapsed());
    println!(
        "source agent back after {:?}",
        wait_agent(&d.join("v1.sock"), Duration::from_secs(30)).map(|x| x + t.elapsed())
    );

    // Restore.
    for i in 0..3 {
        let dev2 = VsockDevice::spawn({
            let mut c = VsockConfig::new(d.join(format!("vh2{i}.sock")), d.join(format!("v2{i}.sock")));
            c.guest_cid = 3;
            c
        })
        .unwrap();
        let t = Instant::now();
        let ram2 = memfd(mem);
        if shared() {
            let f = std::fs::File::open(d.join("ram")).unwrap();
            sparse_copy(&f, &ram2, u64::from(mem) << 20);
            println!("ram restored in {:?}", t.elapsed());
        }
        let (mut q2, _c2, qmp2) = qemu(&b, d, &format!("dst{i}"), &d.join("x"), false, true, mem, Some(ram2.as_raw_fd()));
        let mut m2 = Qmp::connect(&qmp2);
        if shared() {
            m2.cmd(r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"x-ignore-shared","state":true}]}}"#);
        }
        let tq = t.elapsed();
        if std::env::var("PROBE_FD").is_err() {
            let r = m2.cmd(&format!(
                r#"{{"execute":"migrate-incoming","arguments":{{"uri":"exec:cat {}"}}}}"#,
                state.display()
            ));
            assert!(r.contains("return"), "{r}");
        }
        let r = m2.wait_migrate();
        let tl = t.elapsed();
        let st = m2.cmd(r#"{"execute":"query-status"}"#);
        m2.cmd(r#"{"execute":"cont"}"#);
        let r2 = m2.cmd(&format!(r#"{{"execute":"chardev-add","arguments":{{"id":"vsock0","backend":{{"type":"socket","data":{{"addr":{{"type":"unix","data":{{"path":"{}"}}}},"server":false}}}}}}}}"#, d.join(format!("vh2{i}.sock")).display()));
        let r3 = m2.cmd(r#"{"execute":"device_add","arguments":{"driver":"vhost-user-vsock-pci","chardev":"vsock0","bus":"rp0","id":"vs0"}}"#);
        let tp = t.elapsed();
        let a = wait_agent(&d.join(format!("v2{i}.sock")), Duration::from_secs(30));
        println!(
            "restore {i}: qmp up {tq:?}, loaded {tl:?} ({}) status {} ; plugged {tp:?} {} {}; agent {:?} total {:?}",
            r.trim(),
            st.trim(),
            r2.trim(),
            r3.trim(),
            a,
            t.elapsed()
        );
        let _ = q2.kill();
        let _ = q2.wait();
        drop(dev2);
    }
    let _ = q1.kill();
    let _ = q1.wait();
    drop(dev1);
}
