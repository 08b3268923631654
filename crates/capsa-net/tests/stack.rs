//! The stack without a VM: frames written on QEMU's end of the socket pair.
//! Hostile frames never stop it; a denied SYN gets a RST at once; an allowed
//! one is answered only after the upstream accepted; flows are bounded.
//! Loopback only: the test thread enters a fresh network namespace (only
//! `lo`) first; the dialer maps 198.18.0.0/15 onto 127.0.0.1.

use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capsa_core::{Action, NetRule, NetworkMode, NetworkPolicy, GUEST_ADDR, GUEST_GATEWAY};
use capsa_net::{dns::NoResolver, LoopbackDialer, NetConfig};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr,
    TcpSeqNumber,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const GUEST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

fn enter_netns() {
    // SAFETY: plain syscalls on a zeroed ifreq.
    unsafe {
        assert_eq!(
            libc::unshare(libc::CLONE_NEWNET),
            0,
            "needs root: {}",
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
    let devs = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
    assert_eq!(devs.lines().skip(2).count(), 1, "only lo: {devs}");
}

fn run<F: std::future::Future<Output = ()>>(f: F) {
    enter_netns();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f);
}

fn start(policy: NetworkPolicy) -> (capsa_net::NetHandle, UnixStream) {
    let (ours, theirs): (OwnedFd, OwnedFd) = capsa_net::socketpair().unwrap();
    let h = capsa_net::spawn(
        ours,
        NetConfig {
            policy,
            forwards: Vec::new(),
            dialer: Arc::new(LoopbackDialer::default()),
            resolver: Arc::new(NoResolver),
        },
    )
    .unwrap();
    let s = std::os::unix::net::UnixStream::from(theirs);
    s.set_nonblocking(true).unwrap();
    (h, UnixStream::from_std(s).unwrap())
}

async fn send(s: &mut UnixStream, frame: &[u8]) {
    let mut b = (frame.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(frame);
    s.write_all(&b).await.unwrap();
}

/// Reads frames until `want` matches one, or `timeout`.
async fn expect(
    s: &mut UnixStream,
    timeout: Duration,
    mut want: impl FnMut(&[u8]) -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut len = [0u8; 4];
        match tokio::time::timeout_at(deadline, s.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return false,
        }
        let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
        if tokio::time::timeout_at(deadline, s.read_exact(&mut f))
            .await
            .is_err()
        {
            return false;
        }
        if want(&f) {
            return true;
        }
    }
}

fn arp_request() -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: GUEST_MAC,
        source_protocol_addr: GUEST_ADDR,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: GUEST_GATEWAY,
    };
    let mut buf = vec![0u8; 14 + arp.buffer_len()];
    let mut eth = EthernetFrame::new_unchecked(&mut buf);
    EthernetRepr {
        src_addr: GUEST_MAC,
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    }
    .emit(&mut eth);
    arp.emit(&mut ArpPacket::new_unchecked(eth.payload_mut()));
    buf
}

fn is_arp_reply(f: &[u8]) -> bool {
    let Ok(eth) = EthernetFrame::new_checked(f) else {
        return false;
    };
    eth.ethertype() == EthernetProtocol::Arp
        && ArpPacket::new_checked(eth.payload())
            .map(|a| a.operation() == ArpOperation::Reply)
            .unwrap_or(false)
}

fn syn(src_port: u16, dst: Ipv4Addr, dst_port: u16) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port,
        dst_port,
        control: TcpControl::Syn,
        seq_number: TcpSeqNumber(1000),
        ack_number: None,
        window_len: 64240,
        window_scale: None,
        max_seg_size: Some(1460),
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let ip = Ipv4Repr {
        src_addr: GUEST_ADDR,
        dst_addr: dst,
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let mut buf = vec![0u8; 14 + ip.buffer_len() + tcp.buffer_len()];
    let mut eth = EthernetFrame::new_unchecked(&mut buf);
    EthernetRepr {
        src_addr: GUEST_MAC,
        dst_addr: EthernetAddress(capsa_net::GATEWAY_MAC),
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut eth);
    let caps = ChecksumCapabilities::default();
    let mut ipp = Ipv4Packet::new_unchecked(eth.payload_mut());
    ip.emit(&mut ipp, &caps);
    tcp.emit(
        &mut TcpPacket::new_unchecked(ipp.payload_mut()),
        &IpAddress::Ipv4(GUEST_ADDR),
        &IpAddress::Ipv4(dst),
        &caps,
    );
    buf
}

/// TCP flags of a frame to the guest's `port`: (syn, ack, rst).
fn tcp_flags(f: &[u8], port: u16) -> Option<(bool, bool, bool)> {
    let eth = EthernetFrame::new_checked(f).ok()?;
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    let t = TcpPacket::new_checked(ip.payload()).ok()?;
    (t.dst_port() == port).then(|| (t.syn(), t.ack(), t.rst()))
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn hostile_frames_never_stop_the_stack() {
    run(async {
        let (h, mut q) = start(NetworkPolicy::default());
        let mut rng = Rng(0x5eed);
        let good = syn(40000, Ipv4Addr::new(198, 18, 0, 1), 9);
        for i in 0..3000 {
            let f: Vec<u8> = match i % 3 {
                // Garbage of any length up to the limit.
                0 => (0..(rng.next() % 1600) as usize)
                    .map(|_| rng.next() as u8)
                    .collect(),
                // A valid SYN with random bytes flipped (bad lengths, options, versions).
                1 => {
                    let mut f = good.clone();
                    for _ in 0..4 {
                        let j = (rng.next() as usize) % f.len();
                        f[j] = rng.next() as u8;
                    }
                    f
                }
                // Truncated frames.
                _ => good[..(rng.next() as usize) % good.len()].to_vec(),
            };
            send(&mut q, &f).await;
        }
        // An oversized length prefix is skipped, not buffered.
        let big = vec![0u8; capsa_net::frame::MAX_FRAME + 100];
        send(&mut q, &big).await;
        send(&mut q, &arp_request()).await;
        assert!(
            expect(&mut q, Duration::from_secs(10), is_arp_reply).await,
            "the stack stopped answering after hostile frames"
        );
        drop(h);
    });
}

#[test]
fn denied_syn_gets_rst_at_once_allowed_waits_for_the_upstream() {
    run(async {
        let policy = NetworkPolicy {
            mode: NetworkMode::Deny,
            rules: vec![NetRule::parse(Action::Allow, "198.18.0.0/15:7001").unwrap()],
        };
        let (h, mut q) = start(policy);
        let l = tokio::net::TcpListener::bind("127.0.0.1:7001")
            .await
            .unwrap();
        send(&mut q, &arp_request()).await;
        assert!(expect(&mut q, Duration::from_secs(5), is_arp_reply).await);

        // Denied: RST, measured.
        let t = Instant::now();
        send(&mut q, &syn(41000, Ipv4Addr::new(198, 18, 0, 1), 7002)).await;
        assert!(
            expect(&mut q, Duration::from_secs(5), |f| tcp_flags(f, 41000)
                == Some((false, true, true)))
            .await,
            "no RST for a denied SYN"
        );
        eprintln!("denied SYN -> RST in {:?}", t.elapsed());
        assert!(t.elapsed() < Duration::from_millis(500));

        // Allowed, but the upstream refuses (nothing listens on 7001 after drop): RST too.
        drop(l);
        send(&mut q, &syn(41001, Ipv4Addr::new(198, 18, 0, 1), 7001)).await;
        assert!(
            expect(&mut q, Duration::from_secs(5), |f| tcp_flags(f, 41001)
                == Some((false, true, true)))
            .await,
            "no RST when the upstream refused"
        );
        // Allowed and listening: SYN-ACK.
        let _l = tokio::net::TcpListener::bind("127.0.0.1:7001")
            .await
            .unwrap();
        send(&mut q, &syn(41002, Ipv4Addr::new(198, 18, 0, 1), 7001)).await;
        assert!(
            expect(&mut q, Duration::from_secs(5), |f| tcp_flags(f, 41002)
                == Some((true, true, false)))
            .await,
            "no SYN-ACK for an allowed SYN with a live upstream"
        );
        let log = h.log();
        assert!(
            log.iter()
                .any(|d| !d.allowed && d.reason.contains("upstream failed")),
            "{log:#?}"
        );
    });
}

fn udp(src_port: u16, dst: Ipv4Addr, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    use smoltcp::wire::{UdpPacket, UdpRepr};
    let u = UdpRepr { src_port, dst_port };
    let ip = Ipv4Repr {
        src_addr: GUEST_ADDR,
        dst_addr: dst,
        next_header: IpProtocol::Udp,
        payload_len: u.header_len() + payload.len(),
        hop_limit: 64,
    };
    let mut buf = vec![0u8; 14 + ip.buffer_len() + u.header_len() + payload.len()];
    let mut eth = EthernetFrame::new_unchecked(&mut buf);
    EthernetRepr {
        src_addr: GUEST_MAC,
        dst_addr: EthernetAddress(capsa_net::GATEWAY_MAC),
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut eth);
    let caps = ChecksumCapabilities::default();
    let mut ipp = Ipv4Packet::new_unchecked(eth.payload_mut());
    ip.emit(&mut ipp, &caps);
    u.emit(
        &mut UdpPacket::new_unchecked(ipp.payload_mut()),
        &IpAddress::Ipv4(GUEST_ADDR),
        &IpAddress::Ipv4(dst),
        payload.len(),
        |b| b.copy_from_slice(payload),
        &caps,
    );
    buf
}

#[test]
fn dns_to_another_server_is_unreachable_at_once() {
    run(async {
        let (h, mut q) = start(NetworkPolicy::default());
        send(&mut q, &arp_request()).await;
        assert!(expect(&mut q, Duration::from_secs(5), is_arp_reply).await);
        let t = Instant::now();
        send(
            &mut q,
            &udp(5353, Ipv4Addr::new(198, 18, 0, 1), 53, b"query"),
        )
        .await;
        let icmp_unreachable = |f: &[u8]| {
            EthernetFrame::new_checked(f)
                .ok()
                .and_then(|e| {
                    let ip = Ipv4Packet::new_checked(e.payload()).ok()?;
                    (ip.next_header() == IpProtocol::Icmp).then(|| ip.payload().first() == Some(&3))
                })
                .unwrap_or(false)
        };
        assert!(
            expect(&mut q, Duration::from_secs(5), icmp_unreachable).await,
            "no ICMP unreachable for DNS to another server"
        );
        eprintln!(
            "DNS to another server -> ICMP unreachable in {:?}",
            t.elapsed()
        );
        assert!(h
            .log()
            .iter()
            .any(|d| d.kind == "udp" && !d.allowed && d.reason.contains("capsa's resolver")));
    });
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn flows_are_bounded() {
    run(async {
        let (_h, mut q) = start(NetworkPolicy::default());
        let l = tokio::net::TcpListener::bind("127.0.0.1:7100")
            .await
            .unwrap();
        // Accept everything so the upstream side never backs up.
        tokio::spawn(async move {
            let mut keep = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                keep.push(s);
            }
        });
        send(&mut q, &arp_request()).await;
        assert!(expect(&mut q, Duration::from_secs(5), is_arp_reply).await);
        let before = rss_kib();
        let n = capsa_net::MAX_FLOWS + 50;
        let mut resets = 0;
        let mut acks = 0;
        for i in 0..n {
            send(
                &mut q,
                &syn(10000 + i as u16, Ipv4Addr::new(198, 18, 0, 2), 7100),
            )
            .await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while resets + acks < n && tokio::time::Instant::now() < deadline {
            let mut got = None;
            let ok = expect(&mut q, Duration::from_secs(5), |f| {
                let eth = EthernetFrame::new_checked(f).ok();
                let r = eth.and_then(|e| {
                    let ip = Ipv4Packet::new_checked(e.payload()).ok()?;
                    let t = TcpPacket::new_checked(ip.payload()).ok()?;
                    Some((t.syn(), t.rst()))
                });
                got = r;
                r.is_some()
            })
            .await;
            if !ok {
                break;
            }
            match got {
                Some((true, _)) => acks += 1,
                Some((_, true)) => resets += 1,
                _ => {}
            }
        }
        let grew = rss_kib().saturating_sub(before);
        eprintln!("{acks} flows open, {resets} refused, RSS +{grew} KiB");
        assert_eq!(
            acks,
            capsa_net::MAX_FLOWS,
            "flows beyond the bound were accepted"
        );
        assert_eq!(resets, 50);
        // 64 KiB each way per flow is the ceiling; pages only count once touched.
        assert!(grew < 200 * 1024, "RSS grew by {grew} KiB for {acks} flows");
    });
}
