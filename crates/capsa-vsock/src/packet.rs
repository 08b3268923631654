//! The virtio-vsock packet header: layout, parsing and classification.
//!
//! Everything in here is pure (no I/O, no guest memory) so it can be fuzzed
//! with arbitrary bytes. The header is the only structured data the guest
//! controls, so the parser refuses anything it does not understand instead of
//! guessing.

use std::fmt;

/// Size of `struct virtio_vsock_hdr` on the wire (packed, little endian).
pub const HEADER_SIZE: usize = 44;

/// The largest payload one packet may carry. Linux uses the same limit
/// (`VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`); anything larger is a malformed packet,
/// and the bound keeps every per-packet copy small.
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// The well-known CID of the host side of every vsock transport.
pub const HOST_CID: u64 = 2;

/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type this device offers.
pub const TYPE_STREAM: u16 = 1;

/// `VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE`: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_F_SEND`: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// The operation carried by a packet (`VIRTIO_VSOCK_OP_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Connection request.
    Request,
    /// Connection accepted.
    Response,
    /// Connection reset / refused.
    Rst,
    /// Half or full close; flags say which direction.
    Shutdown,
    /// Stream data.
    Rw,
    /// Unsolicited credit information.
    CreditUpdate,
    /// Ask the peer for its credit information.
    CreditRequest,
}

impl Op {
    /// Decodes the wire value; `None` for values the spec does not define.
    pub fn from_u16(v: u16) -> Option<Op> {
        Some(match v {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }

    /// The wire value of this operation.
    pub fn as_u16(self) -> u16 {
        match self {
            Op::Request => 1,
            Op::Response => 2,
            Op::Rst => 3,
            Op::Shutdown => 4,
            Op::Rw => 5,
            Op::CreditUpdate => 6,
            Op::CreditRequest => 7,
        }
    }
}

/// A decoded `virtio_vsock_hdr`. Fields hold raw wire values; see
/// [`classify`] for the checked interpretation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length claimed by the sender.
    pub len: u32,
    /// Socket type (`VIRTIO_VSOCK_TYPE_*`).
    pub type_: u16,
    /// Raw operation (`VIRTIO_VSOCK_OP_*`).
    pub op: u16,
    /// Operation specific flags (shutdown direction bits).
    pub flags: u32,
    /// Sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer so far.
    pub fwd_cnt: u32,
}

impl Header {
    /// Parses the first [`HEADER_SIZE`] bytes of `bytes`.
    ///
    /// Returns `None` when fewer bytes are given; never panics.
    pub fn parse(bytes: &[u8]) -> Option<Header> {
        let b: &[u8; HEADER_SIZE] = bytes.get(..HEADER_SIZE)?.try_into().ok()?;
        let u64_at = |o: usize| {
            u64::from_le_bytes([
                b[o],
                b[o + 1],
                b[o + 2],
                b[o + 3],
                b[o + 4],
                b[o + 5],
                b[o + 6],
                b[o + 7],
            ])
        };
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Some(Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        })
    }

    /// Serializes the header into its wire form.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The header of a reset answering `self` (ports and CIDs swapped).
    pub fn reset_reply(&self) -> Header {
        Header {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: Op::Rst.as_u16(),
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }
}

/// A header from the guest that passed [`classify`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestPacket {
    /// The decoded operation.
    pub op: Op,
    /// Host-side port (the header's `dst_port`).
    pub host_port: u32,
    /// Guest-side port (the header's `src_port`).
    pub guest_port: u32,
    /// Payload length; only meaningful for [`Op::Rw`], already bounded by
    /// [`MAX_PAYLOAD`].
    pub len: u32,
    /// Shutdown flags, masked to the defined bits.
    pub flags: u32,
    /// Guest receive buffer size.
    pub buf_alloc: u32,
    /// Guest consumed-bytes counter.
    pub fwd_cnt: u32,
}

/// Why a guest header was rejected, and what the device should do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// Drop silently: answering could be used to spoof or amplify (wrong
    /// source CID), or the packet is itself a reset.
    Drop(RejectReason),
    /// Answer with a reset so the guest socket fails fast instead of hanging.
    Reset(RejectReason),
}

/// The specific defect found in a header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// `src_cid` is not the guest's CID.
    SpoofedSource,
    /// `dst_cid` is not the host; there is nobody else to route to.
    UnknownDestination,
    /// Socket type other than stream.
    UnsupportedType,
    /// Operation value not defined by the spec.
    UnknownOp,
    /// `len` above [`MAX_PAYLOAD`].
    OversizedPayload,
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RejectReason::SpoofedSource => "source CID is not the guest CID",
            RejectReason::UnknownDestination => "destination CID is not the host",
            RejectReason::UnsupportedType => "socket type is not STREAM",
            RejectReason::UnknownOp => "unknown operation",
            RejectReason::OversizedPayload => "payload length above 64 KiB",
        })
    }
}

/// Checks a guest header against everything that can be checked without
/// connection state.
pub fn classify(h: &Header, guest_cid: u64) -> Result<GuestPacket, Reject> {
    let is_rst = h.op == Op::Rst.as_u16();
    // Never answer a reset with a reset: two devices could ping-pong forever.
    let reject = |r| {
        if is_rst {
            Reject::Drop(r)
        } else {
            Reject::Reset(r)
        }
    };
    if h.src_cid != guest_cid {
        return Err(Reject::Drop(RejectReason::SpoofedSource));
    }
    if h.dst_cid != HOST_CID {
        return Err(reject(RejectReason::UnknownDestination));
    }
    if h.type_ != TYPE_STREAM {
        return Err(reject(RejectReason::UnsupportedType));
    }
    let op = Op::from_u16(h.op).ok_or(reject(RejectReason::UnknownOp))?;
    if op == Op::Rw && h.len > MAX_PAYLOAD {
        return Err(reject(RejectReason::OversizedPayload));
    }
    Ok(GuestPacket {
        op,
        host_port: h.dst_port,
        guest_port: h.src_port,
        len: if op == Op::Rw { h.len } else { 0 },
        flags: h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND),
        buf_alloc: h.buf_alloc,
        fwd_cnt: h.fwd_cnt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 5000,
            len: 10,
            type_: TYPE_STREAM,
            op: Op::Rw.as_u16(),
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn roundtrip() {
        let h = valid();
        assert_eq!(Header::parse(&h.to_bytes()), Some(h));
    }

    #[test]
    fn short_input_is_none() {
        assert_eq!(Header::parse(&[0u8; HEADER_SIZE - 1]), None);
        assert_eq!(Header::parse(&[]), None);
    }

    #[test]
    fn wire_layout_matches_linux() {
        // Offsets from include/uapi/linux/virtio_vsock.h.
        let b = valid().to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[24..28], &10u32.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(&b[40..44], &7u32.to_le_bytes());
    }

    #[test]
    fn classify_rejections() {
        let mut h = valid();
        h.src_cid = 9;
        assert_eq!(
            classify(&h, 3),
            Err(Reject::Drop(RejectReason::SpoofedSource))
        );
        let mut h = valid();
        h.dst_cid = 7;
        assert_eq!(
            classify(&h, 3),
            Err(Reject::Reset(RejectReason::UnknownDestination))
        );
        let mut h = valid();
        h.type_ = 2;
        assert_eq!(
            classify(&h, 3),
            Err(Reject::Reset(RejectReason::UnsupportedType))
        );
        let mut h = valid();
        h.op = 99;
        assert_eq!(classify(&h, 3), Err(Reject::Reset(RejectReason::UnknownOp)));
        let mut h = valid();
        h.len = MAX_PAYLOAD + 1;
        assert_eq!(
            classify(&h, 3),
            Err(Reject::Reset(RejectReason::OversizedPayload))
        );
        let mut h = valid();
        h.op = Op::Rst.as_u16();
        h.type_ = 2;
        assert_eq!(
            classify(&h, 3),
            Err(Reject::Drop(RejectReason::UnsupportedType))
        );
    }

    #[test]
    fn classify_masks_flags_and_len() {
        let mut h = valid();
        h.op = Op::Shutdown.as_u16();
        h.flags = 0xffff_ffff;
        h.len = u32::MAX;
        let p = classify(&h, 3).expect("valid shutdown");
        assert_eq!(p.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
        assert_eq!(p.len, 0);
    }
}
