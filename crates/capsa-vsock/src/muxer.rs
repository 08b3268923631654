//! The device core: routes packets between the two virtqueues and the host
//! Unix sockets.
//!
//! It knows nothing about vhost-user or QEMU: callers hand it guest memory
//! and a [`Queue`] and it pops, parses and fills descriptor chains. That keeps
//! it testable with a simulated driver and reusable by a future in-process
//! KVM transport.
//!
//! All host sockets are non-blocking and registered edge-triggered in one
//! epoll instance, whose fd the caller polls (the vhost-user worker thread
//! registers it next to the queue kick eventfds), so no call here ever
//! blocks.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, trace, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::chain::{ChainError, Segments};
use crate::config::{Limits, VsockConfig};
use crate::conn::{ConnKey, Connection, State};
use crate::error::VsockError;
use crate::packet::{classify, GuestPacket, Header, Op, Reject, HEADER_SIZE, MAX_PAYLOAD};

const TOKEN_LISTENER: u64 = 0;
const TOKEN_TIMER: u64 = 1;
const TOKEN_WAKE: u64 = 2;
const FIRST_STREAM_TOKEN: u64 = 16;

/// Resets queued for connections that no longer exist. TX processing pauses
/// at this many so a guest flooding bogus packets without posting RX buffers
/// cannot grow the queue; it resumes once the guest drains it.
const RST_BACKLOG: usize = 256;

/// The `CONNECT <port>\n` line is short; anything longer is garbage.
const MAX_HANDSHAKE_LINE: usize = 64;

/// Host->guest bytes staged per connection. Small because the guest's
/// credit, not this buffer, is what paces the stream.
const STAGING_CAP: usize = 64 * 1024;

/// Host-initiated connections use local ports from here up, away from the
/// low ports guest programs connect to.
const EPHEMERAL_BASE: u32 = 1 << 30;
/// One past the last ephemeral port (`u32::MAX` is `VMADDR_PORT_ANY`).
const EPHEMERAL_END: u32 = u32::MAX - 1;

/// Where a new device starts handing out host ports: a random point, as
/// Linux's own vsock auto-bind does.
///
/// Why not always the base: a VM restored from a snapshot keeps the guest
/// kernel's sockets from before it, and one the guest closed just before
/// the snapshot lingers (waiting for the RST that never came) for up to 8 s
/// of guest time. A fresh device that reused that socket's host port would
/// have its new connection answered with a RST, i.e. refused.
fn ephemeral_start() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: b is valid for 4 bytes; GRND_NONBLOCK never waits for entropy.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    let r = if n == 4 {
        u32::from_ne_bytes(b)
    } else {
        // No entropy this early: the clock still differs between two restores.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ d.as_secs() as u32)
            .unwrap_or(0)
    };
    EPHEMERAL_BASE + r % (EPHEMERAL_END - EPHEMERAL_BASE)
}

/// Deadline resolution; only armed while a deadline exists.
const TICK: Duration = Duration::from_millis(200);

/// Most epoll events handled per call, so queue work is not starved.
const EVENT_BATCH: usize = 64;

/// Counters shared with [`crate::VsockDevice::stats`].
#[derive(Debug, Default)]
pub struct SharedStats {
    /// Open connections.
    pub connections: AtomicU64,
    /// Connections refused at the limit.
    pub refused: AtomicU64,
    /// Malformed guest buffers/packets.
    pub malformed: AtomicU64,
    /// Resets queued for the guest.
    pub resets_sent: AtomicU64,
    /// Liveness probes after transport restarts.
    pub probes: AtomicU64,
}

/// A host client that has not sent its `CONNECT` line yet.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

enum Entry {
    Handshake(Handshake),
    Conn(ConnKey),
}

/// The connection multiplexer behind one vsock device.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    limits: Limits,
    epoll: Epoll,
    listener: UnixListener,
    timer: TimerFd,
    timer_armed: bool,
    wake: EventFd,
    entries: HashMap<u64, Entry>,
    conns: HashMap<ConnKey, Connection>,
    next_token: u64,
    next_ephemeral: u32,
    ready: VecDeque<ConnKey>,
    rst_queue: VecDeque<Header>,
    probe_pending: bool,
    accept_pending: bool,
    limit_warned: bool,
    malformed_warned: bool,
    ring_warned: bool,
    /// Buffer for reads from host sockets.
    scratch: Vec<u8>,
    /// Payload of the guest packet being handled.
    tx_payload: Vec<u8>,
    /// Payload of the packet being sent to the guest.
    rx_payload: Vec<u8>,
    stats: Arc<SharedStats>,
}

fn os_err(what: &'static str) -> impl FnOnce(io::Error) -> VsockError {
    move |source| VsockError::Os { what, source }
}

impl Muxer {
    /// Creates the muxer around an already-bound hybrid listener.
    pub fn new(
        config: &VsockConfig,
        listener: UnixListener,
        stats: Arc<SharedStats>,
    ) -> Result<Muxer, VsockError> {
        listener
            .set_nonblocking(true)
            .map_err(os_err("non-blocking listener"))?;
        let epoll = Epoll::new().map_err(os_err("epoll instance"))?;
        let timer = TimerFd::new()
            .map_err(|e| os_err("timerfd")(io::Error::from_raw_os_error(e.errno())))?;
        let wake = EventFd::new(EFD_NONBLOCK).map_err(os_err("eventfd"))?;
        // The listener is edge-triggered so an accept that keeps failing
        // (EMFILE) cannot spin the worker; `accept_pending` resumes batches.
        for (fd, token, set) in [
            (
                listener.as_raw_fd(),
                TOKEN_LISTENER,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            ),
            (timer.as_raw_fd(), TOKEN_TIMER, EventSet::IN),
            (wake.as_raw_fd(), TOKEN_WAKE, EventSet::IN),
        ] {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(set, token))
                .map_err(os_err("epoll registration"))?;
        }
        Ok(Muxer {
            guest_cid: config.guest_cid,
            uds_path: config.uds_path.clone(),
            limits: config.limits.clone(),
            epoll,
            listener,
            timer,
            timer_armed: false,
            wake,
            entries: HashMap::new(),
            conns: HashMap::new(),
            next_token: FIRST_STREAM_TOKEN,
            next_ephemeral: ephemeral_start(),
            ready: VecDeque::new(),
            rst_queue: VecDeque::new(),
            probe_pending: false,
            accept_pending: false,
            limit_warned: false,
            malformed_warned: false,
            ring_warned: false,
            scratch: vec![0; MAX_PAYLOAD as usize],
            tx_payload: vec![0; MAX_PAYLOAD as usize],
            rx_payload: Vec::with_capacity(MAX_PAYLOAD as usize),
            stats,
        })
    }

    /// The epoll fd to poll for readability; when readable, call
    /// [`Muxer::handle_host_events`].
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Makes [`Muxer::epoll_fd`] readable so the owner calls back soon; used
    /// to yield after a bounded amount of work.
    pub fn wake(&self) {
        let _ = self.wake.write(1);
    }

    /// Open connections (excluding host clients still handshaking).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn total_slots(&self) -> usize {
        self.entries.len()
    }

    /// Whether TX processing is paused until the guest takes queued resets.
    pub fn tx_throttled(&self) -> bool {
        self.rst_queue.len() >= RST_BACKLOG
    }

    fn publish_count(&self) {
        self.stats
            .connections
            .store(self.conns.len() as u64, Ordering::Relaxed);
    }

    // ----- host side -------------------------------------------------------

    /// Handles whatever the host sockets and timers have ready. Never blocks.
    pub fn handle_host_events(&mut self) {
        let mut events = [EpollEvent::default(); EVENT_BATCH];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            Err(e) => {
                warn!("vsock: epoll_wait failed: {e}");
                return;
            }
        };
        if n == EVENT_BATCH {
            // More may be pending; make sure we are called again.
            self.wake();
        }
        for ev in &events[..n] {
            let set = EventSet::from_bits_truncate(ev.events());
            match ev.data() {
                TOKEN_LISTENER => self.accept_host_clients(),
                TOKEN_TIMER => self.on_tick(),
                TOKEN_WAKE => {
                    let _ = self.wake.read();
                }
                token => self.on_stream_event(token, set),
            }
        }
        if self.accept_pending {
            self.accept_host_clients();
        }
    }

    fn accept_host_clients(&mut self) {
        self.accept_pending = false;
        // Bounded so a connect storm cannot monopolise the worker thread.
        for _ in 0..EVENT_BATCH {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    // EMFILE and friends: back off until the next client
                    // arrives rather than retrying in a loop.
                    warn!("vsock: accepting a host client failed: {e}");
                    return;
                }
            };
            if self.total_slots() >= self.limits.max_connections {
                self.refuse("host client");
                continue; // dropping the stream closes it
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let token = self.alloc_token();
            if self.register_stream(&stream, token).is_err() {
                continue;
            }
            self.entries.insert(
                token,
                Entry::Handshake(Handshake {
                    stream,
                    line: Vec::with_capacity(MAX_HANDSHAKE_LINE),
                    deadline: Instant::now() + self.limits.handshake_timeout,
                }),
            );
            self.arm_timer();
            // Edge-triggered: the CONNECT line may already be there.
            self.on_handshake_readable(token);
        }
        // Batch used up: more clients may be waiting, and no new edge will
        // say so.
        self.accept_pending = true;
        self.wake();
    }

    fn refuse(&mut self, what: &str) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        if !self.limit_warned {
            self.limit_warned = true;
            warn!(
                "vsock: connection limit of {} reached, refusing {what}s (logged once per episode; \
                 raise Limits::max_connections if this is expected)",
                self.limits.max_connections
            );
        }
    }

    fn alloc_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn register_stream(&self, stream: &UnixStream, token: u64) -> io::Result<()> {
        let set = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(set, token),
        )
    }

    fn deregister(&self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    fn on_stream_event(&mut self, token: u64, set: EventSet) {
        let key = match self.entries.get(&token) {
            Some(Entry::Handshake(_)) => {
                self.on_handshake_readable(token);
                return;
            }
            Some(Entry::Conn(key)) => *key,
            None => return, // closed earlier in this batch
        };
        if let Some(c) = self.conns.get_mut(&key) {
            if set.intersects(
                EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
            ) {
                c.readable = true;
            }
            if set.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
                c.writable = true;
            }
        }
        self.service(key);
    }

    fn on_handshake_readable(&mut self, token: u64) {
        let Some(Entry::Handshake(hs)) = self.entries.get_mut(&token) else {
            return;
        };
        // Edge-triggered: read until the line is complete or the socket is
        // drained, or no further event would arrive for what is left.
        let mut buf = [0u8; MAX_HANDSHAKE_LINE];
        let outcome = loop {
            if let Some(nl) = hs.line.iter().position(|&b| b == b'\n') {
                break Ok(nl);
            }
            let room = MAX_HANDSHAKE_LINE - hs.line.len();
            if room == 0 {
                break Err("overlong handshake line");
            }
            match hs.stream.read(&mut buf[..room]) {
                Ok(0) => break Err("closed before CONNECT"),
                Ok(n) => hs.line.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Err("read error"),
            }
        };
        let port = match outcome {
            Ok(nl) => parse_connect_line(&hs.line[..nl]).map(|p| (p, hs.line[nl + 1..].to_vec())),
            Err(why) => {
                debug!("vsock: host client dropped: {why}");
                return self.drop_entry(token);
            }
        };
        let Some((port, early)) = port else {
            debug!("vsock: host client sent an invalid CONNECT line");
            return self.drop_entry(token);
        };
        let Some(Entry::Handshake(hs)) = self.entries.remove(&token) else {
            return;
        };
        let Some(host_port) = self.alloc_ephemeral(port) else {
            self.deregister(hs.stream.as_raw_fd());
            self.refuse("host client");
            return;
        };
        let key = ConnKey {
            host_port,
            guest_port: port,
        };
        let deadline = Instant::now() + self.limits.connect_timeout;
        let conn = Connection::host_initiated(key, token, hs.stream, deadline, &early);
        debug!("vsock: host client connecting to guest port {port} as host port {host_port}");
        self.entries.insert(token, Entry::Conn(key));
        self.conns.insert(key, conn);
        self.publish_count();
        self.service(key);
    }

    fn alloc_ephemeral(&mut self, guest_port: u32) -> Option<u32> {
        for _ in 0..=self.limits.max_connections {
            let p = self.next_ephemeral;
            self.next_ephemeral = if p + 1 >= EPHEMERAL_END {
                EPHEMERAL_BASE
            } else {
                p + 1
            };
            let key = ConnKey {
                host_port: p,
                guest_port,
            };
            if !self.conns.contains_key(&key) {
                return Some(p);
            }
        }
        None
    }

    fn drop_entry(&mut self, token: u64) {
        match self.entries.remove(&token) {
            Some(Entry::Handshake(hs)) => self.deregister(hs.stream.as_raw_fd()),
            Some(Entry::Conn(key)) => {
                if let Some(c) = self.conns.remove(&key) {
                    self.deregister(c.stream.as_raw_fd());
                }
                self.ready.retain(|k| *k != key);
                self.publish_count();
            }
            None => {}
        }
        if self.total_slots() < self.limits.max_connections {
            self.limit_warned = false;
        }
    }

    /// Removes a connection, closing the host stream, without telling the
    /// guest.
    fn close(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get(&key) {
            let token = c.token;
            self.drop_entry(token);
        }
    }

    /// Removes a connection and tells the guest with a RST.
    fn reset(&mut self, key: ConnKey, why: &str) {
        debug!(
            "vsock: resetting host port {} <-> guest port {}: {why}",
            key.host_port, key.guest_port
        );
        self.close(key);
        self.queue_rst(key.rst_to_guest(self.guest_cid));
    }

    fn queue_rst(&mut self, h: Header) {
        // The backlog is bounded by throttling TX; this is the backstop.
        if self.rst_queue.len() < RST_BACKLOG * 2 {
            self.stats.resets_sent.fetch_add(1, Ordering::Relaxed);
            self.rst_queue.push_back(h);
        }
    }

    fn arm_timer(&mut self) {
        if !self.timer_armed {
            if let Err(e) = self.timer.reset(TICK, Some(TICK)) {
                warn!("vsock: cannot arm deadline timer: {e}");
                return;
            }
            self.timer_armed = true;
        }
    }

    fn on_tick(&mut self) {
        let _ = self.timer.wait();
        let now = Instant::now();
        let mut expired_hs = Vec::new();
        let mut expired = Vec::new();
        let mut pending = false;
        for (token, e) in &self.entries {
            match e {
                Entry::Handshake(hs) => {
                    pending = true;
                    if hs.deadline <= now {
                        expired_hs.push(*token);
                    }
                }
                Entry::Conn(key) => {
                    if let Some(c) = self.conns.get(key) {
                        if let State::Connecting { deadline } | State::Closing { deadline } =
                            c.state
                        {
                            pending = true;
                            if deadline <= now {
                                expired.push(*key);
                            }
                        }
                    }
                }
            }
        }
        for t in expired_hs {
            debug!("vsock: host client did not send CONNECT in time");
            self.drop_entry(t);
        }
        for k in expired {
            let told_guest = self.conns.get(&k).is_some_and(|c| c.guest_knows());
            if told_guest {
                self.reset(k, "timed out");
            } else {
                // The REQUEST never reached the guest (no RX buffers).
                debug!(
                    "vsock: host connect to guest port {} timed out",
                    k.guest_port
                );
                self.close(k);
            }
        }
        if !pending {
            let _ = self.timer.clear();
            self.timer_armed = false;
        }
    }

    /// Moves bytes between the host socket and the connection buffers and
    /// re-evaluates what the connection owes the guest.
    fn service(&mut self, key: ConnKey) {
        let buf_alloc = self.limits.buffer_size;
        let cap = STAGING_CAP.min(buf_alloc as usize);
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let mut res = c.flush_to_host();
        if res.is_ok() {
            res = c.fill_from_host(&mut self.scratch, cap);
        }
        if let Err(f) = res {
            self.reset(key, &f.to_string());
            return;
        }
        if matches!(c.state, State::Closing { .. }) && c.to_host_len() == 0 {
            // Everything the guest sent is with the host: complete the close
            // the guest started, as Linux's own transport does.
            self.reset(key, "closed by guest");
            return;
        }
        if c.credit_update_due(buf_alloc) {
            c.schedule_credit_update();
        }
        if c.has_rx_work() && !c.queued {
            c.queued = true;
            self.ready.push_back(key);
        }
    }

    // ----- guest side: TX --------------------------------------------------

    /// Consumes guest->host packets from the TX queue. Returns whether used
    /// entries were added (the caller then notifies the guest).
    pub fn process_tx<M: GuestMemory>(&mut self, mem: &M, queue: &mut Queue) -> bool {
        let mut used = false;
        loop {
            let _ = queue.disable_notification(mem);
            let mut popped = false;
            loop {
                if self.tx_throttled() {
                    // Resumed by the caller after RX processing.
                    return used;
                }
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                popped = true;
                let head = chain.head_index();
                match Segments::collect(mem, chain, false) {
                    Ok(segs) => self.handle_tx_segments(mem, &segs),
                    Err(e) => self.malformed(e),
                }
                if let Err(e) = queue.add_used(mem, head, 0) {
                    self.ring_error("TX", e);
                }
                used = true;
            }
            // Re-check after re-enabling kicks, but only if this round made
            // progress: a guest can publish an avail index the queue refuses
            // to walk, which would otherwise spin this loop forever.
            let more = queue.enable_notification(mem).unwrap_or(false);
            if !(more && popped) {
                break;
            }
        }
        used
    }

    fn malformed(&mut self, e: ChainError) {
        self.stats.malformed.fetch_add(1, Ordering::Relaxed);
        if !self.malformed_warned {
            self.malformed_warned = true;
            warn!("vsock: dropping malformed guest buffer ({e}); further ones logged at debug");
        } else {
            debug!("vsock: dropping malformed guest buffer ({e})");
        }
    }

    fn handle_tx_segments<M: GuestMemory>(&mut self, mem: &M, segs: &Segments) {
        let mut raw = [0u8; HEADER_SIZE];
        if segs.len() < HEADER_SIZE {
            return self.malformed(ChainError::Truncated);
        }
        if let Err(e) = segs.read_at(mem, 0, &mut raw) {
            return self.malformed(e);
        }
        let Some(hdr) = Header::parse(&raw) else {
            return self.malformed(ChainError::Truncated);
        };
        let pkt = match classify(&hdr, self.guest_cid) {
            Ok(p) => p,
            Err(Reject::Drop(why)) => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                debug!("vsock: dropping guest packet: {why}");
                return;
            }
            Err(Reject::Reset(why)) => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                debug!("vsock: resetting after guest packet: {why}");
                return self.reset_for(&hdr);
            }
        };
        let len = pkt.len as usize;
        if len > 0 {
            // `len` is at most MAX_PAYLOAD (classify), and tx_payload is that big.
            let res = if segs.len() - HEADER_SIZE < len {
                Err(ChainError::Truncated)
            } else {
                segs.read_at(mem, HEADER_SIZE, &mut self.tx_payload[..len])
            };
            if let Err(e) = res {
                // Lost stream bytes cannot be recovered: reset.
                self.malformed(e);
                return self.reset_for(&hdr);
            }
        }
        // Moved out so the packet handler can use `self` (including the
        // separate host-read `scratch`) while borrowing the payload.
        let payload = std::mem::take(&mut self.tx_payload);
        self.handle_guest_packet(&pkt, &payload[..len]);
        self.tx_payload = payload;
    }

    /// Resets whatever connection `hdr` addresses, or answers with a RST if
    /// there is none.
    fn reset_for(&mut self, hdr: &Header) {
        let key = ConnKey {
            host_port: hdr.dst_port,
            guest_port: hdr.src_port,
        };
        if self.conns.contains_key(&key) {
            self.reset(key, "malformed packet");
        } else if hdr.op != Op::Rst.as_u16() {
            self.queue_rst(hdr.reset_reply());
        }
    }

    fn handle_guest_packet(&mut self, pkt: &GuestPacket, payload: &[u8]) {
        trace!(
            "vsock: guest -> {:?} host {} guest {} len {} flags {} buf_alloc {} fwd_cnt {}",
            pkt.op,
            pkt.host_port,
            pkt.guest_port,
            pkt.len,
            pkt.flags,
            pkt.buf_alloc,
            pkt.fwd_cnt
        );
        let key = ConnKey {
            host_port: pkt.host_port,
            guest_port: pkt.guest_port,
        };
        if pkt.op == Op::Request {
            return self.on_guest_connect(key, pkt);
        }
        let buf_alloc = self.limits.buffer_size;
        let close_deadline = Instant::now() + self.limits.close_timeout;
        let Some(c) = self.conns.get_mut(&key) else {
            if pkt.op != Op::Rst {
                // Unknown connection (stale after a reset, or never existed).
                self.queue_rst(key.rst_to_guest(self.guest_cid));
            }
            return;
        };
        c.update_peer_credit(pkt.buf_alloc, pkt.fwd_cnt);
        let res = match pkt.op {
            Op::Response => c.on_response(),
            Op::Rst => {
                debug!(
                    "vsock: guest reset host port {} <-> guest port {}",
                    key.host_port, key.guest_port
                );
                return self.close(key);
            }
            Op::Shutdown => c.on_shutdown(pkt.flags, close_deadline),
            Op::Rw => c.on_guest_data(payload, buf_alloc),
            Op::CreditUpdate => Ok(()),
            Op::CreditRequest => {
                c.on_credit_request();
                Ok(())
            }
            Op::Request => Ok(()), // handled above
        };
        if matches!(c.state, State::Closing { .. }) {
            self.arm_timer();
        }
        match res {
            Ok(()) => self.service(key),
            Err(f) => self.reset(key, &f.to_string()),
        }
    }

    fn on_guest_connect(&mut self, key: ConnKey, pkt: &GuestPacket) {
        if self.conns.contains_key(&key) {
            // The guest only reuses a port pair it has forgotten (e.g. after
            // a driver reset), so the old connection is dead.
            debug!("vsock: guest reused port pair {key:?}; dropping the stale connection");
            self.close(key);
        }
        if self.total_slots() >= self.limits.max_connections {
            self.refuse("guest connection");
            return self.queue_rst(key.rst_to_guest(self.guest_cid));
        }
        let path = port_path(&self.uds_path, key.host_port);
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                debug!("vsock: guest connect to {path:?} refused: {e}");
                return self.queue_rst(key.rst_to_guest(self.guest_cid));
            }
        };
        let token = self.alloc_token();
        if let Err(e) = self.register_stream(&stream, token) {
            warn!("vsock: cannot watch a new host stream: {e}");
            return self.queue_rst(key.rst_to_guest(self.guest_cid));
        }
        let conn = Connection::guest_initiated(key, token, stream, pkt.buf_alloc, pkt.fwd_cnt);
        self.entries.insert(token, Entry::Conn(key));
        self.conns.insert(key, conn);
        self.publish_count();
        self.service(key);
    }

    // ----- guest side: RX --------------------------------------------------

    fn has_rx_work(&self) -> bool {
        !self.rst_queue.is_empty() || !self.ready.is_empty()
    }

    /// Fills guest RX buffers with whatever is owed. Returns whether used
    /// entries were added.
    pub fn process_rx<M: GuestMemory>(&mut self, mem: &M, queue: &mut Queue) -> bool {
        if self.probe_pending {
            self.start_probe();
        }
        let mut used = false;
        'outer: loop {
            let _ = queue.disable_notification(mem);
            let mut popped = false;
            while self.has_rx_work() {
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                popped = true;
                let head = chain.head_index();
                let segs = match Segments::collect(mem, chain, true) {
                    Ok(s) if s.len() >= HEADER_SIZE => s,
                    Ok(_) => {
                        self.malformed(ChainError::Truncated);
                        self.add_used(mem, queue, head, 0);
                        used = true;
                        continue;
                    }
                    Err(e) => {
                        self.malformed(e);
                        self.add_used(mem, queue, head, 0);
                        used = true;
                        continue;
                    }
                };
                let Some(hdr) = self.next_rx_packet(segs.len() - HEADER_SIZE) else {
                    // Nothing fits this buffer now; leave it for later and
                    // keep kicks enabled for when more buffers arrive.
                    queue.go_to_previous_position();
                    let _ = queue.enable_notification(mem);
                    break 'outer;
                };
                trace!(
                    "vsock: -> guest op {} host {} guest {} len {} flags {} fwd_cnt {}",
                    hdr.op,
                    hdr.src_port,
                    hdr.dst_port,
                    hdr.len,
                    hdr.flags,
                    hdr.fwd_cnt
                );
                let wrote = segs
                    .write_at(mem, 0, &hdr.to_bytes())
                    .and_then(|()| segs.write_at(mem, HEADER_SIZE, &self.rx_payload));
                match wrote {
                    Ok(()) => {
                        let len = (HEADER_SIZE + self.rx_payload.len()) as u32;
                        self.add_used(mem, queue, head, len);
                    }
                    Err(e) => {
                        self.malformed(e);
                        self.add_used(mem, queue, head, 0);
                        if hdr.op == Op::Rw.as_u16() {
                            // The bytes are gone; the stream cannot continue.
                            let key = ConnKey {
                                host_port: hdr.src_port,
                                guest_port: hdr.dst_port,
                            };
                            self.reset(key, "RX buffer unwritable");
                        }
                    }
                }
                used = true;
            }
            // Ask for a kick when buffers are added, and retry if some
            // arrived meanwhile (only after progress; see process_tx).
            let more = queue.enable_notification(mem).unwrap_or(false);
            if !(more && popped && self.has_rx_work()) {
                break;
            }
        }
        used
    }

    fn add_used<M: GuestMemory>(&mut self, mem: &M, queue: &mut Queue, head: u16, len: u32) {
        if let Err(e) = queue.add_used(mem, head, len) {
            self.ring_error("RX", e);
        }
    }

    /// The guest can point its rings at unmapped memory; say so once rather
    /// than once per packet.
    fn ring_error(&mut self, queue: &str, e: virtio_queue::Error) {
        if !self.ring_warned {
            self.ring_warned = true;
            warn!("vsock: cannot update the {queue} used ring ({e}); further errors at debug");
        } else {
            debug!("vsock: cannot update the {queue} used ring ({e})");
        }
    }

    /// Picks the next packet for the guest; its payload is left in
    /// `self.rx_payload`.
    fn next_rx_packet(&mut self, capacity: usize) -> Option<Header> {
        if let Some(h) = self.rst_queue.pop_front() {
            self.rx_payload.clear();
            return Some(h);
        }
        // One pass over the ready list: connections that cannot send right
        // now (no credit, buffer too small) are rotated, not spun on.
        for _ in 0..self.ready.len() {
            let key = self.ready.pop_front()?;
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.queued = false;
            let pkt = c.next_packet(
                capacity,
                self.guest_cid,
                self.limits.buffer_size,
                &mut self.rx_payload,
            );
            if let Some(h) = pkt {
                // Staging has room again: pull more from the host, and
                // requeue if more is owed.
                self.service(key);
                return Some(h);
            }
            if c.has_rx_work() {
                c.queued = true;
                self.ready.push_back(key);
            }
        }
        None
    }

    // ----- lifecycle -------------------------------------------------------

    /// The transport's queues were stopped (VM paused, guest driver reset,
    /// snapshot restore). A paused guest keeps its sockets but a reset one
    /// forgets them without telling us, so once the queues run again every
    /// established connection is probed with a CREDIT_REQUEST: a live guest
    /// socket answers with a credit update, a forgotten one with a RST that
    /// closes our side cleanly.
    pub fn transport_stopped(&mut self) {
        self.probe_pending = true;
    }

    fn start_probe(&mut self) {
        self.probe_pending = false;
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        if !keys.is_empty() {
            debug!(
                "vsock: probing {} connections after a transport restart",
                keys.len()
            );
        }
        for k in keys {
            if let Some(c) = self.conns.get_mut(&k) {
                c.request_probe();
                self.stats.probes.fetch_add(1, Ordering::Relaxed);
            }
            self.service(k);
        }
    }

    /// Drops every connection and pending packet, closing all host streams.
    /// Used when the guest side is gone for certain (device reset, frontend
    /// disconnect, explicit request after a snapshot restore).
    pub fn reset_all(&mut self, why: &str) {
        let n = self.entries.len();
        let tokens: Vec<u64> = self.entries.keys().copied().collect();
        for t in tokens {
            self.drop_entry(t);
        }
        self.ready.clear();
        self.rst_queue.clear();
        self.probe_pending = false;
        if n > 0 {
            info!("vsock: dropped {n} connections: {why}");
        }
    }
}

/// Parses `CONNECT <port>` (the newline already stripped; a trailing `\r`
/// is tolerated for hand-typed sessions).
fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let port = line.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// `<uds>_<port>`, the hybrid convention for guest->host connections.
pub fn port_path(uds: &Path, port: u32) -> PathBuf {
    let mut s = uds.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Connects without ever blocking: for Unix sockets `connect` either
/// completes at once or fails with `EAGAIN` when the listener's backlog is
/// full, which we treat as a refusal.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: zeroed sockaddr_un is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un and `len` does not exceed it.
    let rc = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line() {
        assert_eq!(parse_connect_line(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect_line(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect_line(b"CONNECT -1"), None);
        assert_eq!(parse_connect_line(b"CONNECT +1"), None);
        assert_eq!(parse_connect_line(b"CONNECT "), None);
        assert_eq!(parse_connect_line(b"connect 5"), None);
        assert_eq!(parse_connect_line(b"\xff\xfe"), None);
    }

    #[test]
    fn port_paths() {
        assert_eq!(
            port_path(Path::new("/run/v.sock"), 1234),
            PathBuf::from("/run/v.sock_1234")
        );
    }
}
