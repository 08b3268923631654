//! Host ends of guest vsock ports, in the hybrid-vsock convention served by
//! capsa's vsock device: host->guest by `CONNECT <port>` on the VM's socket,
//! guest->host by listening on `<socket>_<port>`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::{Error, Result};

/// Longest `OK <port>\n` reply accepted from the device.
const MAX_REPLY: usize = 32;

/// Opens a stream to guest port `port` through the VM's vsock socket `uds`.
pub(crate) async fn connect(uds: &Path, port: u32, deadline: Duration) -> Result<UnixStream> {
    let fail = |reason: String| Error::Vsock { port, reason };
    let attempt = async {
        let mut s = UnixStream::connect(uds).await.map_err(|e| {
            fail(format!(
                "cannot reach the vsock device at {}: {e}",
                uds.display()
            ))
        })?;
        s.write_all(format!("CONNECT {port}\n").as_bytes())
            .await
            .map_err(|e| fail(format!("handshake write: {e}")))?;
        // Byte by byte: anything after the newline already belongs to the guest's stream.
        let mut line = Vec::with_capacity(MAX_REPLY);
        loop {
            let mut b = [0u8; 1];
            match s.read(&mut b).await {
                Ok(0) => {
                    return Err(fail(
                        "the guest refused the connection (nothing listens on that port?)".into(),
                    ))
                }
                Ok(_) if b[0] == b'\n' => break,
                Ok(_) if line.len() < MAX_REPLY => line.push(b[0]),
                Ok(_) => return Err(fail("over-long handshake reply".into())),
                Err(e) => return Err(fail(format!("handshake read: {e}"))),
            }
        }
        if !line.starts_with(b"OK ") {
            return Err(fail(format!(
                "unexpected handshake reply {:?}",
                String::from_utf8_lossy(&line)
            )));
        }
        Ok(s)
    };
    tokio::time::timeout(deadline, attempt)
        .await
        .map_err(|_| fail(format!("no answer within {deadline:?}")))?
}

/// The path the device connects to for guest->host connections to `port`.
pub(crate) fn listen_path(uds: &Path, port: u32) -> PathBuf {
    let mut p = uds.as_os_str().to_os_string();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

/// Listens for guest connections to host port `port`.
pub(crate) fn listen(uds: &Path, port: u32) -> Result<UnixListener> {
    let path = listen_path(uds, port);
    let _ = std::fs::remove_file(&path);
    UnixListener::bind(&path).map_err(|e| Error::Vsock {
        port,
        reason: format!("cannot listen at {}: {e}", path.display()),
    })
}
