//! [`VsockDevice`]: owns the sockets and the serving thread.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tracing::{debug, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{Error as DaemonError, ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{lock, VsockBackend, HOST_EVENT};
use crate::config::VsockConfig;
use crate::error::VsockError;
use crate::muxer::{Muxer, SharedStats};

/// A point-in-time view of the device's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockStats {
    /// Connections currently open.
    pub connections: u64,
    /// Connections refused because [`crate::Limits::max_connections`] was
    /// reached.
    pub refused: u64,
    /// Guest buffers or packets dropped as malformed.
    pub malformed_packets: u64,
    /// Resets sent to the guest (refusals, unknown connections, faults,
    /// completed closes).
    pub resets_sent: u64,
    /// Liveness probes sent after transport restarts.
    pub probes: u64,
}

struct Inner {
    shutdown: AtomicBool,
    shutdown_evt: EventFd,
    frontend: Mutex<Option<ShutdownHandle>>,
    muxer: Arc<Mutex<Muxer>>,
    stats: Arc<SharedStats>,
    config: VsockConfig,
    /// (device, inode) of the two socket files this device bound, so its
    /// clean-up never removes a socket a successor bound at the same path
    /// after this one's files were unlinked (a monitor restarting a VM).
    bound: [Option<(u64, u64)>; 2],
}

/// A running vsock device backend.
///
/// QEMU connects to [`VsockConfig::vhost_socket`]; host programs use the
/// hybrid socket at [`VsockConfig::uds_path`]. The device serves successive
/// frontend connections (e.g. QEMU restarting for a restore) until
/// [`VsockDevice::shutdown`] or drop.
pub struct VsockDevice {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<Result<(), VsockError>>>,
}

impl VsockDevice {
    /// Validates `config`, binds both sockets and starts serving.
    ///
    /// When this returns, QEMU may connect and host clients may dial the
    /// hybrid socket (they are served once QEMU has connected). Stale socket
    /// files left by a dead process are replaced.
    pub fn spawn(config: VsockConfig) -> Result<VsockDevice, VsockError> {
        config.validate()?;
        let host_listener = bind_fresh(&config.uds_path)?;
        let vhost_listener = match bind_fresh(&config.vhost_socket) {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_file(&config.uds_path);
                return Err(e);
            }
        };
        let cleanup = |e| {
            let _ = std::fs::remove_file(&config.uds_path);
            let _ = std::fs::remove_file(&config.vhost_socket);
            e
        };
        let stats = Arc::new(SharedStats::default());
        let muxer = Muxer::new(&config, host_listener, stats.clone()).map_err(cleanup)?;
        let shutdown_evt = EventFd::new(EFD_NONBLOCK).map_err(|source| {
            cleanup(VsockError::Os {
                what: "eventfd",
                source,
            })
        })?;
        let inner = Arc::new(Inner {
            shutdown: AtomicBool::new(false),
            shutdown_evt,
            frontend: Mutex::new(None),
            muxer: Arc::new(Mutex::new(muxer)),
            stats,
            bound: [file_id(&config.uds_path), file_id(&config.vhost_socket)],
            config: config.clone(),
        });
        let thread_inner = inner.clone();
        let (filtered_tx, filtered) = std::sync::mpsc::sync_channel(1);
        let seccomp = config.seccomp;
        let thread = std::thread::Builder::new()
            .name("capsa-vsock".into())
            .spawn(move || {
                // Before anything from the guest or QEMU is read; threads
                // spawned from here on inherit the filter.
                if seccomp {
                    if let Err(e) = crate::seccomp::install() {
                        let _ = filtered_tx.send(Err(e));
                        return Ok(());
                    }
                }
                let _ = filtered_tx.send(Ok(()));
                serve(thread_inner, Listener::from(vhost_listener))
            })
            .map_err(|e| cleanup(VsockError::Thread(e)))?;
        match filtered.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(cleanup(e));
            }
            Err(_) => {
                let _ = thread.join();
                return Err(cleanup(VsockError::Panicked));
            }
        }
        info!(
            "vsock: guest CID {} on {:?}, host socket {:?}",
            config.guest_cid, config.vhost_socket, config.uds_path
        );
        Ok(VsockDevice {
            inner,
            thread: Some(thread),
        })
    }

    /// The configuration the device runs with.
    pub fn config(&self) -> &VsockConfig {
        &self.inner.config
    }

    /// Asks the device to stop: disconnects the frontend, closes every
    /// connection and removes the socket files. Returns at once; use
    /// [`VsockDevice::join`] to wait.
    pub fn shutdown(&self) {
        self.inner.shutdown.store(true, Ordering::SeqCst);
        let _ = self.inner.shutdown_evt.write(1);
        let frontend = self
            .inner
            .frontend
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match frontend {
            Some(h) => h.shutdown(),
            // The thread may be in a blocking accept whose client vanished
            // after poll; a throwaway connection gets it out.
            None => drop(UnixStream::connect(&self.inner.config.vhost_socket)),
        }
    }

    /// Waits for the serving thread to finish; call after
    /// [`VsockDevice::shutdown`] (or the frontend hanging up for good).
    pub fn join(mut self) -> Result<(), VsockError> {
        self.join_inner()
    }

    fn join_inner(&mut self) -> Result<(), VsockError> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| VsockError::Panicked)?,
            None => Ok(()),
        }
    }

    /// Drops every connection, closing all host streams, without telling the
    /// guest. Call after restoring a snapshot: the restored guest's transport
    /// reset does not reach the device, and connections from before the
    /// restore are dead on the guest side.
    pub fn reset_connections(&self) {
        lock(&self.inner.muxer).reset_all("reset requested by the embedder");
    }

    /// Current counters.
    pub fn stats(&self) -> VsockStats {
        let s = &self.inner.stats;
        VsockStats {
            connections: s.connections.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
            malformed_packets: s.malformed.load(Ordering::Relaxed),
            resets_sent: s.resets_sent.load(Ordering::Relaxed),
            probes: s.probes.load(Ordering::Relaxed),
        }
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
            if let Err(e) = self.join_inner() {
                warn!("vsock: {e}");
            }
        }
    }
}

/// Binds `path`, replacing a stale socket file but never a live socket or a
/// non-socket file.
fn bind_fresh(path: &Path) -> Result<UnixListener, VsockError> {
    match std::fs::symlink_metadata(path) {
        Ok(md) if !md.file_type().is_socket() => {
            return Err(VsockError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                return Err(VsockError::SocketInUse {
                    path: path.to_path_buf(),
                });
            }
            debug!("vsock: removing stale socket {path:?}");
            let _ = std::fs::remove_file(path);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(VsockError::Bind {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    UnixListener::bind(path).map_err(|source| VsockError::Bind {
        path: path.to_path_buf(),
        source,
    })
}

/// Blocks until `listener` has a pending connection (true) or shutdown was
/// requested (false).
fn wait_for_frontend(inner: &Inner, listener: &Listener) -> bool {
    loop {
        if inner.shutdown.load(Ordering::SeqCst) {
            return false;
        }
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: inner.shutdown_evt.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structs.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            warn!("vsock: poll on the vhost-user socket failed: {e}");
            return false;
        }
        if fds[1].revents != 0 || inner.shutdown.load(Ordering::SeqCst) {
            return false;
        }
        if fds[0].revents != 0 {
            return true;
        }
    }
}

fn serve(inner: Arc<Inner>, mut listener: Listener) -> Result<(), VsockError> {
    let result = serve_frontends(&inner, &mut listener);
    lock(&inner.muxer).reset_all("device shut down");
    drop(listener);
    remove_if_ours(&inner.config.uds_path, inner.bound[0]);
    remove_if_ours(&inner.config.vhost_socket, inner.bound[1]);
    result
}

/// The (device, inode) of the file at `path`, if there is one.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Removes `path` only if it is still the socket file this device bound.
fn remove_if_ours(path: &Path, ours: Option<(u64, u64)>) {
    if ours.is_some() && file_id(path) == ours {
        let _ = std::fs::remove_file(path);
    }
}

fn serve_frontends(inner: &Arc<Inner>, listener: &mut Listener) -> Result<(), VsockError> {
    let epoll_fd = lock(&inner.muxer).epoll_fd();
    while wait_for_frontend(inner, listener) {
        // A fresh daemon (and vrings) per frontend connection: nothing from
        // a previous frontend's rings may leak into the next.
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(VsockBackend::new(
            inner.muxer.clone(),
            inner.config.guest_cid,
            mem.clone(),
        ));
        let mut daemon = VhostUserDaemon::new("capsa-vsock-vhost".into(), backend, mem)
            .map_err(|e| VsockError::VhostUser(e.to_string()))?;
        for h in daemon.get_epoll_handlers() {
            h.register_listener(epoll_fd, EventSet::IN, u64::from(HOST_EVENT))
                .map_err(|source| VsockError::Os {
                    what: "worker epoll registration",
                    source,
                })?;
        }
        daemon
            .start(listener)
            .map_err(|e| VsockError::VhostUser(e.to_string()))?;
        *inner.frontend.lock().unwrap_or_else(|e| e.into_inner()) = daemon.shutdown_handle();
        if inner.shutdown.load(Ordering::SeqCst) {
            daemon.request_shutdown();
        }
        debug!("vsock: vhost-user frontend connected");
        match daemon.wait() {
            Ok(())
            | Err(DaemonError::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => debug!("vsock: vhost-user frontend disconnected"),
            Err(e) => {
                if !inner.shutdown.load(Ordering::SeqCst) {
                    info!("vsock: vhost-user session ended: {e}");
                }
            }
        }
        *inner.frontend.lock().unwrap_or_else(|e| e.into_inner()) = None;
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        // Joins the worker thread.
        drop(daemon);
        lock(&inner.muxer).reset_all("vhost-user frontend disconnected");
    }
    Ok(())
}

/// The hybrid socket path for guest->host connections to `port`.
pub fn host_port_path(config: &VsockConfig, port: u32) -> PathBuf {
    crate::muxer::port_path(&config.uds_path, port)
}
