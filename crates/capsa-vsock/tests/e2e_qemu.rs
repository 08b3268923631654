//! End to end: the device in this process, real QEMU (TCG) with
//! `vhost-user-vsock-pci`, a real guest kernel and a static C guest program
//! (`tests/guest/vsock_test.c`) in a capsa-image bundle.
//!
//! Needs `qemu-system-x86_64`, `gcc` with a static libc, and whatever
//! capsa-image needs to build a bundle (it caches it). Every wait has a
//! timeout so a hang fails instead of blocking.
//!
//! `e2e_measure` is ignored by default; run it with
//! `cargo test -p capsa-vsock --release --test e2e_qemu -- --ignored --nocapture`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use capsa_image::{BundleOptions, ExtraFile, Progress};
use capsa_vsock::{host_port_path, VsockConfig, VsockDevice};
use sha2::{Digest, Sha256};

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const IO_TIMEOUT: Duration = Duration::from_secs(120);
const GUEST_CID: u64 = 7;
const READY: &str = "vsock-test: listening";

/// The serial console, line by line, with waiting.
#[derive(Default)]
struct Console {
    lines: Mutex<Vec<String>>,
    cv: Condvar,
}

impl Console {
    fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "no console line containing {needle:?} within {timeout:?}; console:\n{}",
                    lines.join("\n")
                );
            }
            lines = self.cv.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    fn dump(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

struct Vm {
    qmp: PathBuf,
    _dir: tempfile::TempDir,
    device: Option<VsockDevice>,
    qemu: Child,
    console: Arc<Console>,
    uds: PathBuf,
    host_listener: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
    }
}

fn build_guest_program(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/vsock_test.c");
    let out = dir.join("vsock-test");
    let st = Command::new("gcc")
        .args(["-static", "-O2", "-Wall", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("gcc must be installed (apt-get install gcc libc6-dev)");
    assert!(st.success(), "building the guest program failed");
    out
}

fn boot() -> Vm {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let prog = build_guest_program(dir.path());
    let bundle = capsa_image::build(
        &BundleOptions {
            extra_files: vec![ExtraFile::new(&prog, "/bin/vsock-test", 0o755)],
            ..Default::default()
        },
        &Progress::new(),
    )
    .expect("building the guest bundle");

    let vhost = dir.path().join("vhost.sock");
    let uds = dir.path().join("v.sock");
    let mut config = VsockConfig::new(&vhost, &uds);
    config.guest_cid = GUEST_CID;
    // Everything below runs with the device's threads under its seccomp
    // filter, as capsa runs it: any syscall missing from the list shows up
    // as a blocked call (checked at the end of each test).
    config.seccomp = true;
    let device = VsockDevice::spawn(config.clone()).expect("device");

    // Guest -> host: the guest dials CID 2 port 6000 at start.
    let l = UnixListener::bind(host_port_path(&config, 6000)).unwrap();
    let host_listener = std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            let mut line = String::new();
            let _ = BufReader::new(s.try_clone().unwrap()).read_line(&mut line);
            let _ = s.write_all(format!("hello-from-host:{}", line).as_bytes());
        }
    });

    let qmp = dir.path().join("qmp.sock");
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-M", "q35,memory-backend=mem", "-accel", "tcg", "-m", "256"])
        .args(["-smp", "1", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-serial", "stdio", "-no-reboot"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .arg("-chardev")
        .arg(format!("socket,id=vsock0,path={}", vhost.display()))
        .args(["-device", "vhost-user-vsock-pci,chardev=vsock0"])
        .arg("-kernel")
        .arg(&bundle.kernel)
        .arg("-initrd")
        .arg(&bundle.initrd)
        .args([
            "-append",
            "console=ttyS0 quiet panic=-1 capsa.run=/bin/vsock-test",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 must be installed (apt-get install qemu-system-x86)");
    let console = Arc::new(Console::default());
    for pipe in [
        Box::new(qemu.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(qemu.stderr.take().unwrap()),
    ] {
        let console = console.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                console.lines.lock().unwrap().push(line.replace('\r', ""));
                console.cv.notify_all();
            }
        });
    }
    let vm = Vm {
        qmp,
        _dir: dir,
        device: Some(device),
        qemu,
        console,
        uds,
        host_listener: Some(host_listener),
    };
    vm.console.wait_for(READY, BOOT_TIMEOUT);
    vm
}

impl Vm {
    /// Host -> guest through the hybrid socket; `None` if the guest refused.
    fn connect(&self, port: u32) -> Option<UnixStream> {
        let mut s = UnixStream::connect(&self.uds).expect("hybrid socket");
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while line.last() != Some(&b'\n') {
            match s.read(&mut b) {
                Ok(1) => line.push(b[0]),
                _ => return None,
            }
        }
        let line = String::from_utf8(line).unwrap();
        assert!(line.starts_with("OK "), "bad handshake reply {line:?}");
        line.trim_end()[3..].parse::<u32>().expect("OK <port>");
        Some(s)
    }

    /// Runs one QMP command and waits for its return.
    fn qmp(&self, cmd: &str) {
        let s = UnixStream::connect(&self.qmp).expect("QMP socket");
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        let mut line = String::new();
        r.read_line(&mut line).unwrap(); // greeting
        for c in ["qmp_capabilities", cmd] {
            writeln!(w, r#"{{"execute":"{c}"}}"#).unwrap();
            loop {
                line.clear();
                r.read_line(&mut line).unwrap();
                assert!(!line.contains("\"error\""), "QMP {c}: {line}");
                if line.contains("\"return\"") {
                    break;
                }
            }
        }
    }

    fn stats(&self) -> capsa_vsock::VsockStats {
        self.device.as_ref().unwrap().stats()
    }

    fn control(&self, cmd: &str) -> String {
        let mut s = self.connect(5001).expect("control port");
        s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    fn shutdown(mut self) {
        assert!(self.control("quit").contains("bye"));
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(st) = self.qemu.try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "guest did not power off:\n{}",
                self.console.dump()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "qemu: {status}\n{}", self.console.dump());
        let device = self.device.take().unwrap();
        device.shutdown();
        device.join().expect("device thread");
        if let Some(h) = self.host_listener.take() {
            h.join().unwrap();
        }
    }
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `data` on one thread while reading the echo on this one; returns
/// the echoed bytes.
fn echo_roundtrip(s: UnixStream, data: Arc<Vec<u8>>) -> Vec<u8> {
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(&data).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut r = s;
    let mut out = Vec::new();
    r.read_to_end(&mut out).unwrap();
    writer.join().unwrap();
    out
}

#[test]
fn e2e_vsock_through_qemu() {
    let vm = boot();
    let console = vm.console.clone();

    // Configured CID reached the guest through the config space.
    assert_eq!(
        console.wait_for("guest-cid:", IO_TIMEOUT),
        format!("guest-cid: {GUEST_CID}")
    );
    // Guest -> host to <uds>_6000, and a refusal where nothing listens.
    assert_eq!(
        console.wait_for("guest-client:", IO_TIMEOUT),
        "guest-client: hello-from-host:hello-from-guest"
    );
    let refused = console.wait_for("guest-refused:", IO_TIMEOUT);
    assert!(
        refused.contains("reset") || refused.contains("refused"),
        "{refused}"
    );

    // Host -> guest echo round trip.
    let mut s = vm.connect(5000).expect("echo port accepts");
    s.write_all(b"ping\n").unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping\n");
    drop(s);

    // A port nobody listens on: closed without OK.
    assert!(vm.connect(5999).is_none());

    // 16 concurrent connections, each with its own data.
    let handles: Vec<_> = (0..16u64)
        .map(|i| {
            let uds = vm.uds.clone();
            std::thread::spawn(move || {
                let data = Arc::new(pseudo_random(256 * 1024, i + 1));
                let mut s = UnixStream::connect(&uds).unwrap();
                s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                s.write_all(b"CONNECT 5000\n").unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                assert!(line.starts_with("OK "), "{line:?}");
                let out = echo_roundtrip(s, data.clone());
                assert!(out == *data, "connection {i} corrupted");
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }

    // 64 MiB through the echo server with the checksum intact.
    let data = Arc::new(pseudo_random(64 << 20, 42));
    let want = Sha256::digest(&*data);
    let t = Instant::now();
    let out = echo_roundtrip(vm.connect(5000).unwrap(), data.clone());
    let took = t.elapsed();
    assert_eq!(out.len(), data.len());
    assert_eq!(Sha256::digest(&out), want, "64 MiB echo corrupted");
    eprintln!(
        "64 MiB echo (both directions) in {took:?}: {:.1} MiB/s each way",
        64.0 / took.as_secs_f64()
    );

    // VM pause/resume stops and restarts the transport: the device probes
    // its connections, and a live one survives.
    let mut live = vm.connect(5000).unwrap();
    let probes = vm.stats().probes;
    vm.qmp("stop");
    std::thread::sleep(Duration::from_millis(200));
    vm.qmp("cont");
    let deadline = Instant::now() + IO_TIMEOUT;
    while vm.stats().probes == probes {
        assert!(Instant::now() < deadline, "no probe after stop/cont");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    for msg in [&b"after-pause-1"[..], b"after-pause-2"] {
        live.write_all(msg).unwrap();
        let mut buf = vec![0u8; msg.len()];
        live.read_exact(&mut buf).unwrap();
        assert_eq!(buf, msg);
    }
    drop(live);

    // Guest driver reset: an open connection is dropped cleanly, new ones
    // work.
    let mut before = vm.connect(5000).unwrap();
    before.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    before.read_exact(&mut one).unwrap();
    assert!(vm.control("reset").contains("resetting"));
    console.wait_for("vsock-test: reset done", IO_TIMEOUT);
    before
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut rest = Vec::new();
    let r = before.read_to_end(&mut rest);
    assert!(
        matches!(r, Ok(0)) || r.is_err() && r.unwrap_err().kind() != std::io::ErrorKind::WouldBlock,
        "connection from before the reset was not closed"
    );
    let mut s = vm.connect(5000).expect("echo after reset");
    s.write_all(b"again\n").unwrap();
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"again\n");
    drop(s);

    vm.shutdown();
    assert_eq!(
        capsa_vsock::seccomp::blocked_syscalls(),
        0,
        "the device made a syscall its filter does not allow (see stderr)"
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[test]
#[ignore = "measurement; run explicitly with --ignored --nocapture"]
fn e2e_measure() {
    let vm = boot();
    const RUNS: usize = 5;

    // Round-trip latency: 1-byte ping-pong on an established connection.
    let mut run_medians = Vec::new();
    let mut s = vm.connect(5000).unwrap();
    for _ in 0..RUNS {
        let mut rtts = Vec::new();
        for _ in 0..500 {
            let t = Instant::now();
            s.write_all(b"p").unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).unwrap();
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
        run_medians.push(median(rtts));
    }
    drop(s);
    let lat = median(run_medians.clone());

    // Host -> guest throughput into the sink.
    let size = 64usize << 20;
    let data = Arc::new(vec![0x5au8; size]);
    let mut h2g = Vec::new();
    for _ in 0..RUNS {
        let mut s = vm.connect(5002).unwrap();
        let t = Instant::now();
        s.write_all(&data).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(reply.trim(), size.to_string());
        h2g.push(size as f64 / secs / (1 << 20) as f64);
    }

    // Guest -> host throughput from the source.
    let mut g2h = Vec::new();
    for _ in 0..RUNS {
        let mut s = vm.connect(5003).unwrap();
        let t = Instant::now();
        s.write_all(format!("{size}\n").as_bytes()).unwrap();
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(got, size);
        g2h.push(size as f64 / secs / (1 << 20) as f64);
    }

    println!("vsock under TCG, {RUNS} runs each:");
    println!("  1-byte round trip: median {lat:.0} us (run medians {run_medians:.0?})");
    println!(
        "  host->guest 64 MiB: median {:.1} MiB/s (runs {h2g:.1?})",
        median(h2g.clone())
    );
    println!(
        "  guest->host 64 MiB: median {:.1} MiB/s (runs {g2h:.1?})",
        median(g2h.clone())
    );
    vm.shutdown();
}
