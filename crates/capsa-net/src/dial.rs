//! Outbound connections. Replaceable, so tests never leave loopback.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;

/// How long a dial may take before the guest gets its RST.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens the host side of a guest flow.
#[async_trait::async_trait]
pub trait Dialer: Send + Sync + 'static {
    /// Connects to `to`.
    async fn dial(&self, to: SocketAddrV4) -> std::io::Result<TcpStream>;
}

/// Dials the real address.
#[derive(Debug, Default)]
pub struct SystemDialer;

#[async_trait::async_trait]
impl Dialer for SystemDialer {
    async fn dial(&self, to: SocketAddrV4) -> std::io::Result<TcpStream> {
        match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(to)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connecting to {to} timed out"),
            )),
        }
    }
}

/// Test dialer: maps the benchmarking range 198.18.0.0/15 onto 127.0.0.1
/// (same port), passes 127.0.0.0/8 through, refuses everything else, and
/// counts its dials. Selected by `CAPSA_NET_TEST_DIALER=1` (tests only).
#[derive(Debug, Default)]
pub struct LoopbackDialer {
    /// Dials made (mapped or passed through).
    pub dials: AtomicU64,
}

impl LoopbackDialer {
    /// Where `to` goes, or `None` for an address outside the test range.
    pub fn map(to: SocketAddrV4) -> Option<SocketAddrV4> {
        let o = to.ip().octets();
        if o[0] == 198 && (o[1] & 0xfe) == 18 {
            Some(SocketAddrV4::new(Ipv4Addr::LOCALHOST, to.port()))
        } else if o[0] == 127 {
            Some(to)
        } else {
            None
        }
    }
}

#[async_trait::async_trait]
impl Dialer for LoopbackDialer {
    async fn dial(&self, to: SocketAddrV4) -> std::io::Result<TcpStream> {
        let Some(real) = Self::map(to) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("test dialer refuses {to}: only 198.18.0.0/15 and loopback"),
            ));
        };
        self.dials.fetch_add(1, Ordering::Relaxed);
        SystemDialer.dial(real).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_only_the_test_range() {
        let m = |s: &str| LoopbackDialer::map(s.parse().unwrap());
        assert_eq!(m("198.19.3.4:80"), Some("127.0.0.1:80".parse().unwrap()));
        assert_eq!(m("127.0.0.1:5"), Some("127.0.0.1:5".parse().unwrap()));
        assert_eq!(m("198.20.0.1:80"), None);
        assert_eq!(m("8.8.8.8:53"), None);
    }
}
