//! End to end: build the default bundle from scratch (real Debian kernel via
//! `apt-get download`) into a temporary cache, then boot it under QEMU/TCG.
//!
//! Needs `qemu-system-x86_64`, `busybox-static` and an apt index (Debian or
//! Ubuntu host); every wait has a timeout so a hang fails instead of blocking.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsa_guest::{EXIT_MARKER_PREFIX, READY_MARKER};
use capsa_image::{Bundle, BundleOptions, ExtraFile, KernelFormat, Progress};

const TIMEOUT: Duration = Duration::from_secs(60);

const PROBE: &str = r#"#!/bin/sh
echo "probe-uname=$(uname -r)"
echo "probe-hostname=$(hostname)"
for m in $(cut -d' ' -f1 /proc/modules); do echo "probe-module=$m"; done
for d in /sys/bus/virtio/drivers/*; do echo "probe-driver=${d##*/}"; done
[ -c /dev/null ] && [ -d /proc/self ] && [ -d /sys/kernel ] && echo probe-mounts-ok
ip addr show lo | grep -q 'inet 127.0.0.1' && echo probe-lo-ok
# An orphan that exits must be reaped by PID 1 (no zombie left) ...
(sleep 0.2 &)
sleep 1
echo "probe-zombies=$(cat /proc/[0-9]*/stat 2>/dev/null | grep -c '^[0-9]* ([^)]*) Z')"
# ... and one still running at exit must be stopped by the shutdown.
(sleep 1000 &)
exit 7
"#;

struct Run {
    output: String,
    status: Option<ExitStatus>,
    ready_after: Option<Duration>,
    total: Duration,
}

/// Boots `bundle`, calls `on_ready` (with the QMP socket path) once the ready
/// marker is seen, and waits for QEMU to exit by itself.
fn boot(bundle: &Bundle, append: &str, on_ready: impl FnOnce(&Path) + Send + 'static) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let qmp = dir.path().join("qmp.sock");
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "q35",
            "-accel",
            "tcg",
            "-m",
            "256",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-display", "none", "-serial", "stdio", "-no-reboot"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-kernel")
        .arg(&bundle.kernel)
        .arg("-initrd")
        .arg(&bundle.initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 quiet panic=-1 {append}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 must be installed (apt-get install qemu-system-x86)");
    let output = Arc::new(Mutex::new(String::new()));
    let ready = Arc::new(Mutex::new(None));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = {
        let (output, ready) = (output.clone(), ready.clone());
        std::thread::spawn(move || {
            let mut on_ready = Some(on_ready);
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while let Ok(1) = stdout.read(&mut byte) {
                line.push(byte[0]);
                if byte[0] != b'\n' {
                    continue;
                }
                let text = String::from_utf8_lossy(&line).replace('\r', "");
                output.lock().unwrap().push_str(&text);
                if text.trim_end() == READY_MARKER {
                    *ready.lock().unwrap() = Some(start.elapsed());
                    if let Some(f) = on_ready.take() {
                        f(&qmp);
                    }
                }
                line.clear();
            }
            output
                .lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&line));
        })
    };
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let total = start.elapsed();
    reader.join().unwrap();
    let stderr = err_reader.join().unwrap();
    let mut output = output.lock().unwrap().clone();
    if !stderr.is_empty() {
        output.push_str("\n[qemu stderr]\n");
        output.push_str(&stderr);
    }
    let ready_after = *ready.lock().unwrap();
    Run {
        output,
        status,
        ready_after,
        total,
    }
}

fn values<'a>(output: &'a str, key: &str) -> Vec<&'a str> {
    output
        .lines()
        .filter_map(|l| l.trim().strip_prefix(key))
        .collect()
}

fn assert_clean_poweroff(run: &Run, what: &str) {
    let out = &run.output;
    let status = run
        .status
        .unwrap_or_else(|| panic!("{what}: QEMU did not exit within {TIMEOUT:?}:\n{out}"));
    assert!(
        status.success(),
        "{what}: QEMU exited with {status}:\n{out}"
    );
    assert!(
        !out.contains("Kernel panic"),
        "{what}: kernel panic:\n{out}"
    );
    assert!(
        out.contains("reboot: Power down"),
        "{what}: guest did not power off:\n{out}"
    );
    assert!(
        run.ready_after.is_some(),
        "{what}: no {READY_MARKER:?} line:\n{out}"
    );
}

/// Sends Ctrl-Alt-Del over QMP: the host's graceful stop request.
fn ctrl_alt_del(qmp: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match UnixStream::connect(qmp) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("QMP connect {}: {e}", qmp.display()),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line).unwrap(); // greeting
    for cmd in [
        r#"{"execute":"qmp_capabilities"}"#,
        r#"{"execute":"send-key","arguments":{"keys":[{"type":"qcode","data":"ctrl"},{"type":"qcode","data":"alt"},{"type":"qcode","data":"delete"}]}}"#,
    ] {
        writeln!(writer, "{cmd}").unwrap();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.contains("\"return\"") {
                break;
            }
            assert!(!line.contains("\"error\""), "QMP {cmd}: {line}");
            assert!(!line.is_empty(), "QMP closed during {cmd}");
        }
    }
}

#[test]
fn default_bundle_builds_boots_and_stops() {
    let cache = tempfile::tempdir().unwrap();
    let scripts = tempfile::tempdir().unwrap();
    let probe = scripts.path().join("probe.sh");
    std::fs::write(&probe, PROBE).unwrap();
    let opts = BundleOptions {
        cache_dir: Some(cache.path().to_path_buf()),
        extra_files: vec![ExtraFile::new(&probe, "/usr/local/bin/capsa-probe", 0o755)],
        ..Default::default()
    };

    // From scratch, three builders at once: one builds, all get the same bundle.
    let start = Instant::now();
    let builders: Vec<_> = (0..3)
        .map(|_| {
            let opts = opts.clone();
            std::thread::spawn(move || capsa_image::build(&opts, &Progress::hidden()))
        })
        .collect();
    let bundles: Vec<Bundle> = builders
        .into_iter()
        .map(|t| {
            t.join()
                .unwrap()
                .unwrap_or_else(|e| panic!("build failed: {e}"))
        })
        .collect();
    let scratch = start.elapsed();
    let bundle = bundles[0].clone();
    assert!(
        bundles.iter().all(|b| b.id == bundle.id),
        "concurrent builds disagree"
    );
    let start = Instant::now();
    let again = capsa_image::build(&opts, &Progress::hidden()).unwrap();
    let cached = start.elapsed();
    assert_eq!(again, bundle, "cached build must return the same bundle");
    let listed = capsa_image::list(Some(cache.path())).unwrap();
    assert_eq!(listed, vec![bundle.clone()]);
    eprintln!(
        "bundle {} ({:?}, {} modules, initrd {} bytes): from scratch {scratch:?}, cached {cached:?}",
        bundle.id,
        bundle.kernel_format,
        bundle.modules.len(),
        std::fs::metadata(&bundle.initrd).unwrap().len()
    );
    assert_eq!(
        bundle.kernel_format,
        KernelFormat::PvhElf,
        "Debian kernels have a PVH note"
    );
    for m in [
        "virtio_pci",
        "virtio_blk",
        "vsock",
        "vmw_vsock_virtio_transport",
        "ext4",
        "overlay",
    ] {
        assert!(
            bundle.modules.iter().any(|b| b == m),
            "{m} missing from {:?}",
            bundle.modules
        );
    }

    // Run mode: the probe's output, its exit code, a clean power-off.
    let run = boot(
        &bundle,
        // capsa.display=1: the display drivers (a list of their own, skipped
        // by headless boots) load too, so every module of the bundle is checked.
        "capsa.run=/usr/local/bin/capsa-probe capsa.hostname=probe-vm capsa.display=1",
        |_| {},
    );
    assert_clean_poweroff(&run, "run mode");
    let out = &run.output;
    eprintln!(
        "run mode: ready after {:?}, QEMU exited after {:?}",
        run.ready_after.unwrap(),
        run.total
    );
    assert_eq!(
        values(out, "probe-uname="),
        vec![bundle.kernel_version.as_str()],
        "{out}"
    );
    assert_eq!(values(out, "probe-hostname="), vec!["probe-vm"], "{out}");
    let loaded: Vec<String> = values(out, "probe-module=")
        .iter()
        .map(|m| m.replace('-', "_"))
        .collect();
    for m in &bundle.modules {
        assert!(
            loaded.contains(m),
            "module {m} not loaded; /proc/modules: {loaded:?}\n{out}"
        );
    }
    let drivers = values(out, "probe-driver=");
    for d in [
        "virtio_blk",
        "virtio_net",
        "virtio_console",
        "vmw_vsock_virtio_transport",
    ] {
        assert!(
            drivers.contains(&d),
            "virtio driver {d} not registered: {drivers:?}\n{out}"
        );
    }
    assert!(out.contains("probe-mounts-ok"), "{out}");
    assert!(out.contains("probe-lo-ok"), "{out}");
    assert_eq!(values(out, "probe-zombies="), vec!["0"], "{out}");
    assert!(
        out.lines()
            .any(|l| l.trim() == format!("{EXIT_MARKER_PREFIX}7")),
        "{out}"
    );
    assert!(
        !out.contains("capsa-init: warning"),
        "unexpected warnings:\n{out}"
    );
    assert!(
        !out.contains("capsa-init: error"),
        "unexpected errors:\n{out}"
    );

    // Shell mode: Ctrl-Alt-Del over QMP is a graceful stop, well within the 2 s grace.
    let run = boot(&bundle, "", ctrl_alt_del);
    assert_clean_poweroff(&run, "shell mode + ctrl-alt-del");
    let out = &run.output;
    assert!(out.contains("stop requested (SIGINT"), "{out}");
    assert!(
        !out.contains("still running"),
        "the shell ignored the stop:\n{out}"
    );
    assert!(out.contains(EXIT_MARKER_PREFIX), "{out}");
    eprintln!(
        "shell mode: ready after {:?}, stopped and exited after {:?}",
        run.ready_after.unwrap(),
        run.total
    );

    // A command line capsa-init cannot honour: error on the console, clean power-off, no ready.
    let run = boot(&bundle, "capsa.mode=no-such-mode", |_| {});
    let out = &run.output;
    assert!(
        run.status.is_some_and(|s| s.success()),
        "QEMU did not exit cleanly:\n{out}"
    );
    assert!(
        out.contains("capsa-init: error: unknown capsa.mode"),
        "{out}"
    );
    assert!(
        run.ready_after.is_none() && !out.contains("Kernel panic"),
        "{out}"
    );

    // Removing it empties the list.
    capsa_image::remove(Some(cache.path()), &bundle.id[..6]).unwrap();
    assert!(capsa_image::list(Some(cache.path())).unwrap().is_empty());
    assert!(!PathBuf::from(&bundle.dir).exists());
}
