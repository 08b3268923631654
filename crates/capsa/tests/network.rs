//! The sandbox network on real VMs, inside a fresh network namespace.
//!
//! Loopback only, by construction: each test first moves its thread into a
//! new network namespace that has nothing but `lo` (`unshare(CLONE_NEWNET)`,
//! so this needs root, as the VM tests do), before any runtime thread,
//! QEMU or server exists; everything started after inherits it. The stack's
//! upstream resolver is a fake DNS server on 127.0.0.1 that records every
//! question (`CAPSA_NET_DNS`), and its dialer is the test dialer, which maps
//! 198.18.0.0/15 onto 127.0.0.1 and refuses the rest (`CAPSA_NET_TEST_DIALER`).

mod common;

#[allow(dead_code)]
const FORCE_MONITOR: bool = false;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsa::{Action, Command, NetRule, NetworkMode, NetworkPolicy, Sandbox};
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{rdata::A, RData, Record, RecordType};

const FAKE_DNS: &str = "127.0.0.1:5353";
const HTTP_PORT: u16 = 8080;
const HOST_PORT: u16 = 9090;

/// Moves this thread into a new network namespace with only `lo`, up.
fn enter_netns() {
    // SAFETY: unshare has no memory preconditions.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        panic!(
            "unshare(CLONE_NEWNET) failed: {} (the network tests need root, so that \
             nothing they send can leave the machine)",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: plain socket/ioctl calls on a zeroed ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        assert!(fd >= 0);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        assert_eq!(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr), 0);
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr), 0);
        libc::close(fd);
        // Nothing but lo here.
        let idx = libc::if_nameindex();
        let mut names = Vec::new();
        let mut p = idx;
        while (*p).if_index != 0 {
            names.push(
                std::ffi::CStr::from_ptr((*p).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            p = p.add(1);
        }
        libc::if_freenameindex(idx);
        assert_eq!(names, ["lo"], "the test namespace must hold only lo");
    }
    std::env::set_var("CAPSA_NET_DNS", FAKE_DNS);
    std::env::set_var("CAPSA_NET_TEST_DIALER", "1");
}

fn run<F: std::future::Future<Output = ()>>(f: F) {
    enter_netns();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f);
}

/// A fake upstream resolver: answers from `zone`, NXDOMAIN otherwise, and
/// records every name it is asked.
async fn fake_dns(zone: HashMap<&'static str, Ipv4Addr>) -> Arc<Mutex<Vec<String>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let sock = tokio::net::UdpSocket::bind(FAKE_DNS).await.unwrap();
    let l = log.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let Some(query) = q.queries().first().cloned() else {
                continue;
            };
            let name = query.name().to_ascii().trim_end_matches('.').to_string();
            l.lock().unwrap().push(name.clone());
            let mut r = Message::new();
            r.set_id(q.id())
                .set_message_type(MessageType::Response)
                .add_query(query.clone());
            match zone.get(name.as_str()) {
                Some(ip) if query.query_type() == RecordType::A => {
                    r.add_answer(Record::from_rdata(
                        query.name().clone(),
                        60,
                        RData::A(A(*ip)),
                    ));
                }
                Some(_) => {}
                None => {
                    r.set_response_code(ResponseCode::NXDomain);
                }
            }
            let _ = sock.send_to(&r.to_vec().unwrap(), from).await;
        }
    });
    log
}

/// An HTTP server on 127.0.0.1:`port` answering `body`; counts connections.
async fn http_server(port: u16, body: &'static str) -> Arc<AtomicUsize> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hits = Arc::new(AtomicUsize::new(0));
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let resp = format!(
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    hits
}

async fn sh(sb: &Sandbox, script: &str) -> (i32, String, Duration) {
    let t = Instant::now();
    let out = sb
        .exec(
            &Command::new("sh")
                .args(["-c", script])
                .timeout(Duration::from_secs(60)),
        )
        .await
        .expect("exec");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code.unwrap_or(-1), text, t.elapsed())
}

/// A minimal TLS 1.2 ClientHello naming `sni` (what the stack inspects).
fn client_hello(sni: &str) -> Vec<u8> {
    let name = sni.as_bytes();
    let mut ext = vec![0x00, 0x00]; // server_name
    let list_len = name.len() + 3;
    ext.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
    ext.extend_from_slice(&(list_len as u16).to_be_bytes());
    ext.push(0); // host_name
    ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
    ext.extend_from_slice(name);
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&[0x00, 0x02, 0x00, 0x2f]); // one cipher suite
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![0x01];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

fn rule(a: Action, s: &str) -> NetRule {
    NetRule::parse(a, s).unwrap()
}

#[test]
fn deny_mode_policy_end_to_end() {
    run(async {
        let queries = fake_dns(HashMap::from([
            ("allowed.test", Ipv4Addr::new(198, 18, 0, 10)),
            ("other.test", Ipv4Addr::new(198, 18, 0, 11)),
            ("rebind.test", Ipv4Addr::new(10, 9, 9, 9)),
            ("tls.test", Ipv4Addr::new(198, 18, 0, 12)),
            ("other.test.tls", Ipv4Addr::new(198, 18, 0, 12)),
        ]))
        .await;
        let web = http_server(HTTP_PORT, "hello").await;
        let tls = sink_server(443).await;
        let tls_alt = sink_server(8443).await;
        let host_svc = http_server(HOST_PORT, "model").await;
        let sb = common::sandbox()
            .memory_mb(256)
            .network_mode(NetworkMode::Deny)
            .allow("allowed.test")
            .unwrap()
            .allow("*.rebind.test")
            .unwrap()
            .allow("rebind.test")
            .unwrap()
            .allow("tls.test:443")
            .unwrap()
            .forward(capsa::PortForward::parse("127.0.0.1:18080:8000").unwrap())
            .build()
            .await
            .expect("sandbox with a network boots");

        // The NIC is configured statically.
        let (_, ip, _) = sh(&sb, "ip -4 addr show eth0; cat /etc/resolv.conf").await;
        assert!(ip.contains("10.0.2.15/24"), "{ip}");
        assert!(ip.contains("nameserver 10.0.2.3"), "{ip}");

        // An allowed domain works end to end (DNS through the fake upstream,
        // TCP through the test dialer to the loopback server).
        let (code, out, _) = sh(
            &sb,
            &format!("wget -q -O - http://allowed.test:{HTTP_PORT}/"),
        )
        .await;
        assert_eq!((code, out.as_str()), (0, "hello"), "allowed GET");
        assert_eq!(web.load(Ordering::SeqCst), 1);
        assert!(queries
            .lock()
            .unwrap()
            .contains(&"allowed.test".to_string()));

        // A denied name gets NXDOMAIN and never reaches the upstream.
        let (code, out, _) = sh(&sb, "nslookup denied.test").await;
        assert_ne!(code, 0, "{out}");
        assert!(
            !queries.lock().unwrap().iter().any(|q| q.contains("denied")),
            "the denied name leaked upstream: {:?}",
            queries.lock().unwrap()
        );

        // An address never resolved is refused, at once (RST), never dialled.
        let dials = web.load(Ordering::SeqCst);
        let (code, out, took) = sh(&sb, &format!("nc 198.18.0.99 {HTTP_PORT} </dev/null")).await;
        assert_ne!(code, 0, "{out}");
        eprintln!(
            "denied connect failed after {} ms (exec round trip)",
            took.as_millis()
        );
        assert!(
            took < Duration::from_secs(3),
            "a denied connect took {took:?}"
        );
        assert_eq!(
            web.load(Ordering::SeqCst),
            dials,
            "a denied flow was dialled"
        );

        // Host header naming a domain the address is not pinned to: refused.
        let (code, out, _) = sh(
            &sb,
            &format!(
                "printf 'GET / HTTP/1.0\\r\\nHost: other.test\\r\\n\\r\\n' | nc 198.18.0.10 {HTTP_PORT}"
            ),
        )
        .await;
        assert!(
            !out.contains("hello"),
            "a spoofed Host got through: {code} {out}"
        );

        // Rebinding: a private answer for a public name is dropped.
        let (_, out, _) = sh(&sb, "nslookup rebind.test 2>&1").await;
        assert!(!out.contains("10.9.9.9"), "{out}");

        // Metadata and the host's loopback are refused...
        let (code, _, _) = sh(&sb, "nc 169.254.169.254 80 </dev/null").await;
        assert_ne!(code, 0);
        let (code, _, _) = sh(&sb, &format!("wget -q -O - http://10.0.2.2:{HOST_PORT}/")).await;
        assert_ne!(code, 0);
        assert_eq!(host_svc.load(Ordering::SeqCst), 0);
        // DNS to another server is refused.
        let (code, _, took) = sh(&sb, "nslookup allowed.test 198.18.0.1").await;
        assert_ne!(code, 0);
        eprintln!("DNS to another server failed after {} ms", took.as_millis());

        // TLS to a port-scoped domain rule: the ClientHello's SNI must name
        // a rule whose pins hold the address; 443 is allowed, 8443 is not.
        let (_, out, _) = sh(&sb, "nslookup tls.test").await;
        assert!(out.contains("198.18.0.12"), "{out}");
        let hello = |sni: &str| {
            Command::new("nc")
                .args(["198.18.0.12", "443"])
                .stdin_bytes(client_hello(sni))
                .timeout(Duration::from_secs(30))
        };
        let out = sb.exec(&hello("tls.test")).await.unwrap();
        let good = tls.load(Ordering::SeqCst);
        assert_eq!(
            good,
            client_hello("tls.test").len(),
            "the ClientHello naming the pinned rule went through: {out:?}"
        );
        let _ = sb.exec(&hello("other.test.tls")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            tls.load(Ordering::SeqCst),
            good,
            "a ClientHello naming another domain (no rule) reached the server"
        );
        let (code, out, took) = sh(&sb, "nc 198.18.0.12 8443 </dev/null").await;
        assert_ne!(code, 0, "port 8443 is outside the rule tls.test:443: {out}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert_eq!(tls_alt.load(Ordering::SeqCst), 0);

        // ...until the policy changes; the next connection follows it.
        let mut p: NetworkPolicy = sb.network_policy().await.unwrap();
        p.rules
            .push(rule(Action::Allow, &format!("host:{HOST_PORT}")));
        p.rules.push(rule(Action::Allow, "198.18.0.99/32"));
        sb.set_network_policy(p).await.unwrap();
        let (code, out, _) = sh(&sb, &format!("wget -q -O - http://10.0.2.2:{HOST_PORT}/")).await;
        assert_eq!((code, out.as_str()), (0, "model"));
        let (code, out, _) = sh(
            &sb,
            &format!("wget -q -O - http://198.18.0.99:{HTTP_PORT}/"),
        )
        .await;
        assert_eq!((code, out.as_str()), (0, "hello"));

        // A host port forwarded into the guest (-p 18080:8000).
        let _server = sb
            .spawn(&Command::new("sh").args(["-c", "echo hi-from-guest | nc -l -p 8000"]))
            .await
            .unwrap();
        let mut got = String::new();
        for _ in 0..50 {
            use tokio::io::AsyncReadExt;
            if let Ok(mut s) = tokio::net::TcpStream::connect("127.0.0.1:18080").await {
                got.clear();
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut got)).await;
                if !got.is_empty() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(got, "hi-from-guest\n");

        // Every decision is in the log, with its reason.
        let log = sb.network_log().await.unwrap();
        let text: Vec<String> = log
            .iter()
            .map(|d| format!("{} {} {} {}", d.kind, d.what, d.allowed, d.reason))
            .collect();
        assert!(
            text.iter().any(|l| l.starts_with("dns denied.test false")),
            "{text:#?}"
        );
        assert!(
            text.iter().any(|l| l.contains("198.18.0.99:8080 false")),
            "{text:#?}"
        );
        assert!(
            text.iter().any(|l| l.contains("169.254.169.254:80 false")),
            "{text:#?}"
        );
        assert!(text.iter().any(|l| l.contains("rebinding")), "{text:#?}");
        assert!(
            text.iter().any(|l| l.contains("198.18.0.12:8443 false")),
            "{text:#?}"
        );

        // Public mode still keeps DNS to capsa's resolver: plain DNS and DNS
        // over TLS to any other server are refused, other traffic passes.
        sb.set_network_policy(NetworkPolicy {
            mode: NetworkMode::Public,
            rules: Vec::new(),
        })
        .await
        .unwrap();
        let (code, out, _) = sh(&sb, "nc 198.18.0.53 853 </dev/null").await;
        assert_ne!(code, 0, "DoT to another server: {out}");
        let (code, _, _) = sh(&sb, "nslookup allowed.test 198.18.0.53").await;
        assert_ne!(code, 0, "DNS to another server");
        let (code, out, _) = sh(
            &sb,
            &format!("wget -q -O - http://198.18.0.99:{HTTP_PORT}/"),
        )
        .await;
        assert_eq!((code, out.as_str()), (0, "hello"), "public mode");
        let log = sb.network_log().await.unwrap();
        assert!(
            log.iter()
                .any(|d| !d.allowed && d.what.contains(":853") && d.reason.contains("853")),
            "{log:#?}"
        );
    });
}

#[test]
fn no_network_means_no_nic() {
    run(async {
        let sb = common::sandbox()
            .memory_mb(256)
            .build()
            .await
            .expect("boots");
        let (_, out, _) = sh(&sb, "ls /sys/class/net").await;
        assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["lo"]);
        let e = sb.network_log().await.unwrap_err();
        assert!(e.to_string().contains("no network"), "{e}");
    });
}

/// Reads what a guest server sends to a connection on 127.0.0.1:`port`
/// (retrying while the guest's listener starts); empty if nothing came.
async fn read_forwarded(port: u16) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = String::new();
    for _ in 0..50 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            got.clear();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut got)).await;
            if !got.is_empty() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    got
}

#[test]
fn pool_member_gets_policy_and_ports_after_acquire() {
    run(async {
        let web = http_server(HTTP_PORT, "hello").await;
        // The pool's snapshot holds a NIC but no host socket: policy and
        // forwards are given to each member after acquire.
        let pool = capsa::Capsa::pool(
            common::sandbox()
                .memory_mb(256)
                .fast_start(false)
                .network_mode(NetworkMode::Deny),
        )
        .size(1)
        .build()
        .await
        .expect("a pool with a network");
        let sb = pool.acquire().await.unwrap();
        let url = format!("http://198.18.0.7:{HTTP_PORT}/");
        let (code, _, _) = sh(&sb, &format!("wget -q -O - {url}")).await;
        assert_ne!(code, 0, "deny mode with no rule");
        assert_eq!(web.load(Ordering::SeqCst), 0);
        sb.set_network_policy(NetworkPolicy {
            mode: NetworkMode::Deny,
            rules: vec![rule(Action::Allow, "198.18.0.0/15")],
        })
        .await
        .unwrap();
        let (code, out, _) = sh(&sb, &format!("wget -q -O - {url}")).await;
        assert_eq!(
            (code, out.as_str()),
            (0, "hello"),
            "the acquired member's policy"
        );

        // A port forwarded at run time, then removed.
        let fwd = capsa::PortForward::parse("18081:8000").unwrap();
        sb.port_add(fwd).await.unwrap();
        assert_eq!(sb.ports().await.unwrap(), vec![fwd]);
        let e = sb.port_add(fwd).await.unwrap_err().to_string();
        assert!(
            e.contains("already forwarded") && e.to_lowercase().contains("fix"),
            "{e}"
        );
        let _server = sb
            .spawn(&Command::new("sh").args(["-c", "echo from-pool-member | nc -l -p 8000"]))
            .await
            .unwrap();
        assert_eq!(read_forwarded(18081).await, "from-pool-member\n");
        let removed = sb.port_remove(Ipv4Addr::LOCALHOST, 18081).await.unwrap();
        assert_eq!(removed, fwd);
        assert!(sb.ports().await.unwrap().is_empty());
        assert!(
            tokio::net::TcpStream::connect("127.0.0.1:18081")
                .await
                .is_err(),
            "the host port is closed once removed"
        );
        assert!(sb.port_remove(Ipv4Addr::LOCALHOST, 18081).await.is_err());
        // A host port something else holds is refused with the fix.
        let _busy = std::net::TcpListener::bind("127.0.0.1:18082").unwrap();
        let e = sb
            .port_add(capsa::PortForward::parse("18082:80").unwrap())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("18082") && e.to_lowercase().contains("fix"),
            "{e}"
        );
        let log = sb.network_log().await.unwrap();
        assert!(
            log.iter()
                .any(|d| d.kind == "forward" && d.reason.contains("added")),
            "{log:#?}"
        );
    });
}

/// Serves, per connection, as many zero bytes as the first line asks for.
async fn sized_blob_server(port: u16) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut s = tokio::io::BufReader::new(s);
                let mut line = String::new();
                if s.read_line(&mut line).await.is_err() {
                    return;
                }
                let mut left: u64 = line.trim().parse().unwrap_or(0).min(64 << 30);
                let chunk = vec![0u8; 64 * 1024];
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    if s.get_mut().write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                }
            });
        }
    });
}

/// Reads and counts everything sent to 127.0.0.1:`port`; closes at EOF.
async fn sink_server(port: u16) -> Arc<AtomicUsize> {
    use tokio::io::AsyncReadExt;
    let got = Arc::new(AtomicUsize::new(0));
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let g = got.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let g = g.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    g.fetch_add(n, Ordering::SeqCst);
                }
            });
        }
    });
    got
}

fn cpu_ms() -> u64 {
    // SAFETY: getrusage fills the struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let ms = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
    ms(ru.ru_utime) + ms(ru.ru_stime)
}

/// CPU milliseconds a process has used (utime + stime, 10 ms ticks).
fn proc_cpu_ms(pid: u32) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = st
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks * 10
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// A QEMU wrapper that swaps capsa's stream netdev for QEMU's own user-mode
/// network (slirp), same NIC, guest, kernel and addresses (slirp's defaults
/// are the addresses capsa gives the guest).
fn slirp_qemu() -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::path::PathBuf::from(format!("/tmp/capsa-slirp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The confined QEMU runs as its own uid: it must be able to run this.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let qemu = dir.join("qemu-system-x86_64");
    std::fs::write(
        &qemu,
        "#!/bin/bash\nargs=()\nfor a in \"$@\"; do\n  case \"$a\" in stream,id=net0,*) a=user,id=net0 ;; esac\n  args+=(\"$a\")\ndone\nexec /usr/bin/qemu-system-x86_64 \"${args[@]}\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
    qemu
}

/// The sandbox network against QEMU's slirp, one backend per run
/// (`CAPSA_BENCH_BACKEND=capsa|slirp`): throughput each way with 1 and 8
/// flows, connect latency over 1,000 connects, host CPU per GiB, idle CPU.
/// The guest side is capsa-init's `net-bench` for both. `scripts/bench-net.sh`
/// runs both backends side by side.
#[test]
#[ignore = "benchmark"]
fn bench_throughput_and_idle() {
    let backend = std::env::var("CAPSA_BENCH_BACKEND").unwrap_or_else(|_| "capsa".into());
    if backend == "slirp" {
        std::env::set_var("CAPSA_QEMU", slirp_qemu());
    }
    run(async {
        let mib: u64 = std::env::var("CAPSA_BENCH_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256);
        let runs: usize = std::env::var("CAPSA_BENCH_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5);
        sized_blob_server(8090).await;
        let sink = sink_server(8091).await;
        let _conn = sink_server(8092).await;
        let sb = common::sandbox()
            .memory_mb(256)
            .allow("host:8090-8092")
            .unwrap()
            .build()
            .await
            .unwrap();
        let qemu = sb.vm().pid().expect("QEMU's pid");
        let bench = |args: String| {
            let sb = &sb;
            async move {
                let out = sb
                    .exec(
                        &Command::new("/init")
                            .args(args.split(' '))
                            .timeout(Duration::from_secs(600)),
                    )
                    .await
                    .expect("exec net-bench");
                let text = String::from_utf8_lossy(&out.stdout).to_string();
                assert!(
                    out.status.success(),
                    "net-bench {args}: {text}{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                text
            }
        };
        let field = |text: &str, key: &str| -> f64 {
            text.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{key}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {text:?}"))
        };
        let (c0, q0) = (cpu_ms(), proc_cpu_ms(qemu));
        let mut moved: u64 = 0;
        let mut lines = Vec::new();
        for flows in [1, 8] {
            let (mut down, mut up) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                let t = bench(format!("net-bench recv 10.0.2.2:8090 {mib} {flows}")).await;
                assert_eq!(
                    field(&t, "bytes") as u64,
                    (mib << 20) / flows * flows,
                    "{t}"
                );
                down.push(mib as f64 / (field(&t, "ms") / 1e3));
                let before = sink.load(Ordering::SeqCst);
                let t = bench(format!("net-bench send 10.0.2.2:8091 {mib} {flows}")).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                assert_eq!(
                    (sink.load(Ordering::SeqCst) - before) as u64,
                    (mib << 20) / flows * flows
                );
                up.push(mib as f64 / (field(&t, "ms") / 1e3));
                moved += 2 * (mib << 20);
            }
            lines.push(format!(
                "{backend}: {flows} flow(s), {mib} MiB each way, median of {runs}: host->guest {:.1} MiB/s, guest->host {:.1} MiB/s",
                median(down),
                median(up)
            ));
        }
        let gib = moved as f64 / (1u64 << 30) as f64;
        lines.push(format!(
            "{backend}: host CPU per GiB moved: capsa's process {:.0} ms + QEMU {:.0} ms",
            (cpu_ms() - c0) as f64 / gib,
            (proc_cpu_ms(qemu) - q0) as f64 / gib
        ));
        let (mut p50, mut p99) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let t = bench("net-bench connect 10.0.2.2:8092 1000".into()).await;
            p50.push(field(&t, "p50_us"));
            p99.push(field(&t, "p99_us"));
        }
        lines.push(format!(
            "{backend}: connect latency over 1,000 connects, median of {runs}: p50 {:.2} ms, p99 {:.2} ms",
            median(p50) / 1e3,
            median(p99) / 1e3
        ));
        let (c0, q0) = (cpu_ms(), proc_cpu_ms(qemu));
        tokio::time::sleep(Duration::from_secs(10)).await;
        lines.push(format!(
            "{backend}: idle 10 s: capsa's process {} ms CPU, QEMU {} ms CPU",
            cpu_ms() - c0,
            proc_cpu_ms(qemu) - q0
        ));
        for l in lines {
            eprintln!("BENCH {l}");
        }
    });
}
