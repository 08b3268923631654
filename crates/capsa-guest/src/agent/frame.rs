//! Incremental, bounded decoding of the host's length-prefixed frames.
//!
//! `capsa_proto::read_frame` allocates the whole announced length up front and
//! needs a blocking reader. The agent needs two things more: frames read from
//! a non-blocking socket a piece at a time (the exec poll loop), and memory
//! that grows only with bytes the peer actually sent, so that a peer that
//! announces [`MAX_FRAME`] and then stalls costs nothing (256 such peers would
//! otherwise pin 256 MiB of a small guest).

use std::io::{self, Read};

use capsa_proto::{decode, ClientFrame, ProtoError, MAX_FRAME};

/// Most bytes taken from the stream per read call.
const READ_CHUNK: usize = 64 * 1024;

/// Buffers received bytes and yields whole frames.
pub(crate) struct FrameReader {
    buf: Vec<u8>,
    scratch: Box<[u8]>,
    eof: bool,
}

/// Result of one [`FrameReader::fill`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fill {
    /// Some bytes arrived.
    Data,
    /// The peer closed its side.
    Eof,
    /// Nothing to read right now (non-blocking stream).
    WouldBlock,
}

impl FrameReader {
    pub(crate) fn new() -> Self {
        Self {
            buf: Vec::new(),
            scratch: vec![0u8; READ_CHUNK].into_boxed_slice(),
            eof: false,
        }
    }

    /// Returns the next complete frame, if the buffer holds one.
    ///
    /// Checks the announced length against [`MAX_FRAME`] as soon as the
    /// 4-byte prefix is in, before any more bytes are accepted.
    pub(crate) fn next_frame(&mut self) -> Result<Option<ClientFrame>, ProtoError> {
        let Some(len) = self.announced()? else {
            return Ok(None);
        };
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let msg = decode(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        if self.buf.is_empty() && self.buf.capacity() > READ_CHUNK {
            // Do not keep a large frame's buffer for the life of the connection.
            self.buf = Vec::new();
        }
        msg.map(Some)
    }

    fn announced(&self) -> Result<Option<usize>, ProtoError> {
        let Some(prefix) = self.buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len > MAX_FRAME {
            return Err(ProtoError::TooLarge(len));
        }
        Ok(Some(len))
    }

    /// How many more bytes are needed to complete the current frame (at
    /// least 1); reads never take more than one chunk beyond that.
    fn wanted(&self) -> Result<usize, ProtoError> {
        Ok(match self.announced()? {
            Some(len) => (4 + len).saturating_sub(self.buf.len()).max(1),
            None => 4 - self.buf.len(),
        })
    }

    /// Reads once from `r` into the buffer.
    ///
    /// Never buffers more than one frame plus one read chunk, so memory per
    /// connection stays below `MAX_FRAME + 64 KiB` whatever the peer sends.
    pub(crate) fn fill(&mut self, r: &mut impl Read) -> Result<Fill, ProtoError> {
        if self.eof {
            return Ok(Fill::Eof);
        }
        let want = self.wanted()?.clamp(1, READ_CHUNK);
        loop {
            match r.read(&mut self.scratch[..want]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(Fill::Eof);
                }
                Ok(n) => {
                    self.buf.extend_from_slice(&self.scratch[..n]);
                    return Ok(Fill::Data);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Fill::WouldBlock),
                Err(e) => return Err(ProtoError::Io(e)),
            }
        }
    }

    /// Reads one frame from a blocking stream.
    ///
    /// [`ProtoError::Closed`] on EOF between frames, [`ProtoError::Malformed`]
    /// on EOF inside one, [`ProtoError::Io`] with `WouldBlock`/`TimedOut` when
    /// the socket's receive timeout passes.
    pub(crate) fn read_blocking(&mut self, r: &mut impl Read) -> Result<ClientFrame, ProtoError> {
        loop {
            if let Some(frame) = self.next_frame()? {
                return Ok(frame);
            }
            match self.fill(r)? {
                Fill::Data => {}
                Fill::Eof if self.buf.is_empty() => return Err(ProtoError::Closed),
                Fill::Eof => {
                    return Err(ProtoError::Malformed(format!(
                        "connection closed inside a frame ({} bytes buffered)",
                        self.buf.len()
                    )))
                }
                Fill::WouldBlock => {
                    return Err(ProtoError::Io(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "peer sent nothing before the timeout",
                    )))
                }
            }
        }
    }

    /// Bytes buffered (for tests and memory accounting).
    #[cfg(test)]
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsa_proto::{encode, PROTOCOL_VERSION};

    /// A reader that hands out at most `step` bytes per call.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn frames_split_anywhere_are_reassembled() {
        let frames = vec![
            ClientFrame::Open {
                version: PROTOCOL_VERSION,
                request: capsa_proto::Request::Info,
            },
            ClientFrame::Stdin(vec![7; 200_000]),
            ClientFrame::StdinEof,
        ];
        let mut bytes = Vec::new();
        for f in &frames {
            bytes.extend(encode(f).unwrap());
        }
        for step in [1, 3, 4, 5, 1000, 1 << 20] {
            let mut r = Trickle { data: &bytes, step };
            let mut fr = FrameReader::new();
            for f in &frames {
                assert_eq!(&fr.read_blocking(&mut r).unwrap(), f);
            }
            assert!(matches!(fr.read_blocking(&mut r), Err(ProtoError::Closed)));
        }
    }

    #[test]
    fn oversized_length_fails_before_buffering() {
        let mut bytes = (MAX_FRAME as u32 + 1).to_le_bytes().to_vec();
        bytes.extend(vec![0u8; 100_000]);
        let mut fr = FrameReader::new();
        let mut r = &bytes[..];
        assert!(matches!(
            fr.read_blocking(&mut r),
            Err(ProtoError::TooLarge(_))
        ));
        assert_eq!(fr.buffered(), 4, "nothing after the prefix was taken");
    }

    #[test]
    fn memory_follows_bytes_sent_not_bytes_announced() {
        // Announce 1 MiB, send 10 bytes, then EOF.
        let mut bytes = (MAX_FRAME as u32).to_le_bytes().to_vec();
        bytes.extend([1u8; 10]);
        let mut fr = FrameReader::new();
        let mut r = &bytes[..];
        assert!(matches!(
            fr.read_blocking(&mut r),
            Err(ProtoError::Malformed(_))
        ));
        assert!(fr.buf.capacity() < 1024, "{}", fr.buf.capacity());
    }

    #[test]
    fn garbage_bodies_are_errors() {
        let mut seed = 11u64;
        for _ in 0..5000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = (seed >> 40) as usize % 40;
            let mut bytes = (len as u32).to_le_bytes().to_vec();
            for i in 0..len {
                bytes.push((seed >> (i % 56)) as u8);
            }
            let mut fr = FrameReader::new();
            let _ = fr.read_blocking(&mut &bytes[..]);
        }
    }
}
