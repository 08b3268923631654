//! capsa-net: the per-sandbox userspace network.
//!
//! QEMU emulates a `virtio-net-pci` NIC (so it migrates with snapshots) whose
//! backend is `-netdev stream` over a socket pair: QEMU holds one end, this
//! crate the other. Frames go into a [smoltcp] stack with `any_ip`, which
//! stands in for every address the guest talks to; each guest TCP flow is
//! proxied to a host socket under the sandbox's [`NetworkPolicy`], DNS is
//! answered by capsa (see [`dns`]), and every decision goes to a bounded log.
//!
//! The dialer and the resolver are replaceable parts ([`Dialer`],
//! [`Resolver`]): tests never reach past loopback.
#![deny(missing_docs)]

pub mod dial;
pub mod dns;
pub mod frame;
pub mod log;
pub mod policy;
pub mod sni;
mod stack;

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, RwLock};

use capsa_core::{NetDecision, NetworkPolicy, NetworkSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

pub use dial::{Dialer, LoopbackDialer, SystemDialer};
pub use dns::{Resolver, UdpResolver};
pub use log::DecisionLog;
pub use stack::{GATEWAY_MAC, MAX_FLOWS};

/// The guest NIC's MAC address (fixed: every VM looks the same, so pooled
/// snapshots stay identical).
pub const GUEST_MAC: &str = "52:54:00:12:34:56";
/// Upstream resolver override, `IP:PORT` (tests use a fake server on loopback).
pub const DNS_ENV: &str = "CAPSA_NET_DNS";
/// Set to `1` to use [`LoopbackDialer`] (tests only: 198.18.0.0/15 -> 127.0.0.1).
pub const TEST_DIALER_ENV: &str = "CAPSA_NET_TEST_DIALER";

/// Errors of the network stack.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The socket pair for QEMU could not be made.
    #[error("cannot create the network socket pair: {0}")]
    SocketPair(#[source] std::io::Error),
    /// A forwarded host port cannot be listened on.
    #[error(
        "cannot listen on {addr} for -p {addr}:{guest_port}: {source}. Fix: pick a free host port"
    )]
    Forward {
        /// The host address and port.
        addr: std::net::SocketAddrV4,
        /// The guest port.
        guest_port: u16,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `CAPSA_NET_DNS` is not an address.
    #[error("{DNS_ENV}={0:?} is not IP:PORT. Fix: e.g. {DNS_ENV}=127.0.0.1:5353")]
    BadDnsEnv(String),
}

/// What a stack is made of.
pub struct NetConfig {
    /// The initial policy.
    pub policy: NetworkPolicy,
    /// Host ports forwarded into the guest.
    pub forwards: Vec<capsa_core::PortForward>,
    /// Opens host sockets.
    pub dialer: Arc<dyn Dialer>,
    /// Resolves names upstream.
    pub resolver: Arc<dyn Resolver>,
}

impl NetConfig {
    /// The parts for `spec` as the environment says: the system dialer and
    /// resolver, or the overrides of [`DNS_ENV`] and [`TEST_DIALER_ENV`].
    pub fn from_env(spec: &NetworkSpec) -> Result<Self, NetError> {
        let resolver: Arc<dyn Resolver> = match std::env::var(DNS_ENV) {
            Ok(v) => Arc::new(UdpResolver::new(
                v.parse().map_err(|_| NetError::BadDnsEnv(v.clone()))?,
            )),
            // Not fatal: a sandbox may need no names; questions get SERVFAIL
            // and the log says why.
            Err(_) => match UdpResolver::from_system() {
                Some(r) => Arc::new(r),
                None => Arc::new(dns::NoResolver),
            },
        };
        let dialer: Arc<dyn Dialer> = if std::env::var(TEST_DIALER_ENV).as_deref() == Ok("1") {
            Arc::new(LoopbackDialer::default())
        } else {
            Arc::new(SystemDialer)
        };
        Ok(Self {
            policy: spec.policy.clone(),
            forwards: spec.forwards.clone(),
            dialer,
            resolver,
        })
    }
}

/// State shared between the stack and its handle.
pub(crate) struct Shared {
    policy: RwLock<NetworkPolicy>,
    pub(crate) log: DecisionLog,
    pub(crate) dialer: Arc<dyn Dialer>,
    pub(crate) resolver: Arc<dyn Resolver>,
}

impl Shared {
    pub(crate) fn policy(&self) -> NetworkPolicy {
        self.policy
            .read()
            .map(|p| p.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }
}

/// Most host ports forwarded into one sandbox.
pub const MAX_FORWARDS: usize = 64;

/// A running stack; dropping it stops the stack.
pub struct NetHandle {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Forwarded host ports, each with its listener task.
    forwards: std::sync::Mutex<Vec<(capsa_core::PortForward, tokio::task::JoinHandle<()>)>>,
    /// Where listeners hand accepted connections to the stack.
    events: mpsc::Sender<stack::Event>,
}

impl std::fmt::Debug for NetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetHandle").finish_non_exhaustive()
    }
}

impl NetHandle {
    /// Replaces the policy; new flows and questions follow it at once.
    pub fn set_policy(&self, p: NetworkPolicy) -> capsa_core::Result<()> {
        p.validate()?;
        match self.shared.policy.write() {
            Ok(mut g) => *g = p,
            Err(e) => *e.into_inner() = p,
        }
        self.shared
            .log
            .record("policy", "", true, "the policy was replaced");
        Ok(())
    }

    /// The policy in force.
    pub fn policy(&self) -> NetworkPolicy {
        self.shared.policy()
    }

    /// The latest decisions, oldest first.
    pub fn log(&self) -> Vec<NetDecision> {
        self.shared.log.snapshot()
    }

    /// Forwards a host port into the guest from now on (needs a tokio
    /// runtime). A host address and port already forwarded, or one the host
    /// cannot listen on, is refused.
    pub fn add_forward(&self, f: capsa_core::PortForward) -> capsa_core::Result<()> {
        let mut fwds = self.forwards.lock().unwrap_or_else(|e| e.into_inner());
        if fwds
            .iter()
            .any(|(g, _)| g.host_port == f.host_port && g.host_ip == f.host_ip)
        {
            return Err(capsa_core::Error::invalid(
                "port forward",
                format!("{}:{} is already forwarded", f.host_ip, f.host_port),
                "remove it first (`capsa port rm`), or pick another host port",
            ));
        }
        if fwds.len() >= MAX_FORWARDS {
            return Err(capsa_core::Error::invalid(
                "port forward",
                format!("this sandbox already forwards {MAX_FORWARDS} ports"),
                "remove one first (`capsa port rm`)",
            ));
        }
        let l = listen(&f).map_err(|e| {
            capsa_core::Error::invalid("port forward", e.to_string(), "pick a free host port")
        })?;
        let task = tokio::spawn(stack::run_forward(l, f.guest_port, self.events.clone()));
        fwds.push((f, task));
        self.shared.log.record(
            "forward",
            format!("{}:{} -> {}", f.host_ip, f.host_port, f.guest_port),
            true,
            "a port forward was added",
        );
        Ok(())
    }

    /// Stops forwarding `host_ip:host_port`; returns the forward removed,
    /// once the host port is closed. Connections already made through it go on.
    pub async fn remove_forward(
        &self,
        host_ip: std::net::Ipv4Addr,
        host_port: u16,
    ) -> capsa_core::Result<capsa_core::PortForward> {
        let (f, task) = self.take_forward(host_ip, host_port)?;
        task.abort();
        // The listener closes when the cancelled task is dropped: wait for it.
        let _ = task.await;
        self.shared.log.record(
            "forward",
            format!("{}:{} -> {}", f.host_ip, f.host_port, f.guest_port),
            true,
            "a port forward was removed",
        );
        Ok(f)
    }

    fn take_forward(
        &self,
        host_ip: std::net::Ipv4Addr,
        host_port: u16,
    ) -> capsa_core::Result<(capsa_core::PortForward, tokio::task::JoinHandle<()>)> {
        let mut fwds = self.forwards.lock().unwrap_or_else(|e| e.into_inner());
        let Some(i) = fwds
            .iter()
            .position(|(f, _)| f.host_port == host_port && f.host_ip == host_ip)
        else {
            return Err(capsa_core::Error::invalid(
                "port forward",
                format!("{host_ip}:{host_port} is not forwarded"),
                "list the forwards with `capsa port ls`",
            ));
        };
        Ok(fwds.remove(i))
    }

    /// The forwarded ports, in the order they were added.
    pub fn forwards(&self) -> Vec<capsa_core::PortForward> {
        let fwds = self.forwards.lock().unwrap_or_else(|e| e.into_inner());
        fwds.iter().map(|(f, _)| *f).collect()
    }
}

impl Drop for NetHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let fwds = self.forwards.lock().unwrap_or_else(|e| e.into_inner());
        for (_, t) in fwds.iter() {
            t.abort();
        }
    }
}

/// A listener for `f`, ready for tokio.
fn listen(f: &capsa_core::PortForward) -> Result<tokio::net::TcpListener, NetError> {
    let addr = std::net::SocketAddrV4::new(f.host_ip, f.host_port);
    let fwd_err = |source| NetError::Forward {
        addr,
        guest_port: f.guest_port,
        source,
    };
    let l = std::net::TcpListener::bind(addr).map_err(fwd_err)?;
    l.set_nonblocking(true).map_err(fwd_err)?;
    tokio::net::TcpListener::from_std(l).map_err(fwd_err)
}

/// A connected stream socket pair: (capsa's end, QEMU's end), both close-on-exec
/// (QEMU's is passed by explicit fd mapping).
pub fn socketpair() -> Result<(OwnedFd, OwnedFd), NetError> {
    let mut fds = [0i32; 2];
    // SAFETY: fds has room for the two descriptors socketpair writes.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(NetError::SocketPair(std::io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Starts the stack on `ours` (capsa's end of [`socketpair`]). Needs a tokio runtime.
pub fn spawn(ours: OwnedFd, cfg: NetConfig) -> Result<NetHandle, NetError> {
    cfg.policy
        .validate()
        .map_err(|e| NetError::SocketPair(std::io::Error::other(e.to_string())))?;
    // Forwarded ports first: a busy one fails the start with nothing running.
    let mut listeners = Vec::new();
    for f in cfg.forwards.iter().take(MAX_FORWARDS) {
        listeners.push((*f, listen(f)?));
    }
    let std_stream = std::os::unix::net::UnixStream::from(ours);
    std_stream
        .set_nonblocking(true)
        .map_err(NetError::SocketPair)?;
    let stream = tokio::net::UnixStream::from_std(std_stream).map_err(NetError::SocketPair)?;
    let (mut rd, mut wr) = stream.into_split();
    let shared = Arc::new(Shared {
        policy: RwLock::new(cfg.policy),
        log: DecisionLog::default(),
        dialer: cfg.dialer,
        resolver: cfg.resolver,
    });
    let (frames_tx, frames_rx) = mpsc::channel::<Vec<u8>>(256);
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(256);
    let reader = tokio::spawn(async move {
        let mut dec = frame::FrameDecoder::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut got = Vec::new();
            dec.push(&buf[..n], &mut |f| got.push(f.to_vec()));
            for f in got {
                if frames_tx.send(f).await.is_err() {
                    return;
                }
            }
        }
    });
    let writer = tokio::spawn(async move {
        while let Some(b) = out_rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
    });
    let st = stack::Stack::new(shared.clone(), out_tx);
    let events = st.events();
    let forwards = listeners
        .into_iter()
        .map(|(f, l)| {
            let task = tokio::spawn(stack::run_forward(l, f.guest_port, events.clone()));
            (f, task)
        })
        .collect();
    let tasks = vec![reader, writer, tokio::spawn(st.run(frames_rx))];
    Ok(NetHandle {
        shared,
        tasks,
        forwards: std::sync::Mutex::new(forwards),
        events,
    })
}
