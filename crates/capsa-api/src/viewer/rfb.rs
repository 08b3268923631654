//! View-only enforcement on a VNC viewer's RFB stream (client to server).
//!
//! QEMU 7.2's `add_client` has no per-client read-only flag and noVNC's
//! `viewOnly` is the browser's choice, so a view-only session is enforced
//! here: the client's bytes are parsed (handshake, then messages) and only
//! SetPixelFormat, SetEncodings and FramebufferUpdateRequest reach QEMU;
//! key, pointer, clipboard, desktop-size and QEMU's own messages are
//! dropped. The stream is hostile: every length is bounded, the parser
//! keeps at most one message header, and anything it does not know ends
//! the session (QEMU would close it too).

/// Most encodings one SetEncodings may list (noVNC sends about 20).
pub const MAX_ENCODINGS: usize = 1024;
/// Longest ClientCutText accepted (and dropped) in a view-only session.
pub const MAX_CUT_TEXT: usize = 1 << 20;
/// Most screens one SetDesktopSize may describe.
pub const MAX_SCREENS: usize = 16;

/// Why a view-only session was ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RfbError {
    /// The client's ProtocolVersion is not RFB 3.3, 3.7 or 3.8.
    #[error("the viewer sent an RFB version capsa does not accept ({0:?}); use a client speaking RFB 3.8 (noVNC does)")]
    Version(String),
    /// The client chose a security type other than None.
    #[error("the viewer chose RFB security type {0}; only None (1) is offered")]
    Security(u8),
    /// A message type the filter does not know.
    #[error("the viewer sent RFB message type {0}, which a view-only session does not accept")]
    UnknownMessage(u8),
    /// A QEMU client message of an unknown subtype or operation.
    #[error("the viewer sent an unknown QEMU RFB message ({0}, {1})")]
    UnknownQemuMessage(u8, u16),
    /// The stream was already refused; the session must end.
    #[error("the viewer's RFB stream was already refused")]
    Refused,
    /// A length field over its bound.
    #[error("the viewer sent an oversized {what} ({len} > {max})")]
    TooLarge {
        /// Which message.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The 12-byte ProtocolVersion.
    Version,
    /// The security type byte (RFB 3.7 and 3.8).
    Security,
    /// The ClientInit shared flag.
    ClientInit,
    /// A message header (kept in `hdr`).
    Message,
    /// The body of a passed message: this many bytes more.
    Pass(usize),
    /// The body of a dropped message: this many bytes more.
    Skip(usize),
    /// After an error: nothing more is accepted.
    Failed,
}

/// What a message header says.
enum Step {
    /// The header needs this many bytes before it can be judged.
    Need(usize),
    /// The header is complete; pass or drop it and `tail` bytes after it.
    Whole { pass: bool, tail: usize },
}

/// The longest header the filter keeps (SetPixelFormat).
const MAX_HEADER: usize = 20;

/// Filters a view-only viewer's client-to-server RFB stream; fed in
/// arbitrary chunks, it forwards exactly the allowed bytes.
#[derive(Debug, Clone)]
pub struct ViewOnlyFilter {
    state: State,
    hdr: Vec<u8>,
    want: usize,
}

impl Default for ViewOnlyFilter {
    fn default() -> Self {
        Self::new()
    }
}

impl ViewOnlyFilter {
    /// A filter at the start of a connection.
    pub fn new() -> Self {
        Self {
            state: State::Version,
            hdr: Vec::with_capacity(MAX_HEADER),
            want: 12,
        }
    }

    /// Appends to `out` the bytes of `input` that may reach the server.
    /// After an error the session must end; further calls fail too.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), RfbError> {
        while !input.is_empty() {
            match self.state {
                State::Failed => return Err(RfbError::Refused),
                State::Pass(n) | State::Skip(n) => {
                    let k = n.min(input.len());
                    if matches!(self.state, State::Pass(_)) {
                        out.extend_from_slice(&input[..k]);
                    }
                    input = &input[k..];
                    self.state = match (self.state, n - k) {
                        (_, 0) => State::Message,
                        (State::Pass(_), r) => State::Pass(r),
                        (_, r) => State::Skip(r),
                    };
                }
                State::Version | State::Security | State::ClientInit | State::Message => {
                    let k = (self.want - self.hdr.len()).min(input.len());
                    self.hdr.extend_from_slice(&input[..k]);
                    input = &input[k..];
                    if self.hdr.len() < self.want {
                        return Ok(());
                    }
                    if let Err(e) = self.step(out) {
                        self.state = State::Failed;
                        self.hdr.clear();
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Judges a complete `hdr` (of `want` bytes) in the current state.
    fn step(&mut self, out: &mut Vec<u8>) -> Result<(), RfbError> {
        match self.state {
            State::Version => {
                let v = &self.hdr[..];
                let next = match v {
                    b"RFB 003.008\n" | b"RFB 003.007\n" => State::Security,
                    b"RFB 003.003\n" => State::ClientInit,
                    _ => {
                        return Err(RfbError::Version(
                            String::from_utf8_lossy(v).trim_end().to_string(),
                        ))
                    }
                };
                out.extend_from_slice(v);
                self.to(next, 1);
            }
            State::Security => {
                if self.hdr[0] != 1 {
                    return Err(RfbError::Security(self.hdr[0]));
                }
                out.extend_from_slice(&self.hdr);
                self.to(State::ClientInit, 1);
            }
            State::ClientInit => {
                out.extend_from_slice(&self.hdr);
                self.to(State::Message, 1);
            }
            State::Message => match message(&self.hdr)? {
                Step::Need(n) => self.want = n,
                Step::Whole { pass, tail } => {
                    if pass {
                        out.extend_from_slice(&self.hdr);
                    }
                    let next = match (tail, pass) {
                        (0, _) => State::Message,
                        (t, true) => State::Pass(t),
                        (t, false) => State::Skip(t),
                    };
                    self.to(next, 1);
                }
            },
            State::Pass(_) | State::Skip(_) | State::Failed => {}
        }
        Ok(())
    }

    fn to(&mut self, state: State, want: usize) {
        self.state = state;
        self.hdr.clear();
        self.want = want;
    }
}

fn u16_at(h: &[u8], i: usize) -> usize {
    usize::from(u16::from_be_bytes([h[i], h[i + 1]]))
}

/// Judges a client message header of `h.len()` bytes (at least 1).
fn message(h: &[u8]) -> Result<Step, RfbError> {
    let need = |n: usize| -> Option<Step> { (h.len() < n).then_some(Step::Need(n)) };
    let whole = |pass, tail| Ok(Step::Whole { pass, tail });
    match h[0] {
        // SetPixelFormat: type, 3 padding, 16-byte pixel format.
        0 => need(20).map_or_else(|| whole(true, 0), Ok),
        // SetEncodings: type, padding, count, then 4 bytes each.
        2 => need(4).map_or_else(
            || {
                let n = u16_at(h, 2);
                if n > MAX_ENCODINGS {
                    return Err(RfbError::TooLarge {
                        what: "SetEncodings",
                        len: n,
                        max: MAX_ENCODINGS,
                    });
                }
                whole(true, 4 * n)
            },
            Ok,
        ),
        // FramebufferUpdateRequest: type, incremental, x, y, w, h.
        3 => need(10).map_or_else(|| whole(true, 0), Ok),
        // KeyEvent: type, down, padding, keysym.
        4 => need(8).map_or_else(|| whole(false, 0), Ok),
        // PointerEvent: type, buttons, x, y.
        5 => need(6).map_or_else(|| whole(false, 0), Ok),
        // ClientCutText: type, 3 padding, s32 length (negative: the
        // extended clipboard's length), then the text.
        6 => need(8).map_or_else(
            || {
                let len = i32::from_be_bytes([h[4], h[5], h[6], h[7]]).unsigned_abs() as usize;
                if len > MAX_CUT_TEXT {
                    return Err(RfbError::TooLarge {
                        what: "ClientCutText",
                        len,
                        max: MAX_CUT_TEXT,
                    });
                }
                whole(false, len)
            },
            Ok,
        ),
        // SetDesktopSize: type, padding, w, h, screens, padding, 16 each.
        251 => need(8).map_or_else(
            || {
                let n = usize::from(h[6]);
                if n > MAX_SCREENS {
                    return Err(RfbError::TooLarge {
                        what: "SetDesktopSize",
                        len: n,
                        max: MAX_SCREENS,
                    });
                }
                whole(false, 16 * n)
            },
            Ok,
        ),
        // QEMU client message: type, subtype, ...
        255 => {
            if let Some(s) = need(2) {
                return Ok(s);
            }
            match h[1] {
                // Extended key event: type, 0, down (u16), keysym, keycode.
                0 => need(12).map_or_else(|| whole(false, 0), Ok),
                // Audio: type, 1, operation (u16); set-format adds 6 bytes.
                1 => {
                    if let Some(s) = need(4) {
                        return Ok(s);
                    }
                    match u16_at(h, 2) {
                        0 | 1 => whole(false, 0),
                        2 => need(10).map_or_else(|| whole(false, 0), Ok),
                        op => Err(RfbError::UnknownQemuMessage(1, op as u16)),
                    }
                }
                sub => Err(RfbError::UnknownQemuMessage(sub, 0)),
            }
        }
        t => Err(RfbError::UnknownMessage(t)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HANDSHAKE: &[u8] = b"RFB 003.008\n\x01\x01";

    fn set_pixel_format() -> Vec<u8> {
        let mut m = vec![0u8, 0, 0, 0];
        m.extend_from_slice(&[32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0]);
        m
    }
    fn set_encodings(n: u16) -> Vec<u8> {
        let mut m = vec![2u8, 0];
        m.extend_from_slice(&n.to_be_bytes());
        for i in 0..n {
            m.extend_from_slice(&(i32::from(i) - 5).to_be_bytes());
        }
        m
    }
    fn update_request() -> Vec<u8> {
        vec![3, 1, 0, 0, 0, 0, 5, 0, 3, 32]
    }
    fn key() -> Vec<u8> {
        vec![4, 1, 0, 0, 0, 0, 0xff, 0x0d]
    }
    fn pointer() -> Vec<u8> {
        vec![5, 1, 0, 10, 0, 20]
    }
    fn cut(text: &[u8]) -> Vec<u8> {
        let mut m = vec![6u8, 0, 0, 0];
        m.extend_from_slice(&(text.len() as u32).to_be_bytes());
        m.extend_from_slice(text);
        m
    }
    fn qemu_key() -> Vec<u8> {
        vec![255, 0, 0, 1, 0, 0, 0, 0x61, 0, 0, 0, 0x1e]
    }
    fn qemu_audio() -> Vec<u8> {
        vec![255, 1, 0, 2, 3, 2, 0, 0, 0xac, 0x44]
    }
    fn desktop_size() -> Vec<u8> {
        let mut m = vec![251u8, 0, 5, 0, 3, 32, 1, 0];
        m.extend_from_slice(&[0; 16]);
        m
    }

    /// The allowed messages and the dropped ones, interleaved.
    fn session() -> (Vec<u8>, Vec<u8>) {
        let allowed = [
            set_pixel_format(),
            set_encodings(20),
            update_request(),
            set_encodings(0),
        ];
        let dropped = [
            key(),
            pointer(),
            cut(b"secret"),
            qemu_key(),
            qemu_audio(),
            vec![255, 1, 0, 0],
            desktop_size(),
        ];
        let mut all = HANDSHAKE.to_vec();
        let mut want = HANDSHAKE.to_vec();
        for (i, d) in dropped.iter().enumerate() {
            let a = &allowed[i % allowed.len()];
            all.extend_from_slice(a);
            want.extend_from_slice(a);
            all.extend_from_slice(d);
        }
        (all, want)
    }

    fn run(chunks: &[&[u8]]) -> Result<Vec<u8>, RfbError> {
        let mut f = ViewOnlyFilter::new();
        let mut out = Vec::new();
        for c in chunks {
            f.feed(c, &mut out)?;
        }
        Ok(out)
    }

    #[test]
    fn passes_requests_and_drops_input() {
        let (all, want) = session();
        assert_eq!(run(&[&all]).unwrap(), want);
        // Byte by byte gives the same.
        let bytes: Vec<&[u8]> = all.chunks(1).collect();
        assert_eq!(run(&bytes).unwrap(), want);
    }

    #[test]
    fn rfb_33_has_no_security_byte() {
        let mut s = b"RFB 003.003\n\x00".to_vec();
        s.extend_from_slice(&update_request());
        s.extend_from_slice(&pointer());
        let mut want = b"RFB 003.003\n\x00".to_vec();
        want.extend_from_slice(&update_request());
        assert_eq!(run(&[&s]).unwrap(), want);
    }

    #[test]
    fn hostile_streams_end_the_session() {
        let with = |m: &[u8]| {
            let mut s = HANDSHAKE.to_vec();
            s.extend_from_slice(m);
            s
        };
        for (bad, err) in [
            (b"RFB 004.000\n".to_vec(), "version"),
            (b"GET / HTTP/1.1\r\n".to_vec(), "version"),
            (b"RFB 003.008\n\x02".to_vec(), "security"),
            (with(&[7]), "type 7"),
            (with(&[150, 1, 0, 0, 0, 0, 0, 0, 0, 0]), "type 150"),
            (with(&[255, 9]), "QEMU"),
            (with(&[255, 1, 0, 7]), "QEMU"),
            (with(&[2, 0, 0xff, 0xff]), "SetEncodings"),
            (with(&[6, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff]), "ClientCutText"),
            (with(&[6, 0, 0, 0, 0x80, 0, 0, 0]), "ClientCutText"),
            (with(&[251, 0, 0, 1, 0, 1, 200, 0]), "SetDesktopSize"),
        ] {
            let e = run(&[&bad]).unwrap_err();
            assert!(e.to_string().contains(err), "{bad:?}: {e} (wanted {err:?})");
        }
        // Once failed, nothing more passes.
        let mut f = ViewOnlyFilter::new();
        let mut out = Vec::new();
        assert!(f.feed(b"RFB 003.008\n\x05", &mut out).is_err());
        out.clear();
        assert!(f.feed(&update_request(), &mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn negative_cut_text_length_is_its_size() {
        // The extended clipboard sends the length negated.
        let mut m = vec![6u8, 0, 0, 0];
        m.extend_from_slice(&(-4i32).to_be_bytes());
        m.extend_from_slice(b"\x00\x00\x00\x01");
        m.extend_from_slice(&update_request());
        let mut s = HANDSHAKE.to_vec();
        s.extend_from_slice(&m);
        let mut want = HANDSHAKE.to_vec();
        want.extend_from_slice(&update_request());
        assert_eq!(run(&[&s]).unwrap(), want);
    }

    proptest! {
        /// Any split of a valid session forwards exactly the allowed bytes.
        #[test]
        fn any_chunking_forwards_the_same(cuts in proptest::collection::vec(0usize..400, 0..12)) {
            let (all, want) = session();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (all.len() + 1)).collect();
            cuts.sort_unstable();
            let mut chunks: Vec<&[u8]> = Vec::new();
            let mut at = 0;
            for c in cuts {
                chunks.push(&all[at..c]);
                at = c;
            }
            chunks.push(&all[at..]);
            prop_assert_eq!(run(&chunks).unwrap(), want);
        }

        /// Arbitrary bytes never panic, and what passes is never an input
        /// message: the output re-parsed as a stream holds only types 0, 2, 3.
        #[test]
        fn hostile_bytes_never_pass_input(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut s = HANDSHAKE.to_vec();
            s.extend_from_slice(&data);
            let mut f = ViewOnlyFilter::new();
            let mut out = Vec::new();
            let _ = f.feed(&s, &mut out);
            // Re-parse the output: every message in it is allowed.
            let mut check = ViewOnlyFilter::new();
            let mut again = Vec::new();
            prop_assert!(check.feed(&out, &mut again).is_ok());
            prop_assert_eq!(&again, &out);
            let mut pos = HANDSHAKE.len();
            while pos < out.len() {
                let len = match out[pos] {
                    0 => 20,
                    2 => 4 + 4 * usize::from(u16::from_be_bytes([out[pos + 2], out[pos + 3]])),
                    3 => 10,
                    t => { prop_assert!(false, "type {} passed", t); 0 }
                };
                pos += len;
            }
        }
    }
}
