//! One vsock stream connection: its state machine, both byte directions and
//! the credit accounting for each.
//!
//! Guest -> host: the guest may only send as much as our advertised
//! `buf_alloc` minus what is still buffered here, so `to_host` can never
//! exceed `buf_alloc`; a guest that sends more is violating the protocol and
//! is reset. `fwd_cnt` counts bytes handed to the host socket and goes back
//! to the guest in every header, plus explicit CREDIT_UPDATEs once a quarter
//! of the buffer has drained.
//!
//! Host -> guest: bytes read from the host socket are staged (bounded) and
//! only sent while the guest's credit (`peer_buf_alloc - (tx_cnt -
//! peer_fwd_cnt)`) allows, which is the guarantee the guest's receive queue
//! relies on.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use crate::packet::{Header, Op, HOST_CID, MAX_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// Identifies a connection: host CID and guest CID are fixed per device, so
/// the two ports are enough.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Port on the host side (CID 2).
    pub host_port: u32,
    /// Port on the guest side.
    pub guest_port: u32,
}

impl ConnKey {
    /// A reset addressed to the guest end of this connection.
    pub fn rst_to_guest(&self, guest_cid: u64) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.host_port,
            dst_port: self.guest_port,
            type_: TYPE_STREAM,
            op: Op::Rst.as_u16(),
            ..Header::default()
        }
    }
}

/// Lifecycle of a connection once both ends are known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// A host client asked for a guest port; waiting for the guest's RESPONSE.
    Connecting {
        /// Give up (RST to guest, close host) after this.
        deadline: Instant,
    },
    /// Data flows.
    Established,
    /// The guest shut down both directions; flushing buffered guest data to
    /// the host before answering with the RST that completes the close.
    Closing {
        /// Reset even if the host never reads the rest.
        deadline: Instant,
    },
}

/// Why a connection must be reset.
#[derive(Debug)]
pub enum Fault {
    /// The guest sent more than its credit allowed.
    CreditViolation,
    /// The guest sent something the current state does not allow.
    Protocol(&'static str),
    /// The host socket failed.
    Io(io::Error),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::CreditViolation => f.write_str("guest exceeded its credit"),
            Fault::Protocol(what) => write!(f, "protocol violation: {what}"),
            Fault::Io(e) => write!(f, "host socket error: {e}"),
        }
    }
}

/// One connection between a guest port and a host Unix stream.
pub struct Connection {
    /// The two ports.
    pub key: ConnKey,
    /// Epoll token of `stream`.
    pub token: u64,
    /// Host side, non-blocking.
    pub stream: UnixStream,
    /// Current state.
    pub state: State,
    /// Whether this connection sits in the muxer's ready list.
    pub queued: bool,

    // Guest -> host.
    /// Bytes written to the host before any guest data (`OK <port>\n`).
    preamble: Vec<u8>,
    /// Guest data not yet accepted by the host socket; at most `buf_alloc`.
    to_host: VecDeque<u8>,
    /// Guest bytes handed to the host socket.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_sent: Wrapping<u32>,
    /// Guest said it will send no more.
    guest_shut_send: bool,
    /// We already shut down the host socket's write side.
    host_write_shut: bool,

    // Host -> guest.
    /// Host data waiting for guest credit and RX buffers.
    staged: VecDeque<u8>,
    /// Host closed its write side (read returned 0).
    host_eof: bool,
    /// Guest said it will receive no more.
    guest_shut_rcv: bool,
    /// We told the guest the host will send no more.
    shutdown_sent: bool,
    /// Guest receive buffer size.
    peer_buf_alloc: u32,
    /// Guest consumed counter.
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    tx_cnt: Wrapping<u32>,

    // Control packets owed to the guest.
    need_request: bool,
    need_response: bool,
    need_credit_update: bool,
    need_probe: bool,
    credit_request_sent: bool,

    // Edge-triggered readiness of `stream`.
    /// The socket may have data (cleared on `WouldBlock`).
    pub readable: bool,
    /// The socket may accept data (cleared on `WouldBlock`).
    pub writable: bool,
}

impl Connection {
    /// A connection the guest asked for; it is accepted, so a RESPONSE is owed.
    pub fn guest_initiated(
        key: ConnKey,
        token: u64,
        stream: UnixStream,
        peer_buf_alloc: u32,
        peer_fwd_cnt: u32,
    ) -> Self {
        let mut c = Self::new(key, token, stream, State::Established);
        c.need_response = true;
        c.peer_buf_alloc = peer_buf_alloc;
        c.peer_fwd_cnt = Wrapping(peer_fwd_cnt);
        c
    }

    /// A connection a host client asked for; a REQUEST is owed to the guest.
    /// `early` holds bytes the client sent right after its `CONNECT` line.
    pub fn host_initiated(
        key: ConnKey,
        token: u64,
        stream: UnixStream,
        deadline: Instant,
        early: &[u8],
    ) -> Self {
        let mut c = Self::new(key, token, stream, State::Connecting { deadline });
        c.need_request = true;
        c.staged.extend(early);
        c
    }

    fn new(key: ConnKey, token: u64, stream: UnixStream, state: State) -> Self {
        Connection {
            key,
            token,
            stream,
            state,
            queued: false,
            preamble: Vec::new(),
            to_host: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            guest_shut_send: false,
            host_write_shut: false,
            staged: VecDeque::new(),
            host_eof: false,
            guest_shut_rcv: false,
            shutdown_sent: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            need_request: false,
            need_response: false,
            need_credit_update: false,
            need_probe: false,
            credit_request_sent: false,
            readable: true,
            writable: true,
        }
    }

    /// Records the credit information every guest packet carries.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        let before = self.peer_credit();
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
        if self.peer_credit() > before {
            // Credit arrived: a later stall deserves a new CREDIT_REQUEST.
            self.credit_request_sent = false;
        }
    }

    /// Bytes the guest can still receive. A guest reporting nonsense (more
    /// consumed than sent, or a shrunken buffer) gets zero, never a wrap.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest bytes buffered for the host.
    pub fn to_host_len(&self) -> usize {
        self.to_host.len() + self.preamble.len()
    }

    /// Whether the guest has heard of this connection (false only while our
    /// REQUEST is still queued).
    pub fn guest_knows(&self) -> bool {
        !self.need_request
    }

    /// The guest accepted our REQUEST.
    pub fn on_response(&mut self) -> Result<(), Fault> {
        match self.state {
            State::Connecting { .. } => {
                self.state = State::Established;
                self.preamble = format!("OK {}\n", self.key.host_port).into_bytes();
                Ok(())
            }
            _ => Err(Fault::Protocol("RESPONSE on an open connection")),
        }
    }

    /// The guest asked for our credit.
    pub fn on_credit_request(&mut self) {
        self.need_credit_update = true;
    }

    /// The liveness probe after a transport restart; see
    /// [`crate::muxer::Muxer::transport_stopped`].
    pub fn request_probe(&mut self) {
        if self.state == State::Established {
            self.need_probe = true;
        }
    }

    /// Applies a guest SHUTDOWN. Returns true when the guest has now closed
    /// both directions, which the caller turns into [`State::Closing`].
    pub fn on_shutdown(&mut self, flags: u32, close_deadline: Instant) -> Result<(), Fault> {
        if let State::Connecting { .. } = self.state {
            return Err(Fault::Protocol("SHUTDOWN before RESPONSE"));
        }
        if flags & SHUTDOWN_RCV != 0 {
            // Nobody will read what the host still sends.
            self.guest_shut_rcv = true;
            self.staged.clear();
        }
        if flags & SHUTDOWN_SEND != 0 {
            self.guest_shut_send = true;
        }
        if self.guest_shut_rcv && self.guest_shut_send && self.state == State::Established {
            self.state = State::Closing {
                deadline: close_deadline,
            };
        }
        Ok(())
    }

    /// Accepts guest payload, writing straight to the host socket when
    /// nothing is queued ahead of it and buffering the rest.
    pub fn on_guest_data(&mut self, data: &[u8], buf_alloc: u32) -> Result<(), Fault> {
        if self.state != State::Established {
            return Err(Fault::Protocol("data outside an established connection"));
        }
        if self.guest_shut_send {
            return Err(Fault::Protocol("data after SHUTDOWN(SEND)"));
        }
        if self.to_host.len().saturating_add(data.len()) > buf_alloc as usize {
            return Err(Fault::CreditViolation);
        }
        let mut rest = data;
        if self.to_host_len() == 0 && self.writable && !rest.is_empty() {
            match self.stream.write(rest) {
                Ok(n) => {
                    self.fwd_cnt += Wrapping(n as u32);
                    rest = &rest[n..];
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Fault::Io(e)),
            }
        }
        self.to_host.extend(rest);
        Ok(())
    }

    /// Writes buffered guest data to the host until the socket is full.
    pub fn flush_to_host(&mut self) -> Result<(), Fault> {
        while self.writable && self.to_host_len() > 0 {
            let res = if !self.preamble.is_empty() {
                self.stream.write(&self.preamble).map(|n| {
                    self.preamble.drain(..n);
                })
            } else {
                let (a, b) = self.to_host.as_slices();
                self.stream
                    .write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
                    .map(|n| {
                        self.to_host.drain(..n);
                        self.fwd_cnt += Wrapping(n as u32);
                    })
            };
            match res {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Fault::Io(e)),
            }
        }
        if self.guest_shut_send && self.to_host_len() == 0 && !self.host_write_shut {
            // Half-close towards the host so it sees EOF while it can still
            // send its answer.
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }

    /// Reads host data into the staging buffer while there is room.
    pub fn fill_from_host(&mut self, scratch: &mut [u8], cap: usize) -> Result<(), Fault> {
        if self.state != State::Established || self.host_eof || self.guest_shut_rcv {
            return Ok(());
        }
        while self.readable && self.staged.len() < cap {
            let want = (cap - self.staged.len()).min(scratch.len());
            if want == 0 {
                // A zero-length read returns 0, which would look like EOF.
                break;
            }
            match self.stream.read(&mut scratch[..want]) {
                Ok(0) => {
                    self.host_eof = true;
                    break;
                }
                Ok(n) => self.staged.extend(&scratch[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Fault::Io(e)),
            }
        }
        Ok(())
    }

    /// Whether the guest should be told about freed buffer space now. A
    /// quarter of the buffer keeps the guest streaming without a packet per
    /// write.
    pub fn credit_update_due(&self, buf_alloc: u32) -> bool {
        (self.fwd_cnt - self.fwd_cnt_sent).0 >= buf_alloc / 4
    }

    /// Marks an explicit CREDIT_UPDATE as owed.
    pub fn schedule_credit_update(&mut self) {
        self.need_credit_update = true;
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && !self.guest_shut_rcv
            && !self.staged.is_empty()
            && self.peer_credit() > 0
    }

    fn shutdown_due(&self) -> bool {
        self.state == State::Established
            && self.host_eof
            && self.staged.is_empty()
            && !self.shutdown_sent
    }

    fn credit_request_due(&self) -> bool {
        self.state == State::Established
            && !self.staged.is_empty()
            && self.peer_credit() == 0
            && !self.credit_request_sent
            && !self.guest_shut_rcv
    }

    /// Whether this connection owes the guest a packet.
    pub fn has_rx_work(&self) -> bool {
        self.need_request
            || self.need_response
            || self.need_credit_update
            || self.need_probe
            || self.can_send_data()
            || self.shutdown_due()
            || self.credit_request_due()
    }

    /// Produces the next packet for the guest, with payload (if any) copied
    /// into `payload`. `capacity` is the payload room of the RX buffer.
    pub fn next_packet(
        &mut self,
        capacity: usize,
        guest_cid: u64,
        buf_alloc: u32,
        payload: &mut Vec<u8>,
    ) -> Option<Header> {
        payload.clear();
        let mut flags = 0;
        let op = if self.need_request {
            self.need_request = false;
            Op::Request
        } else if self.need_response {
            self.need_response = false;
            Op::Response
        } else if self.can_send_data() && capacity > 0 {
            let n = self
                .staged
                .len()
                .min(self.peer_credit() as usize)
                .min(capacity)
                .min(MAX_PAYLOAD as usize);
            payload.extend(self.staged.drain(..n));
            self.tx_cnt += Wrapping(n as u32);
            Op::Rw
        } else if self.shutdown_due() {
            self.shutdown_sent = true;
            flags = SHUTDOWN_SEND;
            Op::Shutdown
        } else if self.need_credit_update {
            Op::CreditUpdate
        } else if self.credit_request_due() || self.need_probe {
            self.credit_request_sent = true;
            self.need_probe = false;
            Op::CreditRequest
        } else {
            return None;
        };
        // Every header carries our credit, so it also serves as an update.
        self.need_credit_update = false;
        self.fwd_cnt_sent = self.fwd_cnt;
        Some(Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.key.host_port,
            dst_port: self.key.guest_port,
            len: payload.len() as u32,
            type_: TYPE_STREAM,
            op: op.as_u16(),
            flags,
            buf_alloc,
            fwd_cnt: self.fwd_cnt.0,
        })
    }
}
