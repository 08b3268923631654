//! Plain configuration types, validated before anything is created.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::VsockError;

/// The CID a guest gets unless configured otherwise (the first CID that is
/// not reserved).
pub const DEFAULT_GUEST_CID: u64 = 3;

/// `sun_path` holds 108 bytes including the terminating NUL.
const SUN_PATH_MAX: usize = 107;

/// Longest suffix appended to the hybrid socket path: `_` plus a `u32`.
const PORT_SUFFIX_MAX: usize = 11;

/// Resource limits. Every buffer and table the guest or a host client can grow
/// is bounded by one of these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most simultaneous connections, counting host clients still sending
    /// their `CONNECT` line. Beyond it new connections are refused (RST to
    /// the guest, close to a host client).
    pub max_connections: usize,
    /// Receive buffer advertised to the guest per connection (`buf_alloc`),
    /// i.e. the most guest->host bytes buffered for one connection when the
    /// host side reads slowly. Also bounds host->guest staging.
    pub buffer_size: u32,
    /// How long a host client may take to send `CONNECT <port>\n`.
    pub handshake_timeout: Duration,
    /// How long the guest may take to accept a host-initiated connection.
    pub connect_timeout: Duration,
    /// How long a closing connection may take to flush buffered data to the
    /// host before it is reset anyway.
    pub close_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            buffer_size: 256 * 1024,
            handshake_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// Smallest accepted [`Limits::buffer_size`]: one page, as below that
    /// the guest would stall on every packet.
    pub const MIN_BUFFER_SIZE: u32 = 4096;
    /// Largest accepted [`Limits::buffer_size`].
    pub const MAX_BUFFER_SIZE: u32 = 64 * 1024 * 1024;
}

/// Everything needed to run one vsock device for one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (>= 3; 0-2 are reserved, `u32::MAX` is
    /// `VMADDR_CID_ANY`).
    pub guest_cid: u64,
    /// Unix socket the vhost-user frontend (QEMU) connects to.
    pub vhost_socket: PathBuf,
    /// Hybrid vsock socket for host clients; guest->host connections to port
    /// `N` go to `<uds_path>_<N>`.
    pub uds_path: PathBuf,
    /// Resource limits.
    pub limits: Limits,
    /// Run the device's threads under capsa's seccomp filter (see
    /// [`crate::seccomp`]). Off by default for embedders; capsa turns it on.
    pub seccomp: bool,
}

impl VsockConfig {
    /// A configuration with the default CID and limits.
    pub fn new(vhost_socket: impl Into<PathBuf>, uds_path: impl Into<PathBuf>) -> Self {
        VsockConfig {
            guest_cid: DEFAULT_GUEST_CID,
            vhost_socket: vhost_socket.into(),
            uds_path: uds_path.into(),
            seccomp: false,
            limits: Limits::default(),
        }
    }

    /// Checks the configuration without touching the filesystem.
    pub fn validate(&self) -> Result<(), VsockError> {
        let invalid = |reason: String| Err(VsockError::InvalidConfig { reason });
        if self.guest_cid < 3 || self.guest_cid >= u64::from(u32::MAX) {
            return invalid(format!(
                "guest_cid {} is reserved; use a value between 3 and {}",
                self.guest_cid,
                u32::MAX - 1
            ));
        }
        let l = &self.limits;
        if l.max_connections == 0 {
            return invalid("limits.max_connections is 0; allow at least 1".into());
        }
        if !(Limits::MIN_BUFFER_SIZE..=Limits::MAX_BUFFER_SIZE).contains(&l.buffer_size) {
            return invalid(format!(
                "limits.buffer_size {} is out of range; use {}..={} bytes",
                l.buffer_size,
                Limits::MIN_BUFFER_SIZE,
                Limits::MAX_BUFFER_SIZE
            ));
        }
        for (name, d) in [
            ("handshake_timeout", l.handshake_timeout),
            ("connect_timeout", l.connect_timeout),
            ("close_timeout", l.close_timeout),
        ] {
            if d.is_zero() {
                return invalid(format!("limits.{name} is zero; use a positive duration"));
            }
        }
        check_path_len(&self.vhost_socket, 0)?;
        check_path_len(&self.uds_path, PORT_SUFFIX_MAX)?;
        if self.vhost_socket == self.uds_path {
            return invalid("vhost_socket and uds_path are the same file; use two paths".into());
        }
        Ok(())
    }
}

fn check_path_len(path: &Path, suffix: usize) -> Result<(), VsockError> {
    let len = path.as_os_str().len();
    if len == 0 || len + suffix > SUN_PATH_MAX {
        return Err(VsockError::PathTooLong {
            path: path.to_path_buf(),
            max: SUN_PATH_MAX - suffix,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        let ok = VsockConfig::new("/tmp/a.sock", "/tmp/v.sock");
        ok.validate().expect("default config is valid");

        let mut c = ok.clone();
        c.guest_cid = 2;
        assert!(matches!(
            c.validate(),
            Err(VsockError::InvalidConfig { .. })
        ));
        let mut c = ok.clone();
        c.limits.buffer_size = 10;
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.uds_path = PathBuf::from(format!("/tmp/{}", "x".repeat(100)));
        assert!(matches!(c.validate(), Err(VsockError::PathTooLong { .. })));
        let mut c = ok;
        c.uds_path = c.vhost_socket.clone();
        assert!(c.validate().is_err());
    }
}
