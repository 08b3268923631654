//! The device core driven by a simulated guest driver: connection setup in
//! both directions, data, credit, shutdown, limits, transport restarts and
//! hostile descriptors.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use capsa_vsock::packet::{Header, Op, HEADER_SIZE, MAX_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND};
use capsa_vsock::Limits;
use common::{ghdr, Rx, Sim, GUEST_CID};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;

fn ops(rx: &[Rx]) -> Vec<Op> {
    rx.iter().map(|p| p.op.expect("known op")).collect()
}

fn nonblocking_read_all(s: &mut UnixStream) -> Vec<u8> {
    s.set_nonblocking(true).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    out
}

/// Guest connects to host port `port` from `guest_port`; returns the host
/// side of the connection.
fn guest_connect(sim: &mut Sim, listener: &UnixListener, guest_port: u32, port: u32) -> UnixStream {
    sim.send(ghdr(Op::Request, guest_port, port), &[]);
    sim.run();
    let got = sim.recv();
    assert_eq!(ops(&got), vec![Op::Response], "{got:?}");
    assert_eq!(got[0].hdr.dst_cid, GUEST_CID);
    assert_eq!(got[0].hdr.dst_port, guest_port);
    assert_eq!(got[0].hdr.src_port, port);
    assert_eq!(got[0].hdr.buf_alloc, Limits::default().buffer_size);
    let (s, _) = listener.accept().unwrap();
    s
}

/// Host client connects to guest `port`; the guest accepts. Returns the
/// host stream (after `OK`) and the host port the device chose.
fn host_connect(sim: &mut Sim, port: u32, guest_buf_alloc: u32) -> (UnixStream, u32) {
    let mut c = UnixStream::connect(&sim.uds).unwrap();
    c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    sim.run();
    let got = sim.recv();
    assert_eq!(ops(&got), vec![Op::Request], "{got:?}");
    let req = got[0].hdr;
    assert_eq!(req.dst_port, port);
    assert_eq!(req.dst_cid, GUEST_CID);
    let mut resp = ghdr(Op::Response, port, req.src_port);
    resp.buf_alloc = guest_buf_alloc;
    sim.send(resp, &[]);
    sim.run();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    while line.last() != Some(&b'\n') {
        c.read_exact(&mut b).unwrap();
        line.push(b[0]);
    }
    assert_eq!(
        String::from_utf8(line).unwrap(),
        format!("OK {}\n", req.src_port)
    );
    let extra = sim.recv();
    assert!(extra.is_empty(), "nothing else after accepting: {extra:?}");
    (c, req.src_port)
}

#[test]
fn guest_to_host_connect_and_data_both_ways() {
    let mut sim = Sim::new();
    sim.post_rx(32);
    let listener = UnixListener::bind(sim.port_path(5000)).unwrap();
    let mut host = guest_connect(&mut sim, &listener, 1234, 5000);

    let mut rw = ghdr(Op::Rw, 1234, 5000);
    rw.len = 5;
    sim.send(rw, b"hello");
    sim.run();
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");

    host.write_all(b"world").unwrap();
    sim.run();
    let got = sim.recv();
    assert_eq!(ops(&got), vec![Op::Rw]);
    assert_eq!(got[0].data, b"world");
    // Our credit info rides on every packet: 5 bytes forwarded so far.
    assert_eq!(got[0].hdr.fwd_cnt, 5);
}

#[test]
fn single_descriptor_packets_are_accepted() {
    // Linux >= 6.2 puts header and payload in one descriptor.
    let mut sim = Sim::new();
    sim.post_rx(8);
    let listener = UnixListener::bind(sim.port_path(5001)).unwrap();
    let mut host = guest_connect(&mut sim, &listener, 1, 5001);
    let mut rw = ghdr(Op::Rw, 1, 5001);
    rw.len = 3;
    sim.send_bytes(&rw.to_bytes(), b"abc", true).unwrap();
    sim.run();
    let mut buf = [0u8; 3];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"abc");
}

#[test]
fn unknown_host_port_gets_rst() {
    let mut sim = Sim::new();
    sim.post_rx(8);
    sim.send(ghdr(Op::Request, 1234, 4444), &[]);
    sim.run();
    let got = sim.recv();
    assert_eq!(ops(&got), vec![Op::Rst]);
    assert_eq!(got[0].hdr.dst_port, 1234);
    assert_eq!(got[0].hdr.src_port, 4444);
    assert_eq!(sim.mux.connection_count(), 0);
}

#[test]
fn packets_for_unknown_connections_get_rst_but_rst_does_not() {
    let mut sim = Sim::new();
    sim.post_rx(8);
    let mut rw = ghdr(Op::Rw, 7, 8);
    rw.len = 1;
    sim.send(rw, b"x");
    sim.send(ghdr(Op::Rst, 7, 8), &[]);
    sim.run();
    assert_eq!(ops(&sim.recv()), vec![Op::Rst]);
}

/// Two fresh devices (two clones restored from one snapshot, say) start at
/// different host ports, so neither reuses the port of a socket the
/// snapshot's guest still holds (see `ephemeral_start`).
#[test]
fn fresh_devices_start_at_random_host_ports() {
    let mut seen = Vec::new();
    for _ in 0..4 {
        let mut sim = Sim::new();
        sim.post_rx(8);
        let (_c, hp) = host_connect(&mut sim, 80, 4096);
        assert!((1 << 30..u32::MAX - 1).contains(&hp), "{hp}");
        seen.push(hp);
    }
    seen.sort_unstable();
    seen.dedup();
    assert!(seen.len() > 1, "every device started at {seen:?}");
}

#[test]
fn host_to_guest_connect_and_data_both_ways() {
    let mut sim = Sim::new();
    sim.post_rx(32);
    let (mut c, hp) = host_connect(&mut sim, 80, 64 * 1024);
    assert!(hp >= 1 << 30);
    c.write_all(b"ping").unwrap();
    sim.run();
    let got = sim.recv();
    assert_eq!(ops(&got), vec![Op::Rw]);
    assert_eq!(got[0].data, b"ping");
    assert_eq!(got[0].hdr.src_port, hp);

    let mut rw = ghdr(Op::Rw, 80, hp);
    rw.len = 4;
    sim.send(rw, b"pong");
    sim.run();
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
}

#[test]
fn data_sent_with_the_connect_line_is_kept() {
    let mut sim = Sim::new();
    sim.post_rx(8);
    let mut c = UnixStream::connect(&sim.uds).unwrap();
    c.write_all(b"CONNECT 9\nearly-bytes").unwrap();
    sim.run();
    let req = sim.recv()[0].hdr;
    sim.send(ghdr(Op::Response, 9, req.src_port), &[]);
    sim.run();
    let got = sim.recv();
    assert_eq!(ops(&got), vec![Op::Rw]);
    assert_eq!(got[0].data, b"early-bytes");
}

#[test]
fn data_queued_before_the_guest_accepts_is_delivered() {
    let mut sim = Sim::new();
    sim.post_rx(64);
    let mut c = UnixStream::connect(&sim.uds).unwrap();
    let early: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    c.write_all(b"CONNECT 9\n").unwrap();
    c.write_all(&early).unwrap();
    sim.run();
    let req = sim.recv()[0].hdr;
    sim.send(ghdr(Op::Response, 9, req.src_port), &[]);
    let mut got = Vec::new();
    for _ in 0..100 {
        sim.run();
        for p in sim.recv() {
            assert_eq!(p.op, Some(Op::Rw), "{p:?}");
            got.extend_from_slice(&p.data);
        }
        sim.post_rx(64 - sim.rx_posted());
        if got.len() >= early.len() {
            break;
        }
    }
    assert_eq!(got, early);
}

#[test]
fn host_connect_refused_by_guest_closes_stream() {
    let mut sim = Sim::new();
    sim.post_rx(8);
    let mut c = UnixStream::connect(&sim.uds).unwrap();
    c.write_all(b"CONNECT 81\n").unwrap();
    sim.run();
    let req = sim.recv()[0].hdr;
    sim.send(ghdr(Op::Rst, 81, req.src_port), &[]);
    sim.run();
    let mut out = String::new();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    c.read_to_string(&mut out).unwrap();
    assert_eq!(out, "", "no OK line on refusal");
    assert_eq!(sim.mux.connection_count(), 0);
}

#[test]
fn bad_connect_lines_are_closed() {
    let mut sim = Sim::new();
    sim.post_rx(8);
    for line in [
        "HELLO\n".to_string(),
        "CONNECT abc\n".into(),
        "CONNECT 99999999999\n".into(),
        "x".repeat(200),
    ] {
        let mut c = UnixStream::connect(&sim.uds).unwrap();
        let _ = c.write_all(line.as_bytes());
        sim.run();
        let mut out = Vec::new();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = c.read_to_end(&mut out);
        assert!(out.is_empty(), "{line:?}");
    }
    assert!(sim.recv().is_empty(), "nothing reaches the guest");
}

#[test]
fn host_to_guest_respects_guest_credit() {
    let mut sim = Sim::new();
    sim.post_rx(200);
    let buf_alloc = 10_000u32;
    let (mut c, hp) = host_connect(&mut sim, 90, buf_alloc);
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let writer = {
        let p = payload.clone();
        let mut c2 = c.try_clone().unwrap();
        std::thread::spawn(move || c2.write_all(&p))
    };
    let mut received = Vec::new();
    let mut fwd_cnt = 0u32;
    for _round in 0..200 {
        sim.run();
        let got = sim.recv();
        for p in &got {
            match p.op {
                Some(Op::Rw) => received.extend_from_slice(&p.data),
                Some(Op::CreditRequest) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        // The invariant: never more in flight than the guest's buffer.
        assert!(
            received.len() as u32 - fwd_cnt <= buf_alloc,
            "device overran guest credit: {} in flight",
            received.len() as u32 - fwd_cnt
        );
        if received.len() == payload.len() {
            break;
        }
        if received.len() as u32 - fwd_cnt == buf_alloc {
            // The guest application reads everything and tells the device.
            fwd_cnt = received.len() as u32;
            let mut cu = ghdr(Op::CreditUpdate, 90, hp);
            cu.buf_alloc = buf_alloc;
            cu.fwd_cnt = fwd_cnt;
            sim.send(cu, &[]);
        }
        sim.post_rx(200 - sim.rx_posted());
        std::thread::sleep(Duration::from_millis(1));
    }
    writer.join().unwrap().unwrap();
    assert_eq!(received, payload);
    drop(c.flush());
}

#[test]
fn credit_request_when_blocked_on_zero_credit() {
    let mut sim = Sim::new();
    sim.post_rx(16);
    let (mut c, _hp) = host_connect(&mut sim, 91, 4);
    c.write_all(b"12345678").unwrap();
    sim.run();
    let got = sim.recv();
    assert_eq!(ops(&got), vec![Op::Rw, Op::CreditRequest]);
    assert_eq!(got[0].data, b"1234");
}

#[test]
fn guest_exceeding_our_credit_is_reset() {
    let limits = Limits {
        buffer_size: 4096,
        ..Limits::default()
    };
    let mut sim = Sim::with_limits(limits);
    sim.post_rx(16);
    let listener = UnixListener::bind(sim.port_path(6000)).unwrap();
    sim.send(ghdr(Op::Request, 10, 6000), &[]);
    sim.run();
    assert_eq!(sim.recv()[0].hdr.buf_alloc, 4096);
    let (host, _) = listener.accept().unwrap();
    // Fill the host socket so nothing drains, then overrun our 4 KiB.
    let chunk = vec![7u8; 4096];
    let mut sent = 0usize;
    let mut reset = false;
    for _ in 0..2000 {
        let mut rw = ghdr(Op::Rw, 10, 6000);
        rw.len = chunk.len() as u32;
        sim.send(rw, &chunk);
        sim.post_rx(16 - sim.rx_posted());
        sim.run();
        sent += chunk.len();
        if ops(&sim.recv()).contains(&Op::Rst) {
            reset = true;
            break;
        }
    }
    assert!(reset, "overrun never detected after {sent} bytes");
    assert_eq!(sim.mux.connection_count(), 0);
    drop(host);
}

#[test]
fn credit_update_sent_as_host_consumes() {
    let limits = Limits {
        buffer_size: 16 * 1024,
        ..Limits::default()
    };
    let mut sim = Sim::with_limits(limits);
    sim.post_rx(16);
    let listener = UnixListener::bind(sim.port_path(6001)).unwrap();
    let mut host = guest_connect_limits(&mut sim, &listener, 11, 6001);
    let data = vec![1u8; 4000];
    let mut total = 0;
    for _ in 0..4 {
        let mut rw = ghdr(Op::Rw, 11, 6001);
        rw.len = data.len() as u32;
        sim.send(rw, &data);
        total += data.len();
    }
    sim.run();
    // Forwarded straight into the socket: a credit update follows once a
    // quarter of the buffer has moved.
    let got = sim.recv();
    let cu: Vec<&Rx> = got
        .iter()
        .filter(|p| p.op == Some(Op::CreditUpdate))
        .collect();
    assert!(!cu.is_empty(), "{got:?}");
    assert_eq!(cu.last().unwrap().hdr.fwd_cnt as usize, total);
    let got_bytes = nonblocking_read_all(&mut host);
    assert_eq!(got_bytes.len(), total);
}

fn guest_connect_limits(
    sim: &mut Sim,
    listener: &UnixListener,
    guest_port: u32,
    port: u32,
) -> UnixStream {
    sim.send(ghdr(Op::Request, guest_port, port), &[]);
    sim.run();
    assert_eq!(ops(&sim.recv()), vec![Op::Response]);
    listener.accept().unwrap().0
}

#[test]
fn shutdown_half_close_and_full_close() {
    let mut sim = Sim::new();
    sim.post_rx(16);
    let listener = UnixListener::bind(sim.port_path(7000)).unwrap();
    let mut host = guest_connect(&mut sim, &listener, 20, 7000);
    let mut rw = ghdr(Op::Rw, 20, 7000);
    rw.len = 3;
    sim.send(rw, b"req");
    let mut sd = ghdr(Op::Shutdown, 20, 7000);
    sd.flags = SHUTDOWN_SEND;
    sim.send(sd, &[]);
    sim.run();
    // Host sees the data then EOF, and can still answer.
    let mut got = Vec::new();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    host.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"req");
    host.write_all(b"resp").unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap();
    sim.run();
    let pkts = sim.recv();
    assert_eq!(ops(&pkts), vec![Op::Rw, Op::Shutdown]);
    assert_eq!(pkts[0].data, b"resp");
    assert_eq!(pkts[1].hdr.flags, SHUTDOWN_SEND);
    // The guest closes: SHUTDOWN both -> device completes with RST.
    sd.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    sim.send(sd, &[]);
    sim.run();
    assert_eq!(ops(&sim.recv()), vec![Op::Rst]);
    assert_eq!(sim.mux.connection_count(), 0);
}

#[test]
fn guest_rst_closes_host_stream() {
    let mut sim = Sim::new();
    sim.post_rx(16);
    let listener = UnixListener::bind(sim.port_path(7001)).unwrap();
    let mut host = guest_connect(&mut sim, &listener, 21, 7001);
    sim.send(ghdr(Op::Rst, 21, 7001), &[]);
    sim.run();
    assert!(sim.recv().is_empty());
    let mut out = Vec::new();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    host.read_to_end(&mut out).unwrap();
    assert_eq!(sim.mux.connection_count(), 0);
}

#[test]
fn host_close_resets_guest_on_next_write() {
    let mut sim = Sim::new();
    sim.post_rx(16);
    let listener = UnixListener::bind(sim.port_path(7002)).unwrap();
    let host = guest_connect(&mut sim, &listener, 22, 7002);
    drop(host);
    sim.run();
    // EOF from the host becomes SHUTDOWN(SEND).
    let got = sim.recv();
    assert_eq!(ops(&got), vec![Op::Shutdown]);
    let mut rw = ghdr(Op::Rw, 22, 7002);
    rw.len = 1;
    sim.send(rw, b"x");
    sim.run();
    assert_eq!(ops(&sim.recv()), vec![Op::Rst]);
}

#[test]
fn many_concurrent_connections_per_port() {
    let mut sim = Sim::new();
    sim.post_rx(200);
    let listener = UnixListener::bind(sim.port_path(8000)).unwrap();
    let mut hosts = Vec::new();
    for gp in 0..64u32 {
        sim.send(ghdr(Op::Request, 10_000 + gp, 8000), &[]);
    }
    sim.run();
    let got = sim.recv();
    assert_eq!(got.len(), 64);
    assert!(got.iter().all(|p| p.op == Some(Op::Response)));
    for _ in 0..64 {
        hosts.push(listener.accept().unwrap().0);
    }
    assert_eq!(sim.mux.connection_count(), 64);
    // Each host stream answers with its own identity; check routing.
    for gp in 0..64u32 {
        let msg = format!("to-{gp}");
        let mut rw = ghdr(Op::Rw, 10_000 + gp, 8000);
        rw.len = msg.len() as u32;
        sim.send(rw, msg.as_bytes());
    }
    sim.run();
    for h in hosts.iter_mut() {
        let mut b = Vec::new();
        h.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 64];
        let n = h.read(&mut buf).unwrap();
        b.extend_from_slice(&buf[..n]);
        let s = String::from_utf8(b).unwrap();
        let gp: u32 = s.trim_start_matches("to-").parse().unwrap();
        h.write_all(format!("from-{gp}").as_bytes()).unwrap();
    }
    sim.post_rx(200 - sim.rx_posted());
    sim.run();
    let got = sim.recv();
    assert_eq!(got.len(), 64);
    for p in got {
        assert_eq!(p.op, Some(Op::Rw));
        let s = String::from_utf8(p.data).unwrap();
        assert_eq!(s, format!("from-{}", p.hdr.dst_port - 10_000));
    }
}

#[test]
fn connection_limit_refuses_with_rst_and_close() {
    let limits = Limits {
        max_connections: 4,
        ..Limits::default()
    };
    let mut sim = Sim::with_limits(limits);
    sim.post_rx(32);
    let listener = UnixListener::bind(sim.port_path(8100)).unwrap();
    for gp in 0..5u32 {
        sim.send(ghdr(Op::Request, 100 + gp, 8100), &[]);
    }
    sim.run();
    let got = sim.recv();
    let rst: Vec<&Rx> = got.iter().filter(|p| p.op == Some(Op::Rst)).collect();
    assert_eq!(got.len(), 5);
    assert_eq!(rst.len(), 1);
    assert_eq!(rst[0].hdr.dst_port, 104, "the fifth request is refused");
    assert_eq!(sim.mux.connection_count(), 4);
    // A host client beyond the limit is closed without a handshake.
    let mut c = UnixStream::connect(&sim.uds).unwrap();
    sim.run();
    let mut out = Vec::new();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = c.read_to_end(&mut out);
    assert!(out.is_empty());
    assert!(sim.stats.refused.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    drop(listener);
}

#[test]
fn rst_backlog_is_bounded_without_rx_buffers() {
    // A guest spamming connection requests without posting RX buffers must
    // not make the device queue unbounded replies: TX stalls instead.
    let mut sim = Sim::new();
    let mut pushed = 0;
    for round in 0..4 {
        for i in 0..200u32 {
            if sim
                .send_bytes(
                    &ghdr(Op::Request, round * 1000 + i, 1).to_bytes(),
                    &[],
                    false,
                )
                .is_some()
            {
                pushed += 1;
            }
        }
        sim.run();
    }
    let consumed = sim.tx_used_total() as usize;
    assert!(consumed < pushed, "consumed {consumed} of {pushed}");
    assert!(consumed <= 256 + 1, "backlog grew to {consumed}");
    // Once the guest provides buffers, the device drains and resumes.
    for _ in 0..20 {
        sim.post_rx(256 - sim.rx_posted());
        sim.run();
    }
    let resets = sim.recv().len();
    assert_eq!(sim.tx_used_total() as usize, pushed);
    assert_eq!(resets, pushed);
}

#[test]
fn transport_restart_probes_and_drops_forgotten_connections() {
    let mut sim = Sim::new();
    sim.post_rx(16);
    let listener = UnixListener::bind(sim.port_path(9000)).unwrap();
    let mut alive = guest_connect(&mut sim, &listener, 30, 9000);
    let mut forgotten = guest_connect(&mut sim, &listener, 31, 9000);
    sim.mux.transport_stopped();
    sim.run();
    let got = sim.recv();
    assert_eq!(ops(&got), vec![Op::CreditRequest, Op::CreditRequest]);
    // One guest socket survived (pause), the other was lost (driver reset).
    sim.send(ghdr(Op::CreditUpdate, 30, 9000), &[]);
    sim.send(ghdr(Op::Rst, 31, 9000), &[]);
    sim.run();
    assert_eq!(sim.mux.connection_count(), 1);
    let mut out = Vec::new();
    forgotten
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    forgotten.read_to_end(&mut out).unwrap();
    alive.write_all(b"still here").unwrap();
    sim.run();
    assert_eq!(sim.recv()[0].data, b"still here");
}

#[test]
fn reset_all_closes_everything() {
    let mut sim = Sim::new();
    sim.post_rx(16);
    let listener = UnixListener::bind(sim.port_path(9100)).unwrap();
    let mut a = guest_connect(&mut sim, &listener, 40, 9100);
    let (mut b, _) = host_connect(&mut sim, 41, 4096);
    let mut pending = UnixStream::connect(&sim.uds).unwrap();
    sim.run();
    sim.mux.reset_all("test");
    assert_eq!(sim.mux.connection_count(), 0);
    for s in [&mut a, &mut b, &mut pending] {
        let mut out = Vec::new();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.read_to_end(&mut out).unwrap();
    }
    // And the device keeps working afterwards.
    guest_connect(&mut sim, &listener, 42, 9100);
}

#[test]
fn host_connect_times_out_when_guest_never_answers() {
    let limits = Limits {
        connect_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let mut sim = Sim::with_limits(limits);
    sim.post_rx(16);
    let mut c = UnixStream::connect(&sim.uds).unwrap();
    c.write_all(b"CONNECT 5\n").unwrap();
    sim.run();
    assert_eq!(ops(&sim.recv()), vec![Op::Request]);
    std::thread::sleep(Duration::from_millis(700));
    sim.run();
    assert_eq!(ops(&sim.recv()), vec![Op::Rst]);
    let mut out = Vec::new();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    c.read_to_end(&mut out).unwrap();
    assert!(out.is_empty());
}

// ----- hostile descriptors -------------------------------------------------

/// After any abuse the device must still serve a normal connection.
fn assert_still_works(sim: &mut Sim, port: u32) {
    let listener = UnixListener::bind(sim.port_path(port)).unwrap();
    sim.post_rx(8);
    sim.recv();
    guest_connect(sim, &listener, 60_000, port);
}

fn malformed(sim: &Sim) -> u64 {
    sim.stats
        .malformed
        .load(std::sync::atomic::Ordering::Relaxed)
}

#[test]
fn hostile_truncated_header() {
    let mut sim = Sim::new();
    sim.post_rx(8);
    let h = ghdr(Op::Request, 1, 2).to_bytes();
    sim.send_bytes(&h[..HEADER_SIZE - 1], &[], true).unwrap();
    sim.run();
    assert!(sim.recv().is_empty());
    assert_eq!(sim.tx_used_total(), 1, "buffer returned to the guest");
    assert_eq!(malformed(&sim), 1);
    assert_still_works(&mut sim, 100);
}

#[test]
fn hostile_len_larger_than_buffer() {
    let mut sim = Sim::new();
    sim.post_rx(8);
    let listener = UnixListener::bind(sim.port_path(101)).unwrap();
    let mut host = guest_connect(&mut sim, &listener, 1, 101);
    let mut rw = ghdr(Op::Rw, 1, 101);
    rw.len = 1000;
    sim.send(rw, b"only ten b");
    sim.run();
    // Stream bytes would be lost: the connection is reset, nothing forwarded.
    assert_eq!(ops(&sim.recv()), vec![Op::Rst]);
    assert!(nonblocking_read_all(&mut host).is_empty());
    let mut rw = ghdr(Op::Rw, 1, 101);
    rw.len = MAX_PAYLOAD + 1;
    sim.send(rw, b"x");
    sim.run();
    assert_eq!(ops(&sim.recv()), vec![Op::Rst]);
    assert_still_works(&mut sim, 102);
}

#[test]
fn hostile_garbage_ops_and_types() {
    let mut sim = Sim::new();
    sim.post_rx(16);
    let mut h = ghdr(Op::Request, 1, 2);
    h.op = 0xbeef;
    sim.send(h, &[]);
    let mut h = ghdr(Op::Request, 1, 2);
    h.type_ = 2; // SEQPACKET, not offered
    sim.send(h, &[]);
    let mut h = ghdr(Op::Request, 1, 2);
    h.dst_cid = 99;
    sim.send(h, &[]);
    let mut h = ghdr(Op::Request, 1, 2);
    h.src_cid = 77; // spoofed: dropped without reply
    sim.send(h, &[]);
    sim.run();
    assert_eq!(ops(&sim.recv()), vec![Op::Rst, Op::Rst, Op::Rst]);
    assert_still_works(&mut sim, 103);
}

#[test]
fn hostile_absurd_chain_length() {
    let mut sim = Sim::new();
    sim.post_rx(8);
    let base = sim.tx_free_slot_addr();
    sim.mem_write(base, &ghdr(Op::Request, 1, 2).to_bytes());
    let descs: Vec<(u64, u32, u16)> = (0..200).map(|_| (base, 1, 0)).collect();
    sim.push_tx_chain(&descs).unwrap();
    sim.run();
    assert!(sim.recv().is_empty());
    assert_eq!(malformed(&sim), 1);
    assert_still_works(&mut sim, 104);
}

#[test]
fn hostile_looping_chain() {
    let mut sim = Sim::new();
    sim.post_rx(8);
    let base = sim.tx_free_slot_addr();
    sim.mem_write(base, &ghdr(Op::Request, 1, 2).to_bytes());
    // Descriptor 250 -> 251 -> 250 -> ...
    let f = VRING_DESC_F_NEXT as u16;
    sim.push_tx_raw(
        &[
            (250, SplitDescriptor::new(base, 44, f, 251)),
            (251, SplitDescriptor::new(base, 4, f, 250)),
        ],
        250,
    );
    sim.run();
    assert!(sim.recv().is_empty());
    assert_still_works(&mut sim, 105);
}

#[test]
fn hostile_addresses_and_directions() {
    let mut sim = Sim::new();
    sim.post_rx(8);
    // Header outside guest memory.
    sim.push_tx_chain(&[(u64::MAX - 10, 44, 0)]).unwrap();
    sim.push_tx_chain(&[(1 << 40, 44, 0)]).unwrap();
    // Device-writable descriptor on the TX queue.
    let base = sim.tx_free_slot_addr();
    sim.mem_write(base, &ghdr(Op::Request, 1, 2).to_bytes());
    sim.push_tx_chain(&[(base, 44, VRING_DESC_F_WRITE as u16)])
        .unwrap();
    // Payload descriptor wrapping the address space.
    let mut rw = ghdr(Op::Rw, 1, 2);
    rw.len = 100;
    let base = sim.tx_free_slot_addr();
    sim.mem_write(base, &rw.to_bytes());
    sim.push_tx_chain(&[(base, 44, 0), (u64::MAX - 50, 100, 0)])
        .unwrap();
    // Huge descriptor lengths that would overflow a naive sum.
    sim.push_tx_chain(&[(base, u32::MAX, 0), (base, u32::MAX, 0)])
        .unwrap();
    sim.run();
    assert_eq!(sim.tx_used_total(), 5, "every buffer is returned");
    assert!(malformed(&sim) >= 4);
    sim.recv();
    assert_still_works(&mut sim, 106);
}

#[test]
fn hostile_avail_index_does_not_spin() {
    // An avail index more than a queue size ahead is refused by
    // virtio-queue; the device must give up on the queue, not loop forever.
    let mut sim = Sim::new();
    sim.post_rx(8);
    let good = sim.tx_avail_total();
    sim.set_tx_avail_idx(good.wrapping_add(1000));
    let t = std::time::Instant::now();
    sim.run();
    assert!(t.elapsed() < Duration::from_secs(5));
    // Once the guest fixes its ring, service resumes.
    sim.set_tx_avail_idx(good);
    assert_still_works(&mut sim, 108);
}

#[test]
fn hostile_rx_buffers() {
    let mut sim = Sim::new();
    // A readable RX descriptor, a too-small buffer, one outside memory.
    sim.push_rx_chain(&[(0x20_0000, 4096, 0)]).unwrap();
    sim.push_rx_chain(&[(0x20_0000, 10, VRING_DESC_F_WRITE as u16)])
        .unwrap();
    sim.push_rx_chain(&[(1 << 40, 4096, VRING_DESC_F_WRITE as u16)])
        .unwrap();
    sim.send(ghdr(Op::Request, 1, 2), &[]);
    sim.run();
    assert!(malformed(&sim) >= 3, "{}", malformed(&sim));
    // The RST waits for a usable buffer.
    sim.post_rx(2);
    sim.run();
    assert_eq!(ops(&sim.recv()), vec![Op::Rst]);
    assert_still_works(&mut sim, 107);
}

#[test]
fn hostile_credit_fields_never_overflow() {
    let mut sim = Sim::new();
    sim.post_rx(64);
    let (mut c, hp) = host_connect(&mut sim, 200, 0);
    // buf_alloc 0: nothing may be sent, only a credit request.
    c.write_all(&[1u8; 1000]).unwrap();
    sim.run();
    assert_eq!(ops(&sim.recv()), vec![Op::CreditRequest]);
    // fwd_cnt far ahead of what was sent: must not be read as huge credit.
    let mut cu = ghdr(Op::CreditUpdate, 200, hp);
    cu.buf_alloc = 100;
    cu.fwd_cnt = 0x8000_0000;
    sim.send(cu, &[]);
    sim.run();
    let got = sim.recv();
    assert!(got.iter().all(|p| p.op != Some(Op::Rw)), "{got:?}");
    // Honest credit resumes the stream, capped at buf_alloc.
    cu.fwd_cnt = 0;
    sim.send(cu, &[]);
    sim.run();
    let got = sim.recv();
    let sent: usize = got.iter().map(|p| p.data.len()).sum();
    assert_eq!(sent, 100);
}

#[test]
fn memory_stays_bounded_under_slow_host() {
    // Host never reads; guest keeps within credit. Buffered bytes stay at
    // or below buf_alloc because anything more is a violation.
    let limits = Limits {
        buffer_size: 64 * 1024,
        ..Limits::default()
    };
    let mut sim = Sim::with_limits(limits);
    sim.post_rx(64);
    let listener = UnixListener::bind(sim.port_path(300)).unwrap();
    let _host = guest_connect_limits(&mut sim, &listener, 1, 300);
    let chunk = vec![0u8; 16 * 1024];
    let mut sent = 0u32;
    let mut fwd = 0u32;
    for _ in 0..200 {
        // Honest guest: only send within the credit we were told.
        if sent - fwd + chunk.len() as u32 > 64 * 1024 {
            sim.run();
            for p in sim.recv() {
                fwd = fwd.max(p.hdr.fwd_cnt);
            }
            if sent - fwd + chunk.len() as u32 > 64 * 1024 {
                break;
            }
        }
        let mut rw = ghdr(Op::Rw, 1, 300);
        rw.len = chunk.len() as u32;
        sim.send(rw, &chunk);
        sent += chunk.len() as u32;
        sim.run();
    }
    assert_eq!(sim.mux.connection_count(), 1, "honest guest never reset");
    // Socket buffer plus at most buf_alloc in the device.
    assert!(sent - fwd <= 64 * 1024);
}

#[test]
fn event_idx_queues_work() {
    let mut sim = Sim::new();
    sim.enable_event_idx();
    sim.post_rx(8);
    let listener = UnixListener::bind(sim.port_path(400)).unwrap();
    let mut host = guest_connect(&mut sim, &listener, 1, 400);
    host.write_all(b"idx").unwrap();
    sim.run();
    assert_eq!(sim.recv()[0].data, b"idx");
}

#[test]
fn rx_header_fields_are_complete() {
    let mut sim = Sim::new();
    sim.post_rx(8);
    sim.send(ghdr(Op::Request, 5, 6), &[]);
    sim.run();
    let h: Header = sim.recv()[0].hdr;
    assert_eq!(h.src_cid, 2);
    assert_eq!(h.dst_cid, GUEST_CID);
    assert_eq!(h.type_, 1);
    assert_eq!(h.len, 0);
}

#[test]
fn accept_storm_beyond_one_batch() {
    let mut sim = Sim::new();
    sim.post_rx(128);
    let clients: Vec<UnixStream> = (0..150)
        .map(|_| {
            let mut c = UnixStream::connect(&sim.uds).unwrap();
            c.write_all(b"CONNECT 77\n").unwrap();
            c
        })
        .collect();
    let mut requests = 0;
    for _ in 0..10 {
        sim.run();
        requests += sim
            .recv()
            .iter()
            .filter(|p| p.op == Some(Op::Request))
            .count();
        sim.post_rx(128 - sim.rx_posted());
    }
    assert_eq!(requests, clients.len());
}

#[test]
fn unsent_request_times_out_silently() {
    let limits = Limits {
        connect_timeout: Duration::from_millis(200),
        ..Limits::default()
    };
    let mut sim = Sim::with_limits(limits);
    // No RX buffers: the REQUEST cannot be delivered.
    let mut c = UnixStream::connect(&sim.uds).unwrap();
    c.write_all(b"CONNECT 5\n").unwrap();
    sim.run();
    std::thread::sleep(Duration::from_millis(500));
    sim.run();
    let mut out = Vec::new();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    c.read_to_end(&mut out).unwrap();
    assert!(out.is_empty());
    sim.post_rx(8);
    sim.run();
    assert!(sim.recv().is_empty(), "nothing owed to the guest");
}
