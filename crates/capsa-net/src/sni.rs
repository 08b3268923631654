//! The name a TCP client says it wants: the TLS ClientHello's SNI, or the
//! HTTP/1 `Host` header. Parsed from the guest's first bytes (hostile):
//! bounded, no allocation beyond the name, never panics.

/// Most bytes held back from the upstream while looking for the name.
pub const MAX_PEEK: usize = 16 * 1024;

/// What the first bytes of a flow say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    /// Not enough bytes yet.
    NeedMore,
    /// The name asked for (lower case, no port, no trailing dot).
    Name(String),
    /// Neither a ClientHello with SNI nor an HTTP request with a Host.
    NoName(&'static str),
}

/// Looks for the name in `buf`, the flow's first bytes.
pub fn peek(buf: &[u8]) -> Peek {
    match buf.first() {
        None => Peek::NeedMore,
        Some(0x16) => client_hello_sni(buf),
        Some(b) if b.is_ascii_uppercase() => http_host(buf),
        Some(_) => Peek::NoName("neither TLS nor HTTP"),
    }
}

struct Rd<'a> {
    b: &'a [u8],
}

impl<'a> Rd<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (&x, rest) = self.b.split_first()?;
        self.b = rest;
        Some(x)
    }
    fn u16(&mut self) -> Option<usize> {
        Some(usize::from(self.u8()?) << 8 | usize::from(self.u8()?))
    }
    fn u24(&mut self) -> Option<usize> {
        Some(usize::from(self.u8()?) << 16 | self.u16()?)
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.b.len() {
            return None;
        }
        let (x, rest) = self.b.split_at(n);
        self.b = rest;
        Some(x)
    }
}

/// SNI of a ClientHello in a (possibly partial) TLS record stream. Only the
/// first record is read: a ClientHello split over records is refused
/// (no client capsa cares about does that for a hello this small).
fn client_hello_sni(buf: &[u8]) -> Peek {
    let mut r = Rd { b: buf };
    let Some((_, _, len)) = (|| Some((r.u8()?, r.u16()?, r.u16()?)))() else {
        return Peek::NeedMore;
    };
    if len > MAX_PEEK {
        return Peek::NoName("TLS record too long");
    }
    let Some(rec) = r.take(len) else {
        return Peek::NeedMore;
    };
    parse_hello(rec).unwrap_or(Peek::NoName("malformed ClientHello"))
}

fn parse_hello(rec: &[u8]) -> Option<Peek> {
    let mut r = Rd { b: rec };
    if r.u8()? != 1 {
        return Some(Peek::NoName("TLS record is not a ClientHello"));
    }
    let hl = r.u24()?;
    let mut h = Rd { b: r.take(hl)? };
    h.take(2 + 32)?; // version, random
    let sid = usize::from(h.u8()?);
    h.take(sid)?;
    let cs = h.u16()?;
    h.take(cs)?;
    let comp = usize::from(h.u8()?);
    h.take(comp)?;
    if h.b.is_empty() {
        return Some(Peek::NoName("ClientHello without extensions (no SNI)"));
    }
    let el = h.u16()?;
    let mut e = Rd { b: h.take(el)? };
    while !e.b.is_empty() {
        let ty = e.u16()?;
        let len = e.u16()?;
        let body = e.take(len)?;
        if ty != 0 {
            continue;
        }
        let mut s = Rd { b: body };
        let ll = s.u16()?;
        let mut list = Rd { b: s.take(ll)? };
        while !list.b.is_empty() {
            let kind = list.u8()?;
            let nl = list.u16()?;
            let name = list.take(nl)?;
            if kind == 0 {
                return Some(
                    name_of(name).map_or(Peek::NoName("SNI is not a host name"), Peek::Name),
                );
            }
        }
    }
    Some(Peek::NoName("ClientHello has no SNI"))
}

fn http_host(buf: &[u8]) -> Peek {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let head = match head_end {
        Some(e) => &buf[..e + 2],
        None if buf.len() >= MAX_PEEK => return Peek::NoName("HTTP header too long"),
        None => {
            // The request line alone tells whether this is HTTP at all.
            if let Some(e) = buf.iter().position(|&b| b == b' ') {
                if !buf[..e].iter().all(u8::is_ascii_uppercase) {
                    return Peek::NoName("neither TLS nor HTTP");
                }
            }
            return Peek::NeedMore;
        }
    };
    let mut lines = head.split(|&b| b == b'\n');
    let first = lines.next().unwrap_or_default();
    let method_ok = first
        .iter()
        .position(|&b| b == b' ')
        .is_some_and(|e| e > 0 && first[..e].iter().all(u8::is_ascii_uppercase));
    if !method_ok || !first.ends_with(b"\r") || !first.windows(5).any(|w| w == b"HTTP/") {
        return Peek::NoName("neither TLS nor HTTP");
    }
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if !line[..colon].eq_ignore_ascii_case(b"host") {
            continue;
        }
        let v = line[colon + 1..].trim_ascii();
        // Drop a port; an IPv6 literal is not a name anyway.
        let v = match v.iter().rposition(|&b| b == b':') {
            Some(c) if v[c + 1..].iter().all(u8::is_ascii_digit) => &v[..c],
            _ => v,
        };
        return name_of(v).map_or(Peek::NoName("Host is not a host name"), Peek::Name);
    }
    Peek::NoName("HTTP request without Host")
}

fn name_of(b: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(b).ok()?;
    let s = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    capsa_core::valid_domain(&s).then_some(s)
}

#[cfg(test)]
pub(crate) fn client_hello(name: &str) -> Vec<u8> {
    let n = name.as_bytes();
    let mut sni = Vec::new();
    sni.extend_from_slice(&((n.len() + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&(n.len() as u16).to_be_bytes());
    sni.extend_from_slice(n);
    let mut ext = Vec::new();
    ext.extend_from_slice(&[0, 0]);
    ext.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    ext.extend_from_slice(&sni);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7u8; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn finds_sni_and_host() {
        let h = client_hello("API.Example.com");
        assert_eq!(peek(&h), Peek::Name("api.example.com".into()));
        for n in 0..h.len() {
            // Every prefix of a hello asks for more, never a verdict.
            assert_eq!(peek(&h[..n]), Peek::NeedMore, "{n}");
        }
        assert_eq!(
            peek(b"GET / HTTP/1.1\r\nUser-Agent: x\r\nhost: a.b.c:8080\r\n\r\n"),
            Peek::Name("a.b.c".into())
        );
        assert_eq!(peek(b"GET / HTTP/1.1\r\nHost"), Peek::NeedMore);
        assert!(matches!(peek(b"GET / HTTP/1.1\r\n\r\n"), Peek::NoName(_)));
        assert!(matches!(peek(b"\x00\x01junk"), Peek::NoName(_)));
        assert!(matches!(peek(b"get / x"), Peek::NoName(_)));
    }

    proptest! {
        #[test]
        fn hostile_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = peek(&data);
            let mut tls = vec![0x16, 3, 1];
            tls.extend_from_slice(&data);
            let _ = peek(&tls);
        }

        #[test]
        fn mutated_hello_never_panics(i in 0usize..200, b in any::<u8>()) {
            let mut h = client_hello("example.com");
            let i = i % h.len();
            h[i] = b;
            let _ = peek(&h);
        }
    }
}
