//! The screen viewer: noVNC in a browser, on a sandbox's VNC stream.
//!
//! One place for what capsad (`/v1/sandboxes/{name}/screen/view`) and
//! `capsa screen view` (a loopback listener with a one-time token) share:
//! the view-only enforcement on the RFB stream ([`rfb`], used by the local
//! service's `screen_vnc`), and, with the `viewer` feature, the vendored
//! noVNC assets, the page, the token and cookie checks and the WebSocket
//! bridge ([`web`]).

pub mod rfb;
#[cfg(feature = "viewer")]
pub mod web;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::service::ConsoleSession;

/// Compares secrets without an early exit, so timing does not reveal a
/// matching prefix (capsad's bearer token, the viewer's token and cookie).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// A fresh secret: 32 bytes from the kernel's random source, as 64 hex
/// digits (capsad's API token, the viewer's one-time token and cookie).
pub fn random_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Wraps a VNC session so only a view-only viewer's allowed messages reach
/// QEMU (see [`rfb::ViewOnlyFilter`]); a refused stream ends the session.
pub fn view_only(session: ConsoleSession) -> ConsoleSession {
    let ConsoleSession { output, input } = session;
    let (tx, mut rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let mut filter = rfb::ViewOnlyFilter::new();
        let mut out = Vec::new();
        while let Some(b) = rx.recv().await {
            out.clear();
            if let Err(e) = filter.feed(&b, &mut out) {
                tracing::warn!("a view-only VNC session was ended: {e}");
                break;
            }
            if !out.is_empty() && input.send(Bytes::copy_from_slice(&out)).await.is_err() {
                break;
            }
        }
        // Dropping `input` closes the VNC socket, which ends `output`.
    });
    ConsoleSession { output, input: tx }
}
