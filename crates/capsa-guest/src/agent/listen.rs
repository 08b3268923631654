//! Accepting connections: the vsock listener and the accept loop that
//! survives transport resets.
//!
//! A VM snapshot restore resets the guest's vsock transport: every socket,
//! the listening one included, is closed under the agent (a blocked `accept`
//! fails with `ECONNRESET`, later ones with `EINVAL`), and the guest may even
//! get a new CID. The loop therefore treats any accept error that is not
//! clearly per-connection or a passing resource shortage as "this listener is
//! dead": it drops it and binds a new one (`VMADDR_CID_ANY` follows a CID
//! change), with exponential backoff so that a transport that stays down
//! costs a wake-up per second at most, never a busy loop.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use super::{sys, Agent};
use crate::console::{info, warning};

/// Something connections come from.
pub trait Acceptor {
    /// A connected stream.
    type Stream: Read + Write + AsRawFd + Send + 'static;
    /// Waits for the next connection.
    fn accept(&self) -> io::Result<Self::Stream>;
}

impl Acceptor for UnixListener {
    type Stream = UnixStream;
    fn accept(&self) -> io::Result<UnixStream> {
        UnixListener::accept(self).map(|(s, _)| s)
    }
}

/// A listening `AF_VSOCK` stream socket.
pub struct VsockListener {
    fd: OwnedFd,
}

impl VsockListener {
    /// Binds `VMADDR_CID_ANY:port` and listens.
    pub fn bind(port: u32) -> io::Result<Self> {
        // SAFETY: plain socket(2) call.
        let fd = sys::cvt(unsafe {
            libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
        })?;
        // SAFETY: fd was just returned by socket(2) and is owned here.
        let fd = unsafe { sys::owned(fd) };
        // SAFETY: sockaddr_vm is plain data; zero is a valid start.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        addr.svm_port = port;
        // SAFETY: addr is a valid sockaddr_vm of the size passed.
        sys::cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        // SAFETY: listen(2) on a bound socket.
        sys::cvt(unsafe { libc::listen(fd.as_raw_fd(), 128) })?;
        Ok(Self { fd })
    }
}

impl Acceptor for VsockListener {
    type Stream = VsockStream;
    fn accept(&self) -> io::Result<VsockStream> {
        // SAFETY: accept4 with null address pointers is allowed.
        let fd = sys::cvt(unsafe {
            libc::accept4(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        })?;
        // SAFETY: accept4 returned a fresh fd owned here.
        Ok(VsockStream {
            fd: unsafe { sys::owned(fd) },
        })
    }
}

/// A connected vsock stream (plain `read`/`write` on the socket fd).
pub struct VsockStream {
    fd: OwnedFd,
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for VsockStream {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Delays between attempts to (re)create the listener.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First delay (doubles per failure).
    pub initial: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(10),
            max: Duration::from_secs(1),
        }
    }
}

/// Pause after a resource shortage (`EMFILE`, `ENOMEM`, ...) before accepting again.
const RESOURCE_PAUSE: Duration = Duration::from_millis(100);
/// Per-connection accept errors tolerated back to back before pausing.
const MAX_QUICK_ERRORS: u32 = 16;

/// How the accept loop reacts to an accept error.
#[derive(Debug, PartialEq, Eq)]
enum AcceptError {
    /// One connection failed; keep going.
    PerConnection,
    /// Out of fds or memory; pause, then keep going with the same listener.
    Resource,
    /// The listener itself is broken (transport reset); make a new one.
    Broken,
}

fn classify(e: &io::Error) -> AcceptError {
    match e.raw_os_error() {
        Some(libc::EINTR | libc::ECONNABORTED | libc::EAGAIN | libc::EPROTO) => {
            AcceptError::PerConnection
        }
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => AcceptError::Resource,
        _ => AcceptError::Broken,
    }
}

/// Accepts connections forever (until `stop` returns true), handing each to
/// [`Agent::dispatch`]. `bind` makes a listener; it is called again whenever
/// the current one breaks. `on_listening` runs each time a listener is ready.
pub fn serve<A: Acceptor>(
    agent: &Arc<Agent>,
    mut bind: impl FnMut() -> io::Result<A>,
    mut on_listening: impl FnMut(),
    backoff: Backoff,
    stop: &dyn Fn() -> bool,
) {
    let mut delay = backoff.initial;
    let mut failures: u64 = 0;
    // Log the first few failures in a row, then one in 64: a transport that
    // stays down must not flood the console.
    let should_log = |n: u64| n <= 3 || n % 64 == 0;
    while !stop() {
        let listener = match bind() {
            Ok(l) => l,
            Err(e) => {
                failures += 1;
                if should_log(failures) {
                    warning!(
                        "agent: cannot listen (attempt {failures}): {e}; retrying in {delay:?}"
                    );
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(backoff.max);
                continue;
            }
        };
        on_listening();
        let mut quick_errors = 0;
        while !stop() {
            match listener.accept() {
                Ok(stream) => {
                    quick_errors = 0;
                    failures = 0;
                    delay = backoff.initial;
                    agent.dispatch(stream);
                }
                Err(e) => match classify(&e) {
                    AcceptError::PerConnection if quick_errors < MAX_QUICK_ERRORS => {
                        quick_errors += 1;
                    }
                    AcceptError::PerConnection | AcceptError::Resource => {
                        quick_errors = 0;
                        failures += 1;
                        if should_log(failures) {
                            warning!("agent: accept: {e}; pausing {RESOURCE_PAUSE:?}");
                        }
                        std::thread::sleep(RESOURCE_PAUSE);
                    }
                    AcceptError::Broken => {
                        failures += 1;
                        if should_log(failures) {
                            info!("agent: listener broke ({e}); listening again in {delay:?}");
                        }
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(backoff.max);
                        break;
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{AgentConfig, Reaping};
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    /// A listener that replays scripted accept results.
    struct Scripted {
        script: Arc<std::sync::Mutex<VecDeque<io::Result<UnixStream>>>>,
    }

    impl Acceptor for Scripted {
        type Stream = UnixStream;
        fn accept(&self) -> io::Result<UnixStream> {
            self.script
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or_else(|| Err(io::Error::from_raw_os_error(libc::EBADF)))
        }
    }

    #[test]
    fn reset_rebinds_with_backoff_and_keeps_serving() {
        let agent = Agent::new(AgentConfig::default(), Reaping::PerChild);
        let script = Arc::new(std::sync::Mutex::new(VecDeque::new()));
        {
            let mut s = script.lock().unwrap();
            let (a, _b) = UnixStream::pair().unwrap();
            s.push_back(Ok(a));
            s.push_back(Err(io::Error::from_raw_os_error(libc::ECONNABORTED)));
            s.push_back(Err(io::Error::from_raw_os_error(libc::ECONNRESET)));
        }
        let binds = AtomicUsize::new(0);
        let listens = RefCell::new(0);
        let start = Instant::now();
        let backoff = Backoff {
            initial: Duration::from_millis(5),
            max: Duration::from_millis(20),
        };
        serve(
            &agent,
            || {
                let n = binds.fetch_add(1, Ordering::SeqCst);
                if n == 1 {
                    // The transport is still down on the first retry.
                    return Err(io::Error::from_raw_os_error(libc::ENODEV));
                }
                if n == 2 {
                    let (a, _b) = UnixStream::pair().unwrap();
                    script.lock().unwrap().push_back(Ok(a));
                }
                Ok(Scripted {
                    script: script.clone(),
                })
            },
            || *listens.borrow_mut() += 1,
            backoff,
            &|| binds.load(Ordering::SeqCst) >= 4,
        );
        // bind #0 ok -> reset; bind #1 fails; bind #2 ok -> EBADF; bind #3 -> stop.
        assert_eq!(binds.load(Ordering::SeqCst), 4);
        assert_eq!(*listens.borrow(), 3);
        // Waits of 5 (reset), 10 (bind failed, doubled) and 5 ms (reset again,
        // after a successful accept restarted the backoff): never spinning.
        assert!(
            start.elapsed() >= Duration::from_millis(20),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn error_classes() {
        let c = |n| classify(&io::Error::from_raw_os_error(n));
        assert_eq!(c(libc::ECONNRESET), AcceptError::Broken);
        assert_eq!(c(libc::EINVAL), AcceptError::Broken);
        assert_eq!(c(libc::EMFILE), AcceptError::Resource);
        assert_eq!(c(libc::ECONNABORTED), AcceptError::PerConnection);
    }
}
