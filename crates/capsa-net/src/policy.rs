//! Decisions: which flows and names a policy lets through, and why. Pure
//! logic over the policy, the DNS pins and the host's own addresses.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use capsa_core::{
    mask, Action, NetRule, NetworkMode, NetworkPolicy, Proto, Target, GUEST_DNS, GUEST_GATEWAY,
};

/// Most names pinned per sandbox; the oldest expire first beyond it.
pub const MAX_PINS: usize = 4096;
/// Most addresses kept per name.
pub const MAX_ADDRS_PER_NAME: usize = 16;
/// Shortest time an answer stays pinned (guests cache longer than TTLs say).
pub const MIN_PIN: Duration = Duration::from_secs(300);
/// Longest.
pub const MAX_PIN: Duration = Duration::from_secs(24 * 3600);

/// Port of DNS over TLS, denied unless a rule names it.
pub const DOT_PORT: u16 = 853;

/// Whether `ip` is in the private floor (before the host's own addresses).
pub fn in_floor(ip: Ipv4Addr) -> Option<&'static str> {
    const NETS: &[([u8; 4], u8, &str)] = &[
        ([0, 0, 0, 0], 8, "this-network"),
        ([10, 0, 0, 0], 8, "RFC 1918"),
        ([100, 64, 0, 0], 10, "CGNAT (100.64/10)"),
        ([127, 0, 0, 0], 8, "loopback"),
        ([169, 254, 169, 254], 32, "cloud metadata"),
        ([169, 254, 0, 0], 16, "link-local"),
        ([172, 16, 0, 0], 12, "RFC 1918"),
        ([192, 168, 0, 0], 16, "RFC 1918"),
        ([224, 0, 0, 0], 4, "multicast"),
        ([240, 0, 0, 0], 4, "reserved"),
    ];
    NETS.iter()
        .find(|(a, p, _)| cidr_contains(Ipv4Addr::from(*a), *p, ip))
        .map(|(_, _, why)| *why)
}

fn cidr_contains(net: Ipv4Addr, prefix: u8, ip: Ipv4Addr) -> bool {
    u32::from(ip) & mask(prefix) == u32::from(net) & mask(prefix)
}

/// Addresses each name resolved to, with their expiry.
#[derive(Debug, Default)]
pub struct Pins {
    by_name: HashMap<String, Vec<(Ipv4Addr, Instant)>>,
}

impl Pins {
    /// Records that `name` resolved to `addrs` (with TTLs) now.
    pub fn pin(&mut self, name: &str, addrs: &[(Ipv4Addr, u32)], now: Instant) {
        self.expire(now);
        if self.by_name.len() >= MAX_PINS && !self.by_name.contains_key(name) {
            // Forget the name that expires first.
            if let Some(k) = self
                .by_name
                .iter()
                .min_by_key(|(_, v)| v.iter().map(|(_, t)| *t).max())
                .map(|(k, _)| k.clone())
            {
                self.by_name.remove(&k);
            }
        }
        let e = self.by_name.entry(name.to_string()).or_default();
        for (ip, ttl) in addrs {
            let until = now + Duration::from_secs(u64::from(*ttl)).clamp(MIN_PIN, MAX_PIN);
            if let Some(x) = e.iter_mut().find(|(a, _)| a == ip) {
                x.1 = x.1.max(until);
            } else if e.len() < MAX_ADDRS_PER_NAME {
                e.push((*ip, until));
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        self.by_name.retain(|_, v| {
            v.retain(|(_, t)| *t > now);
            !v.is_empty()
        });
    }

    /// Whether `name` is pinned to `ip`.
    pub fn has(&self, name: &str, ip: Ipv4Addr, now: Instant) -> bool {
        self.by_name
            .get(name)
            .is_some_and(|v| v.iter().any(|(a, t)| *a == ip && *t > now))
    }

    /// Names pinned to `ip` that `target` covers.
    fn names_for<'a>(
        &'a self,
        target: &'a Target,
        ip: Ipv4Addr,
        now: Instant,
    ) -> impl Iterator<Item = &'a str> + 'a {
        self.by_name
            .iter()
            .filter(move |(n, v)| {
                target.matches_name(n) && v.iter().any(|(a, t)| *a == ip && *t > now)
            })
            .map(|(n, _)| n.as_str())
    }

    /// Number of pinned names.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether nothing is pinned.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// What to do with a new TCP flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpVerdict {
    /// Dial `to`; if `sni_port` the first bytes must name an allowed, pinned domain.
    Allow {
        /// Where the upstream is (the host's loopback for `host` rules).
        to: std::net::SocketAddrV4,
        /// Check the SNI or Host against the pins before forwarding data.
        inspect: bool,
        /// Why.
        reason: String,
    },
    /// Refuse at once (RST).
    Deny(String),
}

/// What to do with a DNS question for a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameVerdict {
    /// Forward it upstream.
    Resolve(String),
    /// Answer NXDOMAIN here.
    Deny(String),
}

fn describe(i: usize, r: &NetRule) -> String {
    format!("rule {} ({r})", i + 1)
}

/// Decides a TCP connect from the guest to `ip:port`.
pub fn decide_tcp(
    p: &NetworkPolicy,
    pins: &Pins,
    host_addrs: &[Ipv4Addr],
    ip: Ipv4Addr,
    port: u16,
    now: Instant,
) -> TcpVerdict {
    if ip == GUEST_GATEWAY {
        for (i, r) in p.rules.iter().enumerate() {
            if r.target == Target::Host && r.covers(Proto::Tcp, port) {
                return match r.action {
                    Action::Allow => TcpVerdict::Allow {
                        to: std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
                        inspect: false,
                        reason: format!("{} allows the host's port {port}", describe(i, r)),
                    },
                    Action::Deny => TcpVerdict::Deny(format!(
                        "{} denies the host's port {port}",
                        describe(i, r)
                    )),
                };
            }
        }
        return TcpVerdict::Deny(format!(
            "the host's loopback is closed unless a host rule allows the port \
             (--allow host:{port})"
        ));
    }
    if ip == GUEST_DNS {
        return TcpVerdict::Deny("capsa's resolver answers over UDP only".into());
    }
    let floor =
        in_floor(ip).or_else(|| host_addrs.contains(&ip).then_some("the host's own address"));
    for (i, r) in p.rules.iter().enumerate() {
        if !r.covers(Proto::Tcp, port) {
            continue;
        }
        let hit = match &r.target {
            Target::Any => floor.is_none() || r.action == Action::Deny,
            Target::Cidr { addr, prefix } => cidr_contains(*addr, *prefix, ip),
            Target::Domain(_) | Target::Wildcard(_) => {
                pins.names_for(&r.target, ip, now).next().is_some()
            }
            Target::Host => false,
        };
        if !hit {
            continue;
        }
        return match r.action {
            Action::Allow => TcpVerdict::Allow {
                to: std::net::SocketAddrV4::new(ip, port),
                inspect: r.target.is_domain(),
                reason: format!("{} allows it", describe(i, r)),
            },
            Action::Deny => TcpVerdict::Deny(format!("{} denies it", describe(i, r))),
        };
    }
    if let Some(why) = floor {
        return TcpVerdict::Deny(format!(
            "{ip} is in the private floor ({why}); only an explicit rule opens it"
        ));
    }
    if port == DOT_PORT {
        return TcpVerdict::Deny("DNS over TLS (port 853) is denied: use capsa's resolver".into());
    }
    match p.mode {
        NetworkMode::Public => TcpVerdict::Allow {
            to: std::net::SocketAddrV4::new(ip, port),
            inspect: false,
            reason: "public mode allows public addresses".into(),
        },
        NetworkMode::Deny | NetworkMode::None => TcpVerdict::Deny(
            "deny mode: no rule allows this address and port (a domain must be resolved \
             through capsa's DNS to match a domain rule)"
                .into(),
        ),
    }
}

/// Decides a DNS question for `name` (lower case, no trailing dot).
pub fn decide_name(p: &NetworkPolicy, name: &str) -> NameVerdict {
    for (i, r) in p.rules.iter().enumerate() {
        if !(r.target.is_domain() || r.target == Target::Any) || !r.target.matches_name(name) {
            continue;
        }
        return match r.action {
            Action::Allow => NameVerdict::Resolve(format!("{} allows the name", describe(i, r))),
            Action::Deny => NameVerdict::Deny(format!("{} denies the name", describe(i, r))),
        };
    }
    match p.mode {
        NetworkMode::Public => NameVerdict::Resolve("public mode resolves names".into()),
        NetworkMode::Deny | NetworkMode::None => {
            NameVerdict::Deny("deny mode: no rule allows the name".into())
        }
    }
}

/// Whether an answer address for a name may be kept: private ones only if
/// an explicit CIDR allow rule covers them (DNS rebinding otherwise).
pub fn answer_allowed(p: &NetworkPolicy, host_addrs: &[Ipv4Addr], ip: Ipv4Addr) -> bool {
    if in_floor(ip).is_none() && !host_addrs.contains(&ip) {
        return true;
    }
    p.rules.iter().any(|r| {
        r.action == Action::Allow
            && matches!(&r.target, Target::Cidr { addr, prefix } if cidr_contains(*addr, *prefix, ip))
    })
}

/// Decides whether a flow whose first bytes name `name` may go on to `ip:port`.
pub fn decide_sni(
    p: &NetworkPolicy,
    pins: &Pins,
    name: &str,
    ip: Ipv4Addr,
    port: u16,
    now: Instant,
) -> Result<String, String> {
    for (i, r) in p.rules.iter().enumerate() {
        if !r.target.is_domain() || !r.covers(Proto::Tcp, port) || !r.target.matches_name(name) {
            continue;
        }
        if r.action == Action::Deny {
            return Err(format!("{name:?}: {} denies it", describe(i, r)));
        }
        if pins.has(name, ip, now) {
            return Ok(format!(
                "{name:?} is pinned to {ip} under {}",
                describe(i, r)
            ));
        }
        return Err(format!(
            "the SNI/Host {name:?} was never resolved to {ip} (SNI spoofing?)"
        ));
    }
    Err(format!(
        "the SNI/Host {name:?} matches no allow rule for port {port}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsa_core::NetRule;

    fn pol(mode: NetworkMode, rules: &[(Action, &str)]) -> NetworkPolicy {
        NetworkPolicy {
            mode,
            rules: rules
                .iter()
                .map(|(a, s)| NetRule::parse(*a, s).unwrap())
                .collect(),
        }
    }

    #[test]
    fn floor_and_modes() {
        let now = Instant::now();
        let pins = Pins::default();
        let public = pol(NetworkMode::Public, &[]);
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "224.0.0.1",
        ] {
            assert!(
                matches!(
                    decide_tcp(&public, &pins, &[], ip(private), 80, now),
                    TcpVerdict::Deny(_)
                ),
                "{private}"
            );
        }
        assert!(matches!(
            decide_tcp(&public, &pins, &[], ip("198.18.0.1"), 80, now),
            TcpVerdict::Allow { .. }
        ));
        assert!(matches!(
            decide_tcp(
                &public,
                &pins,
                &[ip("198.18.0.1")],
                ip("198.18.0.1"),
                80,
                now
            ),
            TcpVerdict::Deny(_)
        ));
        assert!(matches!(
            decide_tcp(&public, &pins, &[], ip("198.18.0.1"), 853, now),
            TcpVerdict::Deny(_)
        ));
        let deny = pol(NetworkMode::Deny, &[]);
        assert!(matches!(
            decide_tcp(&deny, &pins, &[], ip("198.18.0.1"), 80, now),
            TcpVerdict::Deny(_)
        ));
        // An explicit CIDR rule opens the floor; `*` does not.
        let p = pol(
            NetworkMode::Deny,
            &[(Action::Allow, "*"), (Action::Allow, "169.254.169.254:80")],
        );
        assert!(matches!(
            decide_tcp(&p, &pins, &[], ip("169.254.169.254"), 80, now),
            TcpVerdict::Allow { .. }
        ));
        assert!(matches!(
            decide_tcp(&p, &pins, &[], ip("10.0.0.1"), 80, now),
            TcpVerdict::Deny(_)
        ));
        // The host's loopback only through a host rule, port-scoped.
        let p = pol(NetworkMode::Public, &[(Action::Allow, "host:11434")]);
        assert_eq!(
            decide_tcp(&p, &pins, &[], GUEST_GATEWAY, 11434, now),
            TcpVerdict::Allow {
                to: "127.0.0.1:11434".parse().unwrap(),
                inspect: false,
                reason: "rule 1 (allow host:11434) allows the host's port 11434".into()
            }
        );
        assert!(matches!(
            decide_tcp(&p, &pins, &[], GUEST_GATEWAY, 22, now),
            TcpVerdict::Deny(_)
        ));
    }

    #[test]
    fn domains_pins_and_sni() {
        let now = Instant::now();
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let p = pol(
            NetworkMode::Deny,
            &[
                (Action::Deny, "bad.example.com"),
                (Action::Allow, "*.example.com:443"),
            ],
        );
        assert!(matches!(
            decide_name(&p, "bad.example.com"),
            NameVerdict::Deny(_)
        ));
        assert!(matches!(
            decide_name(&p, "api.example.com"),
            NameVerdict::Resolve(_)
        ));
        assert!(matches!(decide_name(&p, "evil.org"), NameVerdict::Deny(_)));
        let mut pins = Pins::default();
        // Never resolved: refused.
        assert!(matches!(
            decide_tcp(&p, &pins, &[], ip("198.18.0.5"), 443, now),
            TcpVerdict::Deny(_)
        ));
        pins.pin("api.example.com", &[(ip("198.18.0.5"), 60)], now);
        assert!(matches!(
            decide_tcp(&p, &pins, &[], ip("198.18.0.5"), 443, now),
            TcpVerdict::Allow { inspect: true, .. }
        ));
        // Port-scoped: 8443 refused.
        assert!(matches!(
            decide_tcp(&p, &pins, &[], ip("198.18.0.5"), 8443, now),
            TcpVerdict::Deny(_)
        ));
        assert!(decide_sni(&p, &pins, "api.example.com", ip("198.18.0.5"), 443, now).is_ok());
        assert!(decide_sni(&p, &pins, "other.example.com", ip("198.18.0.5"), 443, now).is_err());
        assert!(decide_sni(&p, &pins, "evil.org", ip("198.18.0.5"), 443, now).is_err());
        // Pins expire.
        assert!(!pins.has("api.example.com", ip("198.18.0.5"), now + MAX_PIN));
        // Rebinding: private answers dropped unless a CIDR rule allows them.
        assert!(!answer_allowed(&p, &[], ip("10.0.0.1")));
        assert!(answer_allowed(&p, &[], ip("198.18.0.1")));
        let p2 = pol(NetworkMode::Deny, &[(Action::Allow, "10.0.0.0/8")]);
        assert!(answer_allowed(&p2, &[], ip("10.0.0.1")));
    }

    #[test]
    fn pins_are_bounded() {
        let now = Instant::now();
        let mut pins = Pins::default();
        for i in 0..(MAX_PINS + 10) {
            pins.pin(
                &format!("n{i}.com"),
                &[(Ipv4Addr::new(198, 18, 0, 1), 60)],
                now,
            );
        }
        assert!(pins.len() <= MAX_PINS);
    }
}
