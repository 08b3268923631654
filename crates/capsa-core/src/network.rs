//! A sandbox's network: plain, serde-able policy types, their CLI syntax and
//! validation. The stack that enforces them is `capsa-net`; the guest's
//! addresses are fixed (the same in every VM, each stack is private), so
//! pooled snapshots stay identical.
//!
//! Rule syntax (`--allow RULE`, `--deny RULE`): `[tcp:|udp:]TARGET[:PORTS]`
//! where TARGET is a domain (`example.com`), a wildcard (`*.example.com`,
//! which also matches `example.com`), an IPv4 address or CIDR
//! (`203.0.113.0/24`), `host` (the host's loopback, reached by the guest at
//! [`GUEST_GATEWAY`]) or `*` (any address), and PORTS is `443` or `8000-8100`.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The guest's own address (a /24 with the gateway).
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The guest's prefix length.
pub const GUEST_PREFIX: u8 = 24;
/// The gateway: capsa's stack; `host` rules make its ports reach the host's loopback.
pub const GUEST_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The only resolver the guest may use (capsa's, answering on port 53).
pub const GUEST_DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// Most rules a policy may hold (each new flow walks them).
pub const MAX_RULES: usize = 256;
/// Most port forwards a sandbox may have.
pub const MAX_FORWARDS: usize = 64;
/// Longest domain name (RFC 1035).
pub const MAX_DOMAIN_LEN: usize = 253;

/// A sandbox's network. Absent from a spec (`None`) means no NIC at all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// Where the guest may connect.
    #[serde(default)]
    pub policy: NetworkPolicy,
    /// Host ports forwarded into the guest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwards: Vec<PortForward>,
}

/// The egress policy: rules first (first match wins), then the mode.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicy {
    /// What happens to a flow no rule matched.
    #[serde(default)]
    pub mode: NetworkMode,
    /// Rules in order; the first that matches a flow decides it.
    #[serde(default)]
    pub rules: Vec<NetRule>,
}

/// The network mode of a sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// No NIC at all.
    None,
    /// Everything but the private floor (loopback, RFC 1918, CGNAT,
    /// link-local, metadata, multicast, the host's own addresses).
    #[default]
    Public,
    /// Nothing but what an allow rule names.
    Deny,
}

impl NetworkMode {
    /// Lower-case name, as on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::None => "none",
            NetworkMode::Public => "public",
            NetworkMode::Deny => "deny",
        }
    }
}

impl std::fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for NetworkMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(NetworkMode::None),
            "public" => Ok(NetworkMode::Public),
            "deny" => Ok(NetworkMode::Deny),
            _ => Err(Error::invalid(
                "network",
                format!("unknown network mode {s:?}"),
                "use one of: none, public, deny",
            )),
        }
    }
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let the flow through (over the private floor too).
    Allow,
    /// Refuse it (RST, NXDOMAIN).
    Deny,
}

/// A transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// What a rule names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Any address.
    Any,
    /// A domain (lower case, no trailing dot); addresses match through DNS pins.
    Domain(String),
    /// A domain and all its subdomains (stored without the `*.`).
    Wildcard(String),
    /// An IPv4 network.
    Cidr {
        /// Network address (host bits zero).
        addr: Ipv4Addr,
        /// Prefix length, 0..=32.
        prefix: u8,
    },
    /// The host's loopback, reached at the gateway address.
    Host,
}

impl Target {
    /// Whether `name` (lower case, no trailing dot) falls under this target.
    pub fn matches_name(&self, name: &str) -> bool {
        match self {
            Target::Domain(d) => name == d,
            Target::Wildcard(d) => {
                name == d
                    || (name.len() > d.len()
                        && name.ends_with(d.as_str())
                        && name.as_bytes()[name.len() - d.len() - 1] == b'.')
            }
            Target::Any => true,
            _ => false,
        }
    }

    /// Whether the target names domains.
    pub fn is_domain(&self) -> bool {
        matches!(self, Target::Domain(_) | Target::Wildcard(_))
    }
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (>= first).
    pub last: u16,
}

impl PortRange {
    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

/// One policy rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetRule {
    /// Allow or deny.
    pub action: Action,
    /// What it names.
    pub target: Target,
    /// Ports it covers (all when absent).
    #[serde(default)]
    pub ports: Option<PortRange>,
    /// Protocol it covers (both when absent).
    #[serde(default)]
    pub proto: Option<Proto>,
}

impl NetRule {
    /// Parses the CLI form (see the module docs) with the given action.
    pub fn parse(action: Action, s: &str) -> Result<Self> {
        let bad = |problem: String| {
            Error::invalid(
                "network rule",
                problem,
                "write [tcp:|udp:]TARGET[:PORT[-PORT]] with TARGET a domain, *.domain, \
                 an IPv4 address or CIDR, host or *; e.g. --allow example.com:443, \
                 --allow 203.0.113.0/24, --allow host:11434",
            )
        };
        let s = s.trim();
        if s.is_empty() || s.len() > MAX_DOMAIN_LEN + 20 {
            return Err(bad(format!("rule {s:?} is empty or too long")));
        }
        let (proto, rest) = match s.split_once(':') {
            Some(("tcp", r)) => (Some(Proto::Tcp), r),
            Some(("udp", r)) => (Some(Proto::Udp), r),
            _ => (None, s),
        };
        let (target_s, ports) = match rest.rsplit_once(':') {
            Some((t, p)) => (t, Some(parse_ports(p).map_err(bad)?)),
            None => (rest, None),
        };
        let target = parse_target(target_s).map_err(bad)?;
        let rule = NetRule {
            action,
            target,
            ports,
            proto,
        };
        rule.validate()?;
        Ok(rule)
    }

    /// Checks the rule's fields (also for rules that arrive as JSON).
    pub fn validate(&self) -> Result<()> {
        let bad = |problem: String, fix: &str| Error::invalid("network rule", problem, fix);
        match &self.target {
            Target::Domain(d) | Target::Wildcard(d) => {
                if !valid_domain(d) {
                    return Err(bad(
                        format!("{d:?} is not a domain name"),
                        "use lower-case letters, digits, '-' and '.', at most 253 characters, \
                         no trailing dot",
                    ));
                }
            }
            Target::Cidr { addr, prefix } => {
                if *prefix > 32 {
                    return Err(bad(
                        format!("prefix /{prefix} is longer than 32"),
                        "use a prefix of 0 to 32",
                    ));
                }
                if u32::from(*addr) & !mask(*prefix) != 0 {
                    return Err(bad(
                        format!("{addr}/{prefix} has host bits set"),
                        "write the network address, e.g. 10.1.0.0/16",
                    ));
                }
            }
            Target::Any | Target::Host => {}
        }
        if let Some(p) = self.ports {
            if p.first == 0 || p.first > p.last {
                return Err(bad(
                    format!("port range {}-{} is empty or starts at 0", p.first, p.last),
                    "use ports 1-65535, the first not above the last",
                ));
            }
        }
        if self.target == Target::Host && self.proto == Some(Proto::Udp) {
            return Err(bad(
                "host rules are TCP only".into(),
                "drop udp: from the host rule",
            ));
        }
        Ok(())
    }

    /// Whether the rule covers this protocol and port.
    pub fn covers(&self, proto: Proto, port: u16) -> bool {
        let proto_ok = match self.proto {
            Some(p) => p == proto,
            None => true,
        };
        let port_ok = match self.ports {
            Some(r) => r.contains(port),
            None => true,
        };
        proto_ok && port_ok
    }
}

impl std::fmt::Display for NetRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let action = match self.action {
            Action::Allow => "allow",
            Action::Deny => "deny",
        };
        write!(f, "{action} ")?;
        if let Some(p) = self.proto {
            write!(f, "{p}:")?;
        }
        match &self.target {
            Target::Any => write!(f, "*")?,
            Target::Domain(d) => write!(f, "{d}")?,
            Target::Wildcard(d) => write!(f, "*.{d}")?,
            Target::Cidr { addr, prefix } => write!(f, "{addr}/{prefix}")?,
            Target::Host => write!(f, "host")?,
        }
        match self.ports {
            Some(p) if p.first == p.last => write!(f, ":{}", p.first),
            Some(p) => write!(f, ":{}-{}", p.first, p.last),
            None => Ok(()),
        }
    }
}

/// The netmask of a prefix length (0..=32).
pub fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    }
}

fn parse_ports(p: &str) -> std::result::Result<PortRange, String> {
    let one = |s: &str| {
        s.parse::<u16>()
            .map_err(|_| format!("{s:?} is not a port (1-65535)"))
    };
    let r = match p.split_once('-') {
        Some((a, b)) => PortRange {
            first: one(a)?,
            last: one(b)?,
        },
        None => {
            let x = one(p)?;
            PortRange { first: x, last: x }
        }
    };
    Ok(r)
}

fn parse_target(t: &str) -> std::result::Result<Target, String> {
    if t == "*" {
        return Ok(Target::Any);
    }
    if t == "host" {
        return Ok(Target::Host);
    }
    if let Some(d) = t.strip_prefix("*.") {
        return Ok(Target::Wildcard(d.to_ascii_lowercase()));
    }
    if t.contains(':') {
        return Err(format!("{t:?}: IPv6 is not supported (IPv4 only)"));
    }
    let (a, prefix) = match t.split_once('/') {
        Some((a, p)) => (
            a,
            Some(
                p.parse::<u8>()
                    .map_err(|_| format!("{p:?} is not a prefix length"))?,
            ),
        ),
        None => (t, None),
    };
    if let Ok(addr) = a.parse::<Ipv4Addr>() {
        return Ok(Target::Cidr {
            addr,
            prefix: prefix.unwrap_or(32),
        });
    }
    if prefix.is_some() || a.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!("{t:?} is not an IPv4 address or CIDR"));
    }
    Ok(Target::Domain(
        a.trim_end_matches('.').to_ascii_lowercase().to_string(),
    ))
}

/// Whether `d` is a plausible lower-case DNS name without a trailing dot.
pub fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= MAX_DOMAIN_LEN
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        })
}

impl NetworkPolicy {
    /// Checks every rule and the rule count.
    pub fn validate(&self) -> Result<()> {
        if self.rules.len() > MAX_RULES {
            return Err(Error::invalid(
                "network policy",
                format!("{} rules", self.rules.len()),
                format!("use at most {MAX_RULES} rules (wildcards and CIDRs cover many names)"),
            ));
        }
        for r in &self.rules {
            r.validate()?;
        }
        Ok(())
    }
}

/// A host port forwarded to a guest port (TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    /// Host address to listen on (127.0.0.1 unless told otherwise).
    pub host_ip: Ipv4Addr,
    /// Host port.
    pub host_port: u16,
    /// Guest port.
    pub guest_port: u16,
}

impl PortForward {
    /// Parses `[HOST_IP:]HOSTPORT:GUESTPORT`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |p: String| {
            Error::invalid(
                "port forward",
                p,
                "write [HOST_IP:]HOSTPORT:GUESTPORT, e.g. -p 8080:80 or -p 0.0.0.0:8080:80",
            )
        };
        let parts: Vec<&str> = s.split(':').collect();
        let (ip, hp, gp) = match parts.as_slice() {
            [h, g] => ("127.0.0.1", *h, *g),
            [i, h, g] => (*i, *h, *g),
            _ => return Err(bad(format!("{s:?} has the wrong number of parts"))),
        };
        let host_ip = ip
            .parse()
            .map_err(|_| bad(format!("{ip:?} is not an IPv4 address")))?;
        let port = |p: &str| match p.parse::<u16>() {
            Ok(x) if x > 0 => Ok(x),
            _ => Err(bad(format!("{p:?} is not a port (1-65535)"))),
        };
        Ok(Self {
            host_ip,
            host_port: port(hp)?,
            guest_port: port(gp)?,
        })
    }
}

impl NetworkSpec {
    /// Checks the policy and the forwards.
    pub fn validate(&self) -> Result<()> {
        if self.policy.mode == NetworkMode::None {
            return Err(Error::invalid(
                "network",
                "a network spec with mode none",
                "leave the network out of the spec for no NIC",
            ));
        }
        self.policy.validate()?;
        if self.forwards.len() > MAX_FORWARDS {
            return Err(Error::invalid(
                "port forward",
                format!("{} forwards", self.forwards.len()),
                format!("use at most {MAX_FORWARDS}"),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for f in &self.forwards {
            if f.host_port == 0 || f.guest_port == 0 {
                return Err(Error::invalid(
                    "port forward",
                    "port 0",
                    "use ports 1-65535",
                ));
            }
            if !seen.insert((f.host_ip, f.host_port)) {
                return Err(Error::invalid(
                    "port forward",
                    format!("host port {}:{} forwarded twice", f.host_ip, f.host_port),
                    "forward each host port once",
                ));
            }
        }
        Ok(())
    }
}

/// Why a flow or a query was decided as it was; one entry of the decision log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetDecision {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// `tcp`, `udp` or `dns`.
    pub kind: String,
    /// What was asked: `1.2.3.4:443`, or a DNS name.
    pub what: String,
    /// Allowed or not.
    pub allowed: bool,
    /// Why, in words (the rule, the floor, the mode, the SNI...).
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_print() {
        let r = NetRule::parse(Action::Allow, "example.com:443").unwrap();
        assert_eq!(r.target, Target::Domain("example.com".into()));
        assert_eq!(
            r.ports,
            Some(PortRange {
                first: 443,
                last: 443
            })
        );
        assert_eq!(r.to_string(), "allow example.com:443");
        let r = NetRule::parse(Action::Deny, "udp:10.0.0.0/8:1000-2000").unwrap();
        assert_eq!(r.proto, Some(Proto::Udp));
        assert_eq!(r.to_string(), "deny udp:10.0.0.0/8:1000-2000");
        let r = NetRule::parse(Action::Allow, "*.Example.com").unwrap();
        assert!(r.target.matches_name("a.b.example.com"));
        assert!(r.target.matches_name("example.com"));
        assert!(!r.target.matches_name("badexample.com"));
        assert_eq!(
            NetRule::parse(Action::Allow, "host:11434").unwrap().target,
            Target::Host
        );
        assert_eq!(
            NetRule::parse(Action::Allow, "1.2.3.4").unwrap().target,
            Target::Cidr {
                addr: Ipv4Addr::new(1, 2, 3, 4),
                prefix: 32
            }
        );
        for bad in [
            "",
            "10.0.0.1/8",
            "1.2.3.4/40",
            "a..b",
            "x.com:0",
            "x.com:9-3",
            "x.com:http",
            "::1",
            "999.1.1.1",
            "udp:host:80",
            "-a.com",
        ] {
            let e = NetRule::parse(Action::Allow, bad).unwrap_err();
            assert!(e.to_string().contains("Fix:"), "{bad}: {e}");
        }
    }

    #[test]
    fn forwards_and_modes() {
        let f = PortForward::parse("8080:80").unwrap();
        assert_eq!(f.host_ip, Ipv4Addr::LOCALHOST);
        assert_eq!((f.host_port, f.guest_port), (8080, 80));
        assert_eq!(
            PortForward::parse("0.0.0.0:1:2").unwrap().host_ip,
            Ipv4Addr::UNSPECIFIED
        );
        assert!(PortForward::parse("80").is_err());
        assert!(PortForward::parse("x:1:2").is_err());
        assert_eq!("DENY".parse::<NetworkMode>().unwrap(), NetworkMode::Deny);
        assert!("open".parse::<NetworkMode>().is_err());
        let spec = NetworkSpec {
            policy: NetworkPolicy {
                mode: NetworkMode::Deny,
                rules: vec![NetRule::parse(Action::Allow, "a.com").unwrap()],
            },
            forwards: vec![f, f],
        };
        assert!(spec.validate().is_err());
        let j = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<NetworkSpec>(&j).unwrap(), spec);
    }
}
