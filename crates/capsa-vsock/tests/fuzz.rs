//! Property tests: the header parser on arbitrary bytes, and the whole device
//! core on arbitrary descriptor tables and packet sequences. The properties
//! are "never panics, never hangs, returns every buffer, keeps working".

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::UnixListener;

use capsa_vsock::packet::{classify, Header, Op, Reject, HEADER_SIZE, MAX_PAYLOAD};
use capsa_vsock::Limits;
use common::{ghdr, Sim, GUEST_CID};
use proptest::prelude::*;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn parser_never_panics_and_roundtrips(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
        match Header::parse(&bytes) {
            None => prop_assert!(bytes.len() < HEADER_SIZE),
            Some(h) => {
                prop_assert_eq!(&h.to_bytes()[..], &bytes[..HEADER_SIZE]);
                match classify(&h, GUEST_CID) {
                    Ok(p) => {
                        prop_assert_eq!(h.src_cid, GUEST_CID);
                        prop_assert!(p.len <= MAX_PAYLOAD);
                        prop_assert!(p.flags <= 3);
                        prop_assert!(p.op != Op::Rw || p.len == h.len);
                    }
                    // Resets are never answered with resets.
                    Err(Reject::Reset(_)) => prop_assert_ne!(h.op, Op::Rst.as_u16()),
                    Err(Reject::Drop(_)) => {}
                }
            }
        }
    }
}

fn arb_desc() -> impl Strategy<Value = (u64, u32, u16, u16)> {
    (
        prop_oneof![
            // Inside guest memory (32 MiB), at the edge, or far outside.
            0u64..(32 << 20),
            (32u64 << 20) - 64..(32u64 << 20) + 64,
            any::<u64>(),
        ],
        prop_oneof![0u32..256, 0u32..70_000, any::<u32>()],
        // NEXT=1, WRITE=2, INDIRECT=4 and junk bits.
        prop_oneof![0u16..8, any::<u16>()],
        prop_oneof![240u16..256, any::<u16>()],
    )
}

fn arb_header() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), HEADER_SIZE),
        (
            0u16..9,
            0u16..3,
            any::<u32>(),
            0u32..4,
            prop_oneof![Just(GUEST_CID), any::<u64>()]
        )
            .prop_map(|(op, ty, len, port, src)| {
                let mut h = ghdr(Op::Rw, port, 7);
                h.op = op;
                h.type_ = ty;
                h.len = len;
                h.src_cid = src;
                h.to_bytes().to_vec()
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Arbitrary descriptor tables (loops, indirect flags, bad addresses,
    /// wrong directions, huge lengths) with arbitrary headers in guest memory.
    #[test]
    fn device_survives_random_descriptor_tables(
        descs in proptest::collection::vec(arb_desc(), 1..16),
        headers in proptest::collection::vec(arb_header(), 1..16),
        heads in proptest::collection::vec(240u16..256, 1..16),
    ) {
        let mut sim = Sim::new();
        sim.post_rx(8);
        for (i, h) in headers.iter().enumerate() {
            sim.mem_write(0x80_0000 + (i as u64) * 0x100, h);
        }
        // Descriptors live at indexes 240..256; point some at the headers.
        let table: Vec<(u16, SplitDescriptor)> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags, next))| {
                let addr = if i < headers.len() && addr % 3 == 0 {
                    0x80_0000 + (i as u64) * 0x100
                } else {
                    addr
                };
                (240 + i as u16, SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        for &h in &heads {
            sim.push_tx_raw(&table, h);
        }
        sim.run();
        prop_assert_eq!(sim.tx_used_total() as usize, heads.len(), "every chain returned");
        sim.recv();
        // Still serving.
        let l = UnixListener::bind(sim.port_path(9999)).unwrap();
        sim.post_rx(8);
        sim.send(ghdr(Op::Request, 1, 9999), &[]);
        sim.run();
        prop_assert!(sim.recv().iter().any(|p| p.op == Some(Op::Response)));
        drop(l);
    }

    /// Random but well-formed packet sequences across a few ports, with
    /// host programs writing into every accepted stream: the device never
    /// panics, never exceeds the connection limit, and never sends a
    /// connection more than the credit the guest last granted.
    #[test]
    fn device_survives_random_packet_sequences(
        pkts in proptest::collection::vec(
            (
                1u16..8,
                0u32..4,
                0u32..3,
                0u32..4,
                0u32..2048,
                prop_oneof![Just(0u32), 0u32..20_000, any::<u32>()],
                0u32..5000,
            ),
            1..80,
        ),
    ) {
        let limits = Limits { max_connections: 6, buffer_size: 4096, ..Limits::default() };
        let mut sim = Sim::with_limits(limits);
        let listeners: Vec<UnixListener> = (0..3)
            .map(|p| {
                let l = UnixListener::bind(sim.port_path(p)).unwrap();
                l.set_nonblocking(true).unwrap();
                l
            })
            .collect();
        let mut hosts = Vec::new();
        sim.post_rx(64);
        let payload = vec![0xabu8; 2048];
        // (guest port, host port) -> (bytes sent to guest, fwd_cnt, buf_alloc)
        let mut acct: HashMap<(u32, u32), (u32, u32, u32)> = HashMap::new();
        for (op, gport, hport, flags, len, fwd, buf_alloc) in pkts {
            let mut h = ghdr(Op::Rw, gport, hport);
            h.op = op;
            h.flags = flags;
            h.len = if op == Op::Rw.as_u16() { len } else { 0 };
            h.fwd_cnt = fwd;
            h.buf_alloc = buf_alloc;
            let e = acct.entry((gport, hport)).or_insert((0, 0, 0));
            if op == Op::Request.as_u16() {
                e.0 = 0;
            }
            e.1 = fwd;
            e.2 = buf_alloc;
            sim.send(h, &payload[..h.len as usize]);
            sim.run();
            for l in &listeners {
                while let Ok((s, _)) = l.accept() {
                    s.set_nonblocking(true).unwrap();
                    hosts.push(s);
                }
            }
            for s in &mut hosts {
                let _ = s.write(&payload);
            }
            sim.run();
            prop_assert!(sim.mux.connection_count() <= 6);
            for p in sim.recv() {
                prop_assert_eq!(p.hdr.dst_cid, GUEST_CID);
                if p.op == Some(Op::Rw) {
                    let e = acct.entry((p.hdr.dst_port, p.hdr.src_port)).or_insert((0, 0, 0));
                    e.0 = e.0.wrapping_add(p.hdr.len);
                    let in_flight = e.0.wrapping_sub(e.1);
                    prop_assert!(in_flight <= e.2, "credit overrun: {} in flight, buf_alloc {}", in_flight, e.2);
                }
            }
            sim.post_rx(64 - sim.rx_posted());
        }
    }
}
