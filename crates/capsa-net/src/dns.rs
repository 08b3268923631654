//! capsa's resolver as the guest sees it at [`capsa_core::GUEST_DNS`]:53.
//! Names the policy does not allow get NXDOMAIN here and never leave the
//! host; allowed A questions are forwarded through a replaceable
//! [`Resolver`]; answers are pinned and private ones dropped (rebinding);
//! AAAA and other types are answered empty (IPv4 only).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{rdata::A, Name, RData, Record, RecordType};

/// Most bytes of a DNS message accepted or sent over UDP.
pub const MAX_DNS: usize = 1232;
/// How long one upstream question may take.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

/// An upstream answer to an A question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Addresses with their TTLs (possibly none: the name has no A record).
    Addrs(Vec<(Ipv4Addr, u32)>),
    /// The name does not exist.
    NxDomain,
}

/// Resolves names upstream. Replaceable: tests point it at a fake server on loopback.
#[async_trait::async_trait]
pub trait Resolver: Send + Sync + 'static {
    /// The A records of `name`.
    async fn lookup_a(&self, name: &str) -> std::io::Result<Lookup>;
}

/// A plain UDP DNS client of one upstream server.
#[derive(Debug, Clone)]
pub struct UdpResolver {
    server: SocketAddr,
}

impl UdpResolver {
    /// Asks `server`.
    pub fn new(server: SocketAddr) -> Self {
        Self { server }
    }

    /// The first IPv4 `nameserver` of the host's `/etc/resolv.conf`.
    pub fn from_system() -> Option<Self> {
        let conf = std::fs::read_to_string("/etc/resolv.conf").ok()?;
        conf.lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .find_map(|a| a.trim().parse::<Ipv4Addr>().ok())
            .map(|ip| Self::new(SocketAddr::from((ip, 53))))
    }
}

#[async_trait::async_trait]
impl Resolver for UdpResolver {
    async fn lookup_a(&self, name: &str) -> std::io::Result<Lookup> {
        let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let qname = Name::from_ascii(format!("{name}.")).map_err(|e| bad(e.to_string()))?;
        let id: u16 = rand_id();
        let mut q = Message::new();
        q.set_id(id)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(qname.clone(), RecordType::A));
        let bytes = q.to_vec().map_err(|e| bad(e.to_string()))?;
        let bind: SocketAddr = if self.server.is_ipv4() {
            "0.0.0.0:0".parse().map_err(|_| bad("bind".into()))?
        } else {
            "[::]:0".parse().map_err(|_| bad("bind".into()))?
        };
        let sock = tokio::net::UdpSocket::bind(bind).await?;
        sock.connect(self.server).await?;
        let mut buf = vec![0u8; 4096];
        for _ in 0..2 {
            sock.send(&bytes).await?;
            let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT / 2;
            loop {
                let n = match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                    Ok(r) => r?,
                    Err(_) => break,
                };
                let Some(data) = buf.get(..n) else { break };
                let Ok(m) = Message::from_vec(data) else {
                    continue;
                };
                if m.id() != id || m.message_type() != MessageType::Response {
                    continue;
                }
                if m.response_code() == ResponseCode::NXDomain {
                    return Ok(Lookup::NxDomain);
                }
                let addrs = m
                    .answers()
                    .iter()
                    .filter_map(|r| match r.data() {
                        RData::A(a) => Some((a.0, r.ttl())),
                        _ => None,
                    })
                    .collect();
                return Ok(Lookup::Addrs(addrs));
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer from the upstream resolver {}", self.server),
        ))
    }
}

fn rand_id() -> u16 {
    let mut b = [0u8; 2];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 2 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        return t as u16;
    }
    u16::from_ne_bytes(b)
}

/// The resolver of a host without an IPv4 nameserver: every question fails.
#[derive(Debug, Clone, Copy)]
pub struct NoResolver;

#[async_trait::async_trait]
impl Resolver for NoResolver {
    async fn lookup_a(&self, _: &str) -> std::io::Result<Lookup> {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "no upstream DNS server: /etc/resolv.conf has no IPv4 nameserver \
                 (fix: add one, or set {}=IP:PORT)",
                crate::DNS_ENV
            ),
        ))
    }
}

/// A guest question, parsed.
#[derive(Debug, Clone)]
pub struct Question {
    /// The message id.
    pub id: u16,
    /// The name, lower case, no trailing dot.
    pub name: String,
    /// The question as asked (echoed in the answer).
    pub query: Query,
}

/// What to do with a guest datagram to the resolver.
#[derive(Debug)]
pub enum Parsed {
    /// A well-formed single question.
    Ask(Question),
    /// Answer this right away (FORMERR, NOTIMP).
    Reply(Vec<u8>),
    /// Not worth an answer (not a query, unparseable).
    Drop(&'static str),
}

/// Parses a guest datagram.
pub fn parse_query(data: &[u8]) -> Parsed {
    if data.len() > MAX_DNS {
        return Parsed::Drop("oversized DNS message");
    }
    let Ok(m) = Message::from_vec(data) else {
        return Parsed::Drop("unparseable DNS message");
    };
    if m.message_type() != MessageType::Query {
        return Parsed::Drop("DNS message is not a query");
    }
    if m.op_code() != OpCode::Query || m.queries().len() != 1 {
        let code = if m.op_code() != OpCode::Query {
            ResponseCode::NotImp
        } else {
            ResponseCode::FormErr
        };
        return match Message::error_msg(m.id(), m.op_code(), code).to_vec() {
            Ok(v) => Parsed::Reply(v),
            Err(_) => Parsed::Drop("cannot encode an error answer"),
        };
    }
    let query = m.queries()[0].clone();
    let mut name = query.name().to_ascii().to_ascii_lowercase();
    if name.ends_with('.') {
        name.pop();
    }
    Parsed::Ask(Question {
        id: m.id(),
        name,
        query,
    })
}

/// Builds the answer to `q`: `addrs` for an A question, NXDOMAIN if `nx`.
pub fn answer(q: &Question, nx: bool, addrs: &[(Ipv4Addr, u32)]) -> Option<Vec<u8>> {
    let mut m = Message::new();
    m.set_id(q.id)
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .set_recursion_available(true)
        .add_query(q.query.clone());
    if nx {
        m.set_response_code(ResponseCode::NXDomain);
    } else if q.query.query_type() == RecordType::A {
        for (ip, ttl) in addrs {
            m.add_answer(Record::from_rdata(
                q.query.name().clone(),
                *ttl,
                RData::A(A(*ip)),
            ));
        }
    }
    let v = m.to_vec().ok()?;
    (v.len() <= MAX_DNS).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut q = Message::new();
        q.set_id(7)
            .set_message_type(MessageType::Query)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        q.to_vec().unwrap()
    }

    #[test]
    fn question_and_answers() {
        let Parsed::Ask(q) = parse_query(&query("WWW.Example.com.", RecordType::A)) else {
            panic!()
        };
        assert_eq!(q.name, "www.example.com");
        let a = answer(&q, false, &[(Ipv4Addr::new(198, 18, 0, 1), 30)]).unwrap();
        let m = Message::from_vec(&a).unwrap();
        assert_eq!(m.id(), 7);
        assert_eq!(m.answers().len(), 1);
        let nx = Message::from_vec(&answer(&q, true, &[]).unwrap()).unwrap();
        assert_eq!(nx.response_code(), ResponseCode::NXDomain);
        assert!(matches!(parse_query(b"\x00\x01garbage"), Parsed::Drop(_)));
    }

    proptest! {
        #[test]
        fn hostile_queries_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Parsed::Ask(q) = parse_query(&data) {
                let _ = answer(&q, false, &[(Ipv4Addr::new(1, 2, 3, 4), 1)]);
            }
        }
    }
}
