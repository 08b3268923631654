//! `--network/--allow/--deny`, `capsa network log|show|set` and a network
//! after a base-snapshot restore, through the `capsa` binary, directly and
//! through capsad. Loopback only: the test thread enters a fresh network
//! namespace holding only `lo` before it starts anything (needs root), and
//! the stack's dialer is the test dialer (198.18.0.0/15 -> 127.0.0.1).

mod common;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::Daemon;

fn enter_netns() {
    // SAFETY: plain syscalls; the ifreq is zeroed plain data.
    unsafe {
        assert_eq!(
            libc::unshare(libc::CLONE_NEWNET),
            0,
            "unshare(CLONE_NEWNET): {} (the network tests need root)",
            std::io::Error::last_os_error()
        );
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        assert_eq!(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr), 0);
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr), 0);
        libc::close(fd);
    }
    let names: Vec<String> = std::fs::read_to_string("/proc/thread-self/net/dev")
        .unwrap()
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|s| s.trim().to_string()))
        .collect();
    assert_eq!(names, ["lo"], "the test namespace must hold only lo");
    std::env::set_var("CAPSA_NET_TEST_DIALER", "1");
    // No names are resolved here; a dead port keeps any question on loopback.
    std::env::set_var("CAPSA_NET_DNS", "127.0.0.1:9");
}

/// A one-line HTTP server on 127.0.0.1:`port` (a thread per connection).
fn http_server(port: u16, body: &'static str) -> Arc<AtomicUsize> {
    let hits = Arc::new(AtomicUsize::new(0));
    let l = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let h = hits.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            h.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(
                    s,
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    hits
}

#[test]
fn network_flags_log_and_runtime_policy() {
    enter_netns();
    let web = http_server(8080, "hello");
    let d = Daemon::start("cnet", &[]);

    // `run` with a deny policy, twice: the first boots cold and saves a
    // base snapshot, the second restores it; the network works in both.
    for _ in 0..2 {
        let out = d.ok_on(
            false,
            &[
                "run",
                "--network",
                "deny",
                "--allow",
                "198.18.0.0/15:8080",
                "--",
                "wget",
                "-q",
                "-O",
                "-",
                "http://198.18.0.7:8080/",
            ],
        );
        assert_eq!(out, "hello");
    }
    // --network none: no NIC.
    let out = d.ok_on(
        false,
        &["run", "--network", "none", "--", "ls", "/sys/class/net"],
    );
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["lo"]);
    // Rules with no network are refused with the fix.
    let o = d.run_on(
        false,
        &["run", "--network", "none", "--allow", "a.com", "--", "true"],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("Fix:"));

    // A named sandbox: the host's loopback only through a host rule.
    d.ok_on(
        false,
        &[
            "create",
            "--name",
            "n1",
            "--network",
            "deny",
            "--allow",
            "host:8080",
        ],
    );
    let out = d.ok_on(
        false,
        &[
            "exec",
            "n1",
            "--",
            "wget",
            "-q",
            "-O",
            "-",
            "http://10.0.2.2:8080/",
        ],
    );
    assert_eq!(out, "hello");
    let show = d.ok_on(false, &["network", "show", "n1"]);
    assert!(
        show.contains("mode: deny") && show.contains("allow host:8080"),
        "{show}"
    );
    // Changed at run time: the next connection is refused, and the log says why.
    d.ok_on(
        false,
        &[
            "network",
            "set",
            "n1",
            "--network",
            "deny",
            "--deny",
            "host",
        ],
    );
    let o = d.run_on(
        false,
        &[
            "exec",
            "n1",
            "--",
            "wget",
            "-q",
            "-O",
            "-",
            "http://10.0.2.2:8080/",
        ],
    );
    assert!(!o.status.success());
    let log = d.ok_on(false, &["network", "log", "n1"]);
    assert!(
        log.contains("allow") && log.contains("10.0.2.2:8080"),
        "{log}"
    );
    assert!(log.contains("rule 1 (deny host) denies"), "{log}");
    let json: serde_json::Value =
        serde_json::from_str(&d.ok_on(false, &["network", "log", "n1", "--json"])).unwrap();
    assert!(json.as_array().is_some_and(|a| a.len() >= 3), "{json}");

    // Through capsad: the create request carries the network.
    d.ok_on(
        true,
        &[
            "create",
            "--name",
            "n2",
            "--network",
            "deny",
            "--allow",
            "198.18.0.7",
        ],
    );
    let out = d.ok_on(
        true,
        &[
            "exec",
            "n2",
            "--",
            "wget",
            "-q",
            "-O",
            "-",
            "http://198.18.0.7:8080/",
        ],
    );
    assert_eq!(out, "hello");
    let o = d.run_on(
        true,
        &[
            "exec",
            "n2",
            "--",
            "wget",
            "-q",
            "-O",
            "-",
            "http://198.18.0.8:8080/",
        ],
    );
    assert!(!o.status.success(), "an address no rule allows was reached");
    assert_eq!(web.load(Ordering::SeqCst), 4);

    // The network verbs through capsad: show, log, set (the same service).
    let show = d.ok_on(true, &["network", "show", "n2"]);
    assert!(
        show.contains("mode: deny") && show.contains("198.18.0.7"),
        "{show}"
    );
    let log: serde_json::Value =
        serde_json::from_str(&d.ok_on(true, &["network", "log", "n2", "--json"])).unwrap();
    assert!(
        log.as_array()
            .is_some_and(|a| a.iter().any(|d| d["allowed"] == false)),
        "{log}"
    );
    d.ok_on(
        true,
        &[
            "network",
            "set",
            "n2",
            "--network",
            "deny",
            "--allow",
            "198.18.0.8",
        ],
    );
    let out = d.ok_on(
        true,
        &[
            "exec",
            "n2",
            "--",
            "wget",
            "-q",
            "-O",
            "-",
            "http://198.18.0.8:8080/",
        ],
    );
    assert_eq!(out, "hello", "the next connection follows the new policy");

    // Ports forwarded at run time, both ways: add, ls, reach, rm.
    for (via, name, port) in [(false, "n1", 18091u16), (true, "n2", 18092)] {
        d.ok_on(via, &["port", "add", name, &format!("{port}:8000")]);
        let ls = d.ok_on(via, &["port", "ls", name]);
        assert!(ls.contains(&format!("127.0.0.1:{port}")), "{ls}");
        let o = d.run_on(via, &["port", "add", name, &format!("{port}:8000")]);
        assert!(!o.status.success(), "a duplicate forward was accepted");
        d.ok_on(
            via,
            &[
                "exec",
                name,
                "--",
                "sh",
                "-c",
                "setsid sh -c 'echo fwd-ok | nc -l -p 8000' </dev/null >/dev/null 2>&1 &",
            ],
        );
        let mut got = String::new();
        for _ in 0..50 {
            use std::io::Read;
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
                got.clear();
                let _ = s.read_to_string(&mut got);
                if !got.is_empty() {
                    break;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert_eq!(got, "fwd-ok\n", "via capsad: {via}");
        let inspect: serde_json::Value =
            serde_json::from_str(&d.ok_on(via, &["inspect", name])).unwrap();
        assert_eq!(
            inspect["network"]["ports"][0]["host_port"], port,
            "inspect shows the live forwards: {inspect}"
        );
        assert_eq!(inspect["network"]["policy"]["mode"], "deny", "{inspect}");
        d.ok_on(via, &["port", "rm", name, &port.to_string()]);
        let json: serde_json::Value =
            serde_json::from_str(&d.ok_on(via, &["port", "ls", name, "--json"])).unwrap();
        assert_eq!(json, serde_json::json!([]));
        let o = d.run_on(via, &["port", "rm", name, &port.to_string()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("not forwarded") && err.contains("port ls"),
            "{err}"
        );
    }
}
