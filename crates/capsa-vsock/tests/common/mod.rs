//! A simulated virtio-vsock guest driver around the device core.
//!
//! Guest memory is a real `GuestMemoryMmap`; the rings are laid out by
//! virtio-queue's `MockSplitQueue`, and the driver side (posting buffers,
//! reading the used ring) is done here the way the Linux driver does it: RX
//! buffers are a 44-byte header descriptor plus a 4 KiB data descriptor, TX
//! packets a header descriptor plus an optional payload descriptor.

#![allow(dead_code)]

use std::collections::HashMap;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use capsa_vsock::packet::{Header, Op, HEADER_SIZE, HOST_CID, TYPE_STREAM};
use capsa_vsock::testing::{Muxer, SharedStats};
use capsa_vsock::{Limits, VsockConfig};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::{AvailRing, DescriptorTable, UsedRing};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const GUEST_CID: u64 = 3;
pub const QSIZE: u16 = 256;
pub const RX_BUF: u32 = 4096;
const MEM_SIZE: usize = 32 << 20;
const RXQ_ADDR: u64 = 0x0;
const TXQ_ADDR: u64 = 0x10000;
const RX_BUFS: u64 = 0x10_0000;
const RX_SLOT: u64 = 0x2000;
const TX_BUFS: u64 = 0x40_0000;
const TX_SLOT: u64 = 0x1_1000;

/// A packet the device delivered to the guest.
#[derive(Debug, Clone)]
pub struct Rx {
    pub hdr: Header,
    pub op: Option<Op>,
    pub data: Vec<u8>,
}

struct Ring {
    desc: DescriptorTable<'static, GuestMemoryMmap>,
    avail: AvailRing<'static, GuestMemoryMmap>,
    used: UsedRing<'static, GuestMemoryMmap>,
    queue: Queue,
    free: Vec<u16>,
    avail_idx: u16,
    used_seen: u16,
    /// head -> descriptor indexes of the chain, to free on completion.
    chains: HashMap<u16, Vec<u16>>,
}

impl Ring {
    /// Lays out a split queue at `addr` using virtio-queue's mock ring
    /// accessors. (`MockSplitQueue::create` is not used: it computes the
    /// avail ring's end in elements, not bytes, so for large queues its used
    /// ring overlaps the avail ring.)
    fn new(mem: &'static GuestMemoryMmap, addr: u64) -> Ring {
        let n = u64::from(QSIZE);
        let desc_addr = GuestAddress(addr);
        let avail_addr = GuestAddress(addr + 16 * n);
        let used_addr = GuestAddress((addr + 16 * n + 6 + 2 * n + 3) & !3);
        let desc = DescriptorTable::new(mem, desc_addr, QSIZE);
        let avail = AvailRing::new(mem, avail_addr, QSIZE);
        let used = UsedRing::new(mem, used_addr, QSIZE);
        let mut queue = Queue::new(QSIZE).unwrap();
        queue.set_size(QSIZE);
        queue.set_desc_table_address(Some(desc_addr.0 as u32), Some((desc_addr.0 >> 32) as u32));
        queue.set_avail_ring_address(Some(avail_addr.0 as u32), Some((avail_addr.0 >> 32) as u32));
        queue.set_used_ring_address(Some(used_addr.0 as u32), Some((used_addr.0 >> 32) as u32));
        queue.set_ready(true);
        assert!(queue.is_valid(mem));
        Ring {
            desc,
            avail,
            used,
            queue,
            free: (0..QSIZE).rev().collect(),
            avail_idx: 0,
            used_seen: 0,
            chains: HashMap::new(),
        }
    }

    /// Writes a chain (linking `next` itself) and publishes it.
    fn push(&mut self, descs: &[(u64, u32, u16)]) -> Option<u16> {
        if self.free.len() < descs.len() || descs.is_empty() {
            return None;
        }
        let idxs: Vec<u16> = (0..descs.len()).map(|_| self.free.pop().unwrap()).collect();
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let (flags, next) = if i + 1 < descs.len() {
                (flags | VRING_DESC_F_NEXT as u16, idxs[i + 1])
            } else {
                (flags & !(VRING_DESC_F_NEXT as u16), 0)
            };
            let d = SplitDescriptor::new(addr, len, flags, next);
            self.desc.store(idxs[i], RawDescriptor::from(d)).unwrap();
        }
        let head = idxs[0];
        self.publish(head);
        self.chains.insert(head, idxs);
        Some(head)
    }

    /// Writes raw descriptors at fixed indexes (for hostile layouts) and
    /// publishes `head`. The indexes are taken out of the free list.
    fn push_raw(&mut self, descs: &[(u16, SplitDescriptor)], head: u16) {
        let mut idxs = Vec::new();
        for (i, d) in descs {
            self.free.retain(|f| f != i);
            idxs.push(*i);
            self.desc.store(*i, RawDescriptor::from(*d)).unwrap();
        }
        self.publish(head);
        self.chains.insert(head, idxs);
    }

    fn publish(&mut self, head: u16) {
        self.avail
            .ring()
            .ref_at((self.avail_idx % QSIZE) as usize)
            .unwrap()
            .store(head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.avail.idx().store(self.avail_idx);
    }

    /// New used entries since the last call, descriptors returned to the
    /// free list.
    fn take_used(&mut self) -> Vec<(u16, u32)> {
        let idx = self.used.idx().load();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = self
                .used
                .ring()
                .ref_at((self.used_seen % QSIZE) as usize)
                .unwrap()
                .load();
            self.used_seen = self.used_seen.wrapping_add(1);
            let head = e.id() as u16;
            if let Some(idxs) = self.chains.remove(&head) {
                self.free.extend(idxs);
            }
            out.push((head, e.len()));
        }
        out
    }

    fn outstanding(&self) -> usize {
        self.chains.len()
    }
}

/// The simulated guest plus the device core under test.
pub struct Sim {
    pub mem: &'static GuestMemoryMmap,
    rx: Ring,
    tx: Ring,
    pub mux: Muxer,
    pub stats: Arc<SharedStats>,
    pub dir: tempfile::TempDir,
    pub uds: PathBuf,
    pub rx_buf_size: u32,
    inbox: Vec<Rx>,
}

impl Sim {
    pub fn new() -> Sim {
        Sim::with_limits(Limits::default())
    }

    pub fn with_limits(limits: Limits) -> Sim {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        ));
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mut config = VsockConfig::new(dir.path().join("vhost.sock"), &uds);
        config.guest_cid = GUEST_CID;
        config.limits = limits;
        config.validate().unwrap();
        let listener = UnixListener::bind(&uds).unwrap();
        let stats = Arc::new(SharedStats::default());
        let mux = Muxer::new(&config, listener, stats.clone()).unwrap();
        Sim {
            mem,
            rx: Ring::new(mem, RXQ_ADDR),
            tx: Ring::new(mem, TXQ_ADDR),
            mux,
            stats,
            dir,
            uds,
            rx_buf_size: RX_BUF,
            inbox: Vec::new(),
        }
    }

    pub fn port_path(&self, port: u32) -> PathBuf {
        PathBuf::from(format!("{}_{port}", self.uds.display()))
    }

    /// Posts `n` RX buffers (header descriptor + data descriptor).
    pub fn post_rx(&mut self, n: usize) -> usize {
        let mut posted = 0;
        for _ in 0..n {
            let Some(&next) = self.rx.free.last() else {
                break;
            };
            let base = RX_BUFS + u64::from(next) * RX_SLOT;
            let w = VRING_DESC_F_WRITE as u16;
            if self
                .rx
                .push(&[
                    (base, HEADER_SIZE as u32, w),
                    (base + 64, self.rx_buf_size, w),
                ])
                .is_none()
            {
                break;
            }
            posted += 1;
        }
        posted
    }

    pub fn rx_posted(&self) -> usize {
        self.rx.outstanding()
    }

    /// Raw access for hostile RX layouts.
    pub fn push_rx_chain(&mut self, descs: &[(u64, u32, u16)]) -> Option<u16> {
        self.rx.push(descs)
    }

    /// Queues a TX packet: header and payload in separate descriptors (as
    /// Linux 6.1 does) unless `single` is set.
    pub fn send_bytes(&mut self, raw_hdr: &[u8], payload: &[u8], single: bool) -> Option<u16> {
        let &slot = self.tx.free.last()?;
        let base = TX_BUFS + u64::from(slot) * TX_SLOT;
        self.mem.write_slice(raw_hdr, GuestAddress(base)).unwrap();
        if single {
            self.mem
                .write_slice(payload, GuestAddress(base + raw_hdr.len() as u64))
                .unwrap();
            self.tx
                .push(&[(base, (raw_hdr.len() + payload.len()) as u32, 0)])
        } else if payload.is_empty() {
            self.tx.push(&[(base, raw_hdr.len() as u32, 0)])
        } else {
            self.mem
                .write_slice(payload, GuestAddress(base + 0x100))
                .unwrap();
            self.tx.push(&[
                (base, raw_hdr.len() as u32, 0),
                (base + 0x100, payload.len() as u32, 0),
            ])
        }
    }

    pub fn send(&mut self, hdr: Header, payload: &[u8]) {
        self.send_bytes(&hdr.to_bytes(), payload, false)
            .expect("TX ring full");
    }

    /// Raw access for hostile TX layouts.
    pub fn push_tx_raw(&mut self, descs: &[(u16, SplitDescriptor)], head: u16) {
        self.tx.push_raw(descs, head)
    }

    pub fn push_tx_chain(&mut self, descs: &[(u64, u32, u16)]) -> Option<u16> {
        self.tx.push(descs)
    }

    pub fn mem_write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    pub fn enable_event_idx(&mut self) {
        self.rx.queue.set_event_idx(true);
        self.tx.queue.set_event_idx(true);
    }

    pub fn tx_free_slot_addr(&self) -> u64 {
        TX_BUFS + u64::from(*self.tx.free.last().unwrap()) * TX_SLOT
    }

    /// Lets the device run until it has nothing left to do, collecting what
    /// it delivered into the inbox.
    pub fn run(&mut self) {
        let mut idle = 0;
        for _ in 0..10_000 {
            let a = self.mux.process_tx(self.mem, &mut self.tx.queue);
            self.mux.handle_host_events();
            let b = self.mux.process_rx(self.mem, &mut self.rx.queue);
            self.collect();
            self.tx.take_used();
            if a || b {
                idle = 0;
            } else {
                idle += 1;
                if idle > 3 {
                    return;
                }
            }
        }
        panic!("device never went idle");
    }

    fn collect(&mut self) {
        for (head, len) in self.rx.take_used() {
            let base = RX_BUFS + u64::from(head) * RX_SLOT;
            assert!(
                len as usize >= HEADER_SIZE || len == 0,
                "short used len {len}"
            );
            if len == 0 {
                continue;
            }
            let mut raw = [0u8; HEADER_SIZE];
            self.mem.read_slice(&mut raw, GuestAddress(base)).unwrap();
            let hdr = Header::parse(&raw).unwrap();
            let n = len as usize - HEADER_SIZE;
            assert_eq!(hdr.len as usize, n, "used len must match header len");
            let mut data = vec![0u8; n];
            self.mem
                .read_slice(&mut data, GuestAddress(base + 64))
                .unwrap();
            self.inbox.push(Rx {
                op: Op::from_u16(hdr.op),
                hdr,
                data,
            });
        }
    }

    /// Takes everything delivered so far.
    pub fn recv(&mut self) -> Vec<Rx> {
        std::mem::take(&mut self.inbox)
    }

    pub fn tx_used_total(&self) -> u16 {
        self.tx.used.idx().load()
    }

    pub fn set_tx_avail_idx(&mut self, v: u16) {
        self.tx.avail.idx().store(v);
    }

    pub fn tx_avail_total(&self) -> u16 {
        self.tx.avail_idx
    }
}

/// A guest->host header with sensible defaults.
pub fn ghdr(op: Op, guest_port: u32, host_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        len: 0,
        type_: TYPE_STREAM,
        op: op.as_u16(),
        flags: 0,
        buf_alloc: 256 * 1024,
        fwd_cnt: 0,
    }
}
