//! Scatter/gather access to one descriptor chain, with every guest-supplied
//! number checked.
//!
//! The guest decides how a packet is split across descriptors (Linux 6.1 puts
//! the header and the payload in separate descriptors, 6.2+ uses one), so the
//! device must not assume a layout. It also decides the lengths, addresses and
//! chain links, so they are all treated as hostile: the chain length is capped,
//! lengths are summed with overflow checks, every copy goes through
//! vm-memory's bounds-checked accessors, and the direction of every descriptor
//! is verified.

use std::fmt;
use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// Longest descriptor chain accepted. Linux uses 2 (header + linear payload),
/// up to ~19 with zero-copy fragments; anything beyond 64 is either a bug or
/// an attempt to make the device walk a huge (or looping) chain.
pub const MAX_CHAIN_DESCRIPTORS: usize = 64;

/// Why a chain was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainError {
    /// More than [`MAX_CHAIN_DESCRIPTORS`] descriptors.
    TooLong,
    /// A device-writable descriptor on the TX queue, or a device-readable one
    /// on the RX queue.
    WrongDirection,
    /// The summed descriptor lengths overflow.
    LengthOverflow,
    /// The chain is shorter than the data it claims to hold.
    Truncated,
    /// A descriptor points outside guest memory.
    BadAddress,
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChainError::TooLong => "descriptor chain too long",
            ChainError::WrongDirection => "descriptor has the wrong direction",
            ChainError::LengthOverflow => "descriptor lengths overflow",
            ChainError::Truncated => "descriptor chain shorter than its contents",
            ChainError::BadAddress => "descriptor points outside guest memory",
        })
    }
}

/// The buffers of one chain, in order.
#[derive(Debug, Default)]
pub struct Segments {
    segs: Vec<(GuestAddress, usize)>,
    total: usize,
}

impl Segments {
    /// Walks `chain`, requiring every descriptor to be device-writable when
    /// `writable` (RX) or device-readable otherwise (TX), and to lie inside
    /// guest memory. Checking addresses up front means a buffer is rejected
    /// before a packet is committed to it, so nothing is lost to a bad one.
    pub fn collect<G, M>(
        mem: &G,
        chain: DescriptorChain<M>,
        writable: bool,
    ) -> Result<Segments, ChainError>
    where
        G: GuestMemory,
        M: Deref,
        M::Target: GuestMemory,
    {
        let mut out = Segments::default();
        for (i, desc) in chain.enumerate() {
            if i >= MAX_CHAIN_DESCRIPTORS {
                return Err(ChainError::TooLong);
            }
            if desc.is_write_only() != writable {
                return Err(ChainError::WrongDirection);
            }
            let len = desc.len() as usize;
            if len == 0 {
                continue;
            }
            let access = if writable {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if !mem.check_range(desc.addr(), len, access) {
                return Err(ChainError::BadAddress);
            }
            out.total = out
                .total
                .checked_add(len)
                .ok_or(ChainError::LengthOverflow)?;
            out.segs.push((desc.addr(), len));
        }
        Ok(out)
    }

    /// Total bytes described by the chain.
    pub fn len(&self) -> usize {
        self.total
    }

    /// Calls `f(address, segment_offset, chunk_len)` for every piece of the
    /// byte range `[offset, offset + len)`.
    fn for_range(
        &self,
        offset: usize,
        len: usize,
        mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), ChainError>,
    ) -> Result<(), ChainError> {
        let end = offset.checked_add(len).ok_or(ChainError::LengthOverflow)?;
        if end > self.total {
            return Err(ChainError::Truncated);
        }
        let mut seg_start = 0usize;
        let mut done = 0usize;
        for &(addr, seg_len) in &self.segs {
            if done == len {
                break;
            }
            let seg_end = seg_start + seg_len;
            let pos = offset + done;
            if pos < seg_end {
                let in_seg = pos - seg_start;
                let n = (seg_len - in_seg).min(len - done);
                let a = addr
                    .checked_add(in_seg as u64)
                    .ok_or(ChainError::BadAddress)?;
                f(a, done, n)?;
                done += n;
            }
            seg_start = seg_end;
        }
        Ok(())
    }

    /// Copies `out.len()` bytes starting at byte `offset` of the chain.
    pub fn read_at<M: GuestMemory>(
        &self,
        mem: &M,
        offset: usize,
        out: &mut [u8],
    ) -> Result<(), ChainError> {
        self.for_range(offset, out.len(), |addr, done, n| {
            mem.read_slice(&mut out[done..done + n], addr)
                .map_err(|_| ChainError::BadAddress)
        })
    }

    /// Copies `data` into the chain starting at byte `offset`.
    pub fn write_at<M: GuestMemory>(
        &self,
        mem: &M,
        offset: usize,
        data: &[u8],
    ) -> Result<(), ChainError> {
        self.for_range(offset, data.len(), |addr, done, n| {
            mem.write_slice(&data[done..done + n], addr)
                .map_err(|_| ChainError::BadAddress)
        })
    }
}
