//! The event loop: one tokio task owns the smoltcp interface; QEMU's frames
//! come in through a reader task, leave through a writer task; each guest
//! TCP flow has a task holding its host socket, linked by bounded channels.
//!
//! A guest SYN is held back from smoltcp until the policy allowed it and the
//! upstream answered; only then is a listening socket made for exactly that
//! destination and the SYN fed in, so the guest's handshake completes only
//! for a live upstream. A denied or failed flow's SYN is fed in with no
//! socket to take it, and smoltcp answers RST at once.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use capsa_core::{GUEST_DNS, GUEST_GATEWAY, GUEST_PREFIX};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, IpAddress, IpCidr,
    IpEndpoint, IpListenEndpoint, IpProtocol, Ipv4Packet, TcpPacket, UdpPacket,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};

use crate::dns::{self, Lookup, Parsed, Question};
use crate::policy::{self, NameVerdict, Pins, TcpVerdict};
use crate::sni::{self, Peek};
use crate::Shared;

/// The stack's own MAC address.
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];
/// Most TCP flows (open and being dialled) per sandbox: bounds memory.
pub const MAX_FLOWS: usize = 1024;
/// TCP socket buffers, each way, per flow.
const TCP_BUF: usize = 64 * 1024;
/// Frames queued into smoltcp before the stack drops new ones.
const MAX_RX_QUEUE: usize = 512;
/// Frames smoltcp may queue out in one poll.
const MAX_TX_QUEUE: usize = 1024;
/// DNS questions upstream at once.
const MAX_DNS_INFLIGHT: usize = 64;
/// Chunk size moved between a flow task and the stack.
const CHUNK: usize = 16 * 1024;

/// First local port of the gateway's connections into the guest.
const EPHEMERAL_FIRST: u16 = 49152;

/// Guest-side 4-tuple of a TCP flow.
type FlowKey = (SocketAddrV4, SocketAddrV4);

pub(crate) enum Event {
    Dialed {
        key: FlowKey,
        syn: Vec<u8>,
        inspect: bool,
        result: std::io::Result<TcpStream>,
    },
    Resolved {
        q: Question,
        to: IpEndpoint,
        result: std::io::Result<Lookup>,
    },
    /// A host connection on a forwarded port.
    Inbound {
        stream: TcpStream,
        from: std::net::SocketAddr,
        guest_port: u16,
    },
}

/// Sends host connections on a forwarded port to the stack.
pub(crate) async fn run_forward(
    listener: tokio::net::TcpListener,
    guest_port: u16,
    events: mpsc::Sender<Event>,
) {
    loop {
        let Ok((stream, from)) = listener.accept().await else {
            // EMFILE and the like: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if events
            .send(Event::Inbound {
                stream,
                from,
                guest_port,
            })
            .await
            .is_err()
        {
            return;
        }
    }
}

struct Flow {
    key: FlowKey,
    to_host: Option<mpsc::Sender<Vec<u8>>>,
    from_host: mpsc::Receiver<Vec<u8>>,
    pending_in: Option<(Vec<u8>, usize)>,
    host_eof: bool,
    closing: bool,
    /// First bytes held back until their SNI/Host is checked.
    inspect: Option<Vec<u8>>,
}

struct Dev {
    rx: VecDeque<Vec<u8>>,
    tx: Vec<Vec<u8>>,
    /// QEMU is not keeping up: smoltcp sends nothing (its sockets keep the
    /// data) until the frames already made are handed over. Dropping them
    /// instead costs a retransmission timeout per loss.
    blocked: bool,
}

struct RxT(Vec<u8>);
struct TxT<'a>(&'a mut Vec<Vec<u8>>);

impl smoltcp::phy::RxToken for RxT {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl smoltcp::phy::TxToken for TxT<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut b = vec![0u8; len];
        let r = f(&mut b);
        self.0.push(b);
        r
    }
}

impl Device for Dev {
    type RxToken<'a> = RxT;
    type TxToken<'a> = TxT<'a>;

    fn receive(
        &mut self,
        _: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        if self.blocked || self.tx.len() >= MAX_TX_QUEUE {
            return None;
        }
        let f = self.rx.pop_front()?;
        Some((RxT(f), TxT(&mut self.tx)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        (!self.blocked && self.tx.len() < MAX_TX_QUEUE).then_some(TxT(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c
    }
}

pub(crate) struct Stack {
    iface: Interface,
    dev: Dev,
    sockets: SocketSet<'static>,
    dns: SocketHandle,
    flows: HashMap<SocketHandle, Flow>,
    by_key: HashMap<FlowKey, SocketHandle>,
    dialing: HashMap<FlowKey, ()>,
    shared: Arc<Shared>,
    pins: Pins,
    host_addrs: Vec<Ipv4Addr>,
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
    notify: Arc<Notify>,
    out_tx: mpsc::Sender<Vec<u8>>,
    start: std::time::Instant,
    dns_inflight: usize,
    /// Frames encoded for QEMU that found the output channel full.
    out_pending: Option<Vec<u8>>,
    next_port: u16,
}

impl Stack {
    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.start.elapsed().as_micros() as i64)
    }

    /// A sender of stack events (for port-forward listeners).
    pub(crate) fn events(&self) -> mpsc::Sender<Event> {
        self.events_tx.clone()
    }

    pub(crate) fn new(shared: Arc<Shared>, out_tx: mpsc::Sender<Vec<u8>>) -> Self {
        let mut dev = Dev {
            rx: VecDeque::new(),
            tx: Vec::new(),
            blocked: false,
        };
        let start = std::time::Instant::now();
        let cfg = Config::new(HardwareAddress::Ethernet(EthernetAddress(GATEWAY_MAC)));
        let mut iface = Interface::new(cfg, &mut dev, smoltcp::time::Instant::from_micros(0));
        iface.update_ip_addrs(|a| {
            for ip in [GUEST_GATEWAY, GUEST_DNS] {
                let _ = a.push(IpCidr::new(IpAddress::Ipv4(ip), GUEST_PREFIX));
            }
        });
        // With any_ip, smoltcp takes packets for any address routed through
        // one of its own: every destination is, so it can stand in for all.
        let _ = iface.routes_mut().add_default_ipv4_route(GUEST_GATEWAY);
        iface.set_any_ip(true);
        let mut sockets = SocketSet::new(Vec::new());
        let mut udp = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 32], vec![0; 32 * 1500]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 32], vec![0; 32 * 1500]),
        );
        let _ = udp.bind(IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(GUEST_DNS)),
            port: 53,
        });
        let dns = sockets.add(udp);
        let (events_tx, events_rx) = mpsc::channel(MAX_FLOWS + MAX_DNS_INFLIGHT + 16);
        Self {
            iface,
            dev,
            sockets,
            dns,
            flows: HashMap::new(),
            by_key: HashMap::new(),
            dialing: HashMap::new(),
            shared,
            pins: Pins::default(),
            host_addrs: host_addrs(),
            events_tx,
            events_rx,
            notify: Arc::new(Notify::new()),
            out_tx,
            start,
            dns_inflight: 0,
            out_pending: None,
            next_port: EPHEMERAL_FIRST,
        }
    }

    /// Runs until QEMU closes its end.
    pub(crate) async fn run(mut self, mut frames: mpsc::Receiver<Vec<u8>>) {
        loop {
            self.poll();
            let now = self.now();
            let delay = self
                .iface
                .poll_delay(now, &self.sockets)
                .map(|d| Duration::from_micros(d.total_micros()))
                .unwrap_or(Duration::from_secs(3600));
            let notify = self.notify.clone();
            let out = self.out_tx.clone();
            let blocked = self.out_pending.is_some();
            tokio::select! {
                permit = out.reserve(), if blocked => {
                    let Ok(permit) = permit else { break };
                    if let Some(b) = self.out_pending.take() {
                        permit.send(b);
                    }
                    self.dev.blocked = false;
                }
                f = frames.recv() => {
                    let Some(f) = f else { break };
                    self.on_frame(f);
                    for _ in 0..64 {
                        match frames.try_recv() {
                            Ok(f) => self.on_frame(f),
                            Err(_) => break,
                        }
                    }
                }
                e = self.events_rx.recv() => {
                    if let Some(e) = e {
                        self.on_event(e);
                    }
                }
                _ = notify.notified() => {}
                _ = tokio::time::sleep(delay) => {}
            }
        }
        tracing::debug!("QEMU closed the network stream; stack stops");
    }

    fn feed(&mut self, frame: Vec<u8>) {
        if self.dev.rx.len() < MAX_RX_QUEUE {
            self.dev.rx.push_back(frame);
        }
    }

    /// Polls smoltcp and moves data until nothing moves (bounded).
    fn poll(&mut self) {
        for _ in 0..16 {
            let now = self.now();
            let changed = self.iface.poll(now, &mut self.dev, &mut self.sockets);
            let moved = self.service();
            self.flush();
            if changed == smoltcp::iface::PollResult::None && !moved && self.dev.rx.is_empty() {
                break;
            }
        }
    }

    fn flush(&mut self) {
        if self.dev.tx.is_empty() {
            return;
        }
        let mut buf = self.out_pending.take().unwrap_or_default();
        for f in self.dev.tx.drain(..) {
            crate::frame::encode(&f, &mut buf);
        }
        match self.out_tx.try_send(buf) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(buf)) => {
                // Held (bounded: smoltcp makes no more frames while blocked)
                // until the channel has room; see `Dev::blocked`.
                self.out_pending = Some(buf);
                self.dev.blocked = true;
            }
            // The writer is gone: QEMU closed its end, the stack stops soon.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn on_frame(&mut self, frame: Vec<u8>) {
        let Some((src, dst, proto, l4)) = parse_ipv4(&frame) else {
            // ARP and the like: smoltcp's job. IPv6 is dropped by smoltcp.
            self.feed(frame);
            return;
        };
        match proto {
            IpProtocol::Tcp => {
                let Ok(t) = TcpPacket::new_checked(l4) else {
                    return;
                };
                if !t.syn() || t.ack() {
                    self.feed(frame);
                    return;
                }
                let key = (
                    SocketAddrV4::new(src, t.src_port()),
                    SocketAddrV4::new(dst, t.dst_port()),
                );
                if self.by_key.contains_key(&key) {
                    self.feed(frame);
                } else if self.dialing.contains_key(&key) {
                    // A retransmitted SYN while the upstream is dialled.
                } else {
                    self.on_syn(key, frame);
                }
            }
            IpProtocol::Udp => {
                let Ok(u) = UdpPacket::new_checked(l4) else {
                    return;
                };
                if dst != GUEST_DNS || u.dst_port() != 53 {
                    let what = format!("{dst}:{}", u.dst_port());
                    let reason = if u.dst_port() == 53 || u.dst_port() == 853 {
                        "DNS goes only to capsa's resolver (10.0.2.3)"
                    } else {
                        "UDP is not forwarded (only DNS to capsa's resolver)"
                    };
                    self.shared.log.record("udp", what, false, reason);
                }
                // smoltcp answers port unreachable for anything but the resolver.
                self.feed(frame);
            }
            // Echo to the outside would be answered by smoltcp itself: a
            // fake success. Only the stack's own addresses answer pings.
            IpProtocol::Icmp if dst == GUEST_GATEWAY || dst == GUEST_DNS => self.feed(frame),
            _ => {}
        }
    }

    fn on_syn(&mut self, key: FlowKey, syn: Vec<u8>) {
        let what = key.1.to_string();
        if self.flows.len() + self.dialing.len() >= MAX_FLOWS {
            self.shared.log.record(
                "tcp",
                what,
                false,
                format!("too many flows (at most {MAX_FLOWS})"),
            );
            self.feed(syn);
            return;
        }
        let verdict = {
            let p = self.shared.policy();
            policy::decide_tcp(
                &p,
                &self.pins,
                &self.host_addrs,
                *key.1.ip(),
                key.1.port(),
                std::time::Instant::now(),
            )
        };
        match verdict {
            TcpVerdict::Deny(reason) => {
                self.shared.log.record("tcp", what, false, reason);
                self.feed(syn);
            }
            TcpVerdict::Allow {
                to,
                inspect,
                reason,
            } => {
                self.shared.log.record("tcp", what, true, reason);
                self.dialing.insert(key, ());
                let dialer = self.shared.dialer.clone();
                let tx = self.events_tx.clone();
                tokio::spawn(async move {
                    let result = dialer.dial(to).await;
                    let _ = tx
                        .send(Event::Dialed {
                            key,
                            syn,
                            inspect,
                            result,
                        })
                        .await;
                });
            }
        }
    }

    fn on_event(&mut self, e: Event) {
        match e {
            Event::Dialed {
                key,
                syn,
                inspect,
                result,
            } => {
                self.dialing.remove(&key);
                match result {
                    Err(err) => {
                        self.shared.log.record(
                            "tcp",
                            key.1.to_string(),
                            false,
                            format!("the upstream failed: {err}"),
                        );
                        self.feed(syn);
                    }
                    Ok(stream) => self.accept(key, syn, inspect, stream),
                }
            }
            Event::Inbound {
                stream,
                from,
                guest_port,
            } => self.inbound(stream, from, guest_port),
            Event::Resolved { q, to, result } => {
                self.dns_inflight = self.dns_inflight.saturating_sub(1);
                let reply = match result {
                    Ok(Lookup::NxDomain) => dns::answer(&q, true, &[]),
                    Ok(Lookup::Addrs(addrs)) => {
                        let (keep, drop): (Vec<_>, Vec<_>) = {
                            let p = self.shared.policy();
                            addrs.into_iter().partition(|(ip, _)| {
                                policy::answer_allowed(&p, &self.host_addrs, *ip)
                            })
                        };
                        for (ip, _) in &drop {
                            self.shared.log.record(
                                "dns",
                                q.name.clone(),
                                false,
                                format!("answer {ip} dropped: a private address for a public name (rebinding)"),
                            );
                        }
                        self.pins.pin(&q.name, &keep, std::time::Instant::now());
                        dns::answer(&q, false, &keep)
                    }
                    Err(err) => {
                        self.shared.log.record(
                            "dns",
                            q.name.clone(),
                            false,
                            format!("upstream resolver failed: {err}"),
                        );
                        hickory_proto::op::Message::error_msg(
                            q.id,
                            hickory_proto::op::OpCode::Query,
                            hickory_proto::op::ResponseCode::ServFail,
                        )
                        .to_vec()
                        .ok()
                    }
                };
                if let Some(r) = reply {
                    let s = self.sockets.get_mut::<udp::Socket>(self.dns);
                    let _ = s.send_slice(&r, to);
                }
            }
        }
    }

    /// A host connection to a forwarded port: connect to the guest from the gateway.
    fn inbound(&mut self, stream: TcpStream, from: std::net::SocketAddr, guest_port: u16) {
        let what = format!("{from} -> guest:{guest_port}");
        if self.flows.len() + self.dialing.len() >= MAX_FLOWS {
            self.shared.log.record(
                "inbound",
                what,
                false,
                format!("too many flows (at most {MAX_FLOWS})"),
            );
            return;
        }
        let guest = SocketAddrV4::new(capsa_core::GUEST_ADDR, guest_port);
        let mut local = None;
        for _ in 0..16384 {
            let p = self.next_port;
            self.next_port = if p == u16::MAX {
                EPHEMERAL_FIRST
            } else {
                p + 1
            };
            let k = (SocketAddrV4::new(GUEST_GATEWAY, p), guest);
            if !self.by_key.contains_key(&k) {
                local = Some(k);
                break;
            }
        }
        let Some(key) = local else {
            self.shared
                .log
                .record("inbound", what, false, "no free gateway port");
            return;
        };
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_BUF]),
            tcp::SocketBuffer::new(vec![0; TCP_BUF]),
        );
        s.set_nagle_enabled(false);
        let remote = IpEndpoint::new(IpAddress::Ipv4(*guest.ip()), guest_port);
        let local_ep = IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(GUEST_GATEWAY)),
            port: key.0.port(),
        };
        if let Err(e) = s.connect(self.iface.context(), remote, local_ep) {
            self.shared.log.record(
                "inbound",
                what,
                false,
                format!("cannot connect into the guest: {e}"),
            );
            return;
        }
        self.shared
            .log
            .record("inbound", what, true, "a port forward (-p) names this port");
        let h = self.sockets.add(s);
        self.link(h, key, false, stream);
    }

    /// Ties socket `h` to a host stream through a flow task.
    fn link(&mut self, h: SocketHandle, key: FlowKey, inspect: bool, stream: TcpStream) {
        let (to_host_tx, to_host_rx) = mpsc::channel::<Vec<u8>>(8);
        let (to_guest_tx, to_guest_rx) = mpsc::channel::<Vec<u8>>(4);
        tokio::spawn(run_flow(
            stream,
            to_host_rx,
            to_guest_tx,
            self.notify.clone(),
        ));
        self.by_key.insert(key, h);
        self.flows.insert(
            h,
            Flow {
                key,
                to_host: Some(to_host_tx),
                from_host: to_guest_rx,
                pending_in: None,
                host_eof: false,
                closing: false,
                inspect: inspect.then(Vec::new),
            },
        );
    }

    /// The upstream is connected: make a socket for exactly this flow and
    /// let smoltcp answer the SYN.
    fn accept(&mut self, key: FlowKey, syn: Vec<u8>, inspect: bool, stream: TcpStream) {
        // Frames already queued are processed first, so no other SYN meets
        // the listener made below.
        self.poll();
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_BUF]),
            tcp::SocketBuffer::new(vec![0; TCP_BUF]),
        );
        s.set_nagle_enabled(false);
        if s.listen(IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(*key.1.ip())),
            port: key.1.port(),
        })
        .is_err()
        {
            self.feed(syn);
            return;
        }
        let h = self.sockets.add(s);
        self.dev.rx.push_back(syn);
        let now = self.now();
        // The SYN must meet its listener now, even while output waits for
        // QEMU (one SYN-ACK more in the held batch).
        let blocked = std::mem::replace(&mut self.dev.blocked, false);
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        self.dev.blocked = blocked;
        self.flush();
        let s = self.sockets.get_mut::<tcp::Socket>(h);
        let took = s.state() == tcp::State::SynReceived
            && s.remote_endpoint()
                == Some(IpEndpoint::new(IpAddress::Ipv4(*key.0.ip()), key.0.port()));
        if !took {
            s.abort();
            self.sockets.remove(h);
            self.shared.log.record(
                "tcp",
                key.1.to_string(),
                false,
                "the guest's SYN was not accepted by the stack",
            );
            return;
        }
        self.link(h, key, inspect, stream);
    }

    /// Moves data between sockets and flow tasks; answers DNS. True if anything moved.
    fn service(&mut self) -> bool {
        let mut moved = self.service_dns();
        let mut gone = Vec::new();
        let handles: Vec<SocketHandle> = self.flows.keys().copied().collect();
        for h in handles {
            let Some(flow) = self.flows.get_mut(&h) else {
                continue;
            };
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            if s.state() == tcp::State::Closed {
                gone.push(h);
                continue;
            }
            // Guest -> host.
            while s.can_recv() {
                let Some(tx) = flow.to_host.as_ref() else {
                    break;
                };
                let Ok(permit) = tx.try_reserve() else {
                    break;
                };
                let data = match s.recv(|b| {
                    let n = b.len().min(CHUNK);
                    (n, b[..n].to_vec())
                }) {
                    Ok(d) if !d.is_empty() => d,
                    _ => break,
                };
                moved = true;
                match flow.inspect.as_mut() {
                    None => permit.send(data),
                    Some(buf) => {
                        buf.extend_from_slice(&data);
                        drop(permit);
                        match sni_check(&self.shared, &self.pins, flow.key, buf) {
                            None => {}
                            Some(Ok(())) => {
                                let held = std::mem::take(buf);
                                flow.inspect = None;
                                if let Some(tx) = flow.to_host.as_ref() {
                                    // Room was reserved above; a full channel
                                    // here only happens if the task is gone.
                                    let _ = tx.try_send(held);
                                }
                            }
                            Some(Err(())) => {
                                s.abort();
                                flow.to_host = None;
                                flow.closing = true;
                                break;
                            }
                        }
                    }
                }
            }
            let fin = matches!(
                s.state(),
                tcp::State::CloseWait
                    | tcp::State::LastAck
                    | tcp::State::Closing
                    | tcp::State::TimeWait
            );
            if fin && !s.can_recv() && flow.to_host.is_some() {
                // The guest sent FIN: the host gets EOF.
                flow.to_host = None;
                moved = true;
            }
            // Host -> guest.
            loop {
                if let Some((data, off)) = flow.pending_in.as_mut() {
                    if !s.may_send() {
                        break;
                    }
                    match s.send_slice(&data[*off..]) {
                        Ok(n) if n > 0 => {
                            *off += n;
                            moved = true;
                        }
                        _ => break,
                    }
                    if *off < data.len() {
                        break;
                    }
                    flow.pending_in = None;
                }
                match flow.from_host.try_recv() {
                    Ok(d) => flow.pending_in = Some((d, 0)),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        flow.host_eof = true;
                        break;
                    }
                }
            }
            if flow.host_eof && flow.pending_in.is_none() && !flow.closing {
                s.close();
                flow.closing = true;
                moved = true;
            }
        }
        for h in gone {
            if let Some(f) = self.flows.remove(&h) {
                self.by_key.remove(&f.key);
            }
            self.sockets.remove(h);
        }
        moved
    }

    fn service_dns(&mut self) -> bool {
        let mut moved = false;
        for _ in 0..32 {
            let s = self.sockets.get_mut::<udp::Socket>(self.dns);
            let (data, from) = match s.recv() {
                Ok((d, meta)) => (d.to_vec(), meta.endpoint),
                Err(_) => break,
            };
            moved = true;
            let q = match dns::parse_query(&data) {
                Parsed::Ask(q) => q,
                Parsed::Reply(r) => {
                    let _ = s.send_slice(&r, from);
                    continue;
                }
                Parsed::Drop(why) => {
                    self.shared.log.record("dns", "?", false, why);
                    continue;
                }
            };
            let verdict = policy::decide_name(&self.shared.policy(), &q.name);
            let reply = match verdict {
                NameVerdict::Deny(reason) => {
                    self.shared.log.record("dns", q.name.clone(), false, reason);
                    dns::answer(&q, true, &[])
                }
                NameVerdict::Resolve(reason) => {
                    if q.query.query_type() != hickory_proto::rr::RecordType::A {
                        // IPv4 only: AAAA and the rest are answered empty, no hang.
                        dns::answer(&q, false, &[])
                    } else if self.dns_inflight >= MAX_DNS_INFLIGHT {
                        self.shared.log.record(
                            "dns",
                            q.name.clone(),
                            false,
                            "too many questions in flight",
                        );
                        None
                    } else {
                        self.shared.log.record("dns", q.name.clone(), true, reason);
                        self.dns_inflight += 1;
                        let resolver = self.shared.resolver.clone();
                        let tx = self.events_tx.clone();
                        tokio::spawn(async move {
                            let result = resolver.lookup_a(&q.name).await;
                            let _ = tx
                                .send(Event::Resolved {
                                    q,
                                    to: from,
                                    result,
                                })
                                .await;
                        });
                        None
                    }
                }
            };
            if let Some(r) = reply {
                let s = self.sockets.get_mut::<udp::Socket>(self.dns);
                let _ = s.send_slice(&r, from);
            }
        }
        moved
    }
}

/// Checks a held-back flow start: `None` needs more bytes.
fn sni_check(shared: &Shared, pins: &Pins, key: FlowKey, buf: &[u8]) -> Option<Result<(), ()>> {
    let what = key.1.to_string();
    let res = match sni::peek(buf) {
        Peek::NeedMore if buf.len() < sni::MAX_PEEK => return None,
        Peek::NeedMore => Err("no SNI or Host in the first bytes".to_string()),
        Peek::NoName(why) => Err(format!(
            "a domain rule's port needs a TLS SNI or HTTP Host naming the domain: {why}"
        )),
        Peek::Name(name) => policy::decide_sni(
            &shared.policy(),
            pins,
            &name,
            *key.1.ip(),
            key.1.port(),
            std::time::Instant::now(),
        ),
    };
    match res {
        Ok(reason) => {
            shared.log.record("tcp", what, true, reason);
            Some(Ok(()))
        }
        Err(reason) => {
            shared.log.record("tcp", what, false, reason);
            Some(Err(()))
        }
    }
}

/// Source, destination, protocol and payload of an IPv4 frame.
fn parse_ipv4(frame: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, IpProtocol, &[u8])> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let payload = &frame[EthernetFrame::<&[u8]>::header_len()..];
    let ip = Ipv4Packet::new_checked(payload).ok()?;
    if ip.version() != 4 {
        return None;
    }
    let (src, dst, proto) = (ip.src_addr(), ip.dst_addr(), ip.next_header());
    let hl = usize::from(ip.header_len());
    let total = usize::from(ip.total_len());
    let l4 = payload.get(hl..total)?;
    Some((src, dst, proto, l4))
}

/// One flow's host socket, linked to the stack by channels.
async fn run_flow(
    stream: TcpStream,
    mut to_host: mpsc::Receiver<Vec<u8>>,
    to_guest: mpsc::Sender<Vec<u8>>,
    notify: Arc<Notify>,
) {
    let _ = stream.set_nodelay(true);
    let (mut r, mut w) = stream.into_split();
    let n1 = notify.clone();
    let up = async move {
        while let Some(b) = to_host.recv().await {
            if w.write_all(&b).await.is_err() {
                break;
            }
            // The stack may hold more for this flow now that the channel has room.
            n1.notify_one();
        }
        let _ = w.shutdown().await;
    };
    let down = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            tokio::select! {
                n = r.read(&mut buf) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to_guest.send(buf[..n].to_vec()).await.is_err() {
                            break;
                        }
                        notify.notify_one();
                    }
                },
                _ = to_guest.closed() => break,
            }
        }
        drop(to_guest);
        notify.notify_one();
    };
    tokio::join!(up, down);
}

/// The host's own IPv4 addresses (floor members).
fn host_addrs() -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills ifap with a list freed below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut p = ifap;
    while !p.is_null() && out.len() < 256 {
        // SAFETY: p is a node of the list getifaddrs returned.
        let ifa = unsafe { &*p };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr is non-null and points to a sockaddr.
            let fam = unsafe { (*ifa.ifa_addr).sa_family };
            if i32::from(fam) == libc::AF_INET {
                // SAFETY: the family says it is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
        }
        p = ifa.ifa_next;
    }
    // SAFETY: ifap came from getifaddrs.
    unsafe { libc::freeifaddrs(ifap) };
    out
}
