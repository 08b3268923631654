//! QEMU's `-netdev stream` framing: each Ethernet frame is preceded by its
//! length as a 4-byte big-endian number. The bytes come from QEMU, which
//! copies what the guest's driver hands it: hostile input. The decoder
//! buffers at most one frame, skips oversized ones without buffering them,
//! and never panics.

/// Largest frame accepted (an Ethernet frame with a 1500-byte MTU is 1514;
/// room is left for VLAN tags and jumbo-ish guests without buffering more).
pub const MAX_FRAME: usize = 9216;
/// Smallest useful frame: an Ethernet header.
pub const MIN_FRAME: usize = 14;

/// Turns a byte stream into frames.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    /// Bytes of the current length prefix and frame.
    buf: Vec<u8>,
    /// Bytes of an oversized frame still to skip.
    skip: usize,
    /// Frames dropped (too short or too long), for the log.
    pub dropped: u64,
}

impl FrameDecoder {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds `data`; calls `out` with each whole, plausible frame.
    pub fn push(&mut self, mut data: &[u8], out: &mut dyn FnMut(&[u8])) {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            if self.buf.len() < 4 {
                let n = (4 - self.buf.len()).min(data.len());
                self.buf.extend_from_slice(&data[..n]);
                data = &data[n..];
                if self.buf.len() < 4 {
                    return;
                }
                let len = self.frame_len();
                if len > MAX_FRAME {
                    // Skipped, not buffered: the stream stays in step.
                    self.dropped += 1;
                    self.skip = len;
                    self.buf.clear();
                    continue;
                }
                if len == 0 {
                    self.dropped += 1;
                    self.buf.clear();
                    continue;
                }
            }
            let want = 4 + self.frame_len();
            let n = (want - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == want {
                if want - 4 >= MIN_FRAME {
                    out(&self.buf[4..]);
                } else {
                    self.dropped += 1;
                }
                self.buf.clear();
            }
        }
    }

    fn frame_len(&self) -> usize {
        match self.buf.get(..4) {
            Some(&[a, b, c, d]) => u32::from_be_bytes([a, b, c, d]) as usize,
            _ => 0,
        }
    }
}

/// Appends `frame` with its length prefix to `out`.
pub fn encode(frame: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(chunks: &[&[u8]]) -> (Vec<Vec<u8>>, u64) {
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for c in chunks {
            d.push(c, &mut |f| got.push(f.to_vec()));
        }
        (got, d.dropped)
    }

    #[test]
    fn round_trip_and_oversized_skipped() {
        let a = vec![1u8; 60];
        let b = vec![2u8; 1514];
        let mut s = Vec::new();
        encode(&a, &mut s);
        // An oversized frame in between is skipped whole, the next still decodes.
        s.extend_from_slice(&((MAX_FRAME + 1) as u32).to_be_bytes());
        s.extend(std::iter::repeat_n(9u8, MAX_FRAME + 1));
        encode(&[3u8; 5], &mut s); // runt
        encode(&b, &mut s);
        let (got, dropped) = decode_all(&[&s]);
        assert_eq!(got, vec![a, b]);
        assert_eq!(dropped, 2);
    }

    proptest! {
        #[test]
        fn any_split_gives_same_frames(
            frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 14..2000), 0..8),
            cuts in proptest::collection::vec(0usize..20000, 0..10),
        ) {
            let mut s = Vec::new();
            for f in &frames { encode(f, &mut s); }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (s.len() + 1)).collect();
            cuts.sort();
            let mut chunks = Vec::new();
            let mut last = 0;
            for c in cuts { chunks.push(&s[last..c]); last = c; }
            chunks.push(&s[last..]);
            let (got, _) = decode_all(&chunks);
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn garbage_never_panics_and_stays_bounded(data in proptest::collection::vec(any::<u8>(), 0..50000)) {
            let mut d = FrameDecoder::new();
            d.push(&data, &mut |f| assert!(f.len() <= MAX_FRAME && f.len() >= MIN_FRAME));
            prop_assert!(d.buf.len() <= MAX_FRAME + 4);
        }
    }
}
