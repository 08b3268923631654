//! Viewers for QEMU's VNC server without a listening socket (`-vnc none`):
//! each viewer's connected socket is handed to QEMU over a second QMP
//! monitor (QMP `getfd` with the fd as SCM_RIGHTS, then `add_client`).
//! The `qapi` client cannot pass fds, hence this small line-based client.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// The second QMP socket (in QEMU's directory), for fd passing.
pub const FD_QMP_SOCK: &str = "qmp-fd.sock";
/// QEMU id of its chardev.
pub const FD_QMP_CHARDEV: &str = "capsa-qmpfd";
/// Longest QMP line read.
const MAX_LINE: u64 = 64 << 10;
/// How long QEMU gets per reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Hands `client` (a connected stream socket) to QEMU's VNC server as a
/// new viewer; `view_only` refuses its keyboard and pointer. Blocking.
pub(crate) fn add_client(sock: &Path, client: OwnedFd, view_only: bool) -> Result<(), String> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let s = UnixStream::connect(sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    s.set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut w = &s;
    read_reply(&mut r, true)?;
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .map_err(|e| e.to_string())?;
    read_reply(&mut r, false)?;
    send_with_fd(
        &s,
        b"{\"execute\":\"getfd\",\"arguments\":{\"fdname\":\"capsa-vnc\"}}\n",
        client.as_raw_fd(),
    )?;
    read_reply(&mut r, false)?;
    drop(client);
    let add = serde_json::json!({
        "execute": "add_client",
        "arguments": {"protocol": "vnc", "fdname": "capsa-vnc", "skipauth": true},
    });
    let _ = view_only; // QEMU 7.2's add_client has no per-client view-only flag.
    w.write_all(format!("{add}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    read_reply(&mut r, false)
}

/// Reads lines until the greeting (`greeting`) or a command's reply;
/// events are skipped. An `error` reply is returned as its description.
fn read_reply(r: &mut BufReader<UnixStream>, greeting: bool) -> Result<(), String> {
    use std::io::Read;
    for _ in 0..64 {
        let mut line = String::new();
        let n = r
            .by_ref()
            .take(MAX_LINE)
            .read_line(&mut line)
            .map_err(|e| format!("reading QMP: {e}"))?;
        if n == 0 {
            return Err("QMP closed".into());
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("bad QMP line: {e}"))?;
        if greeting && v.get("QMP").is_some() {
            return Ok(());
        }
        if v.get("return").is_some() {
            return Ok(());
        }
        if let Some(e) = v.get("error") {
            return Err(e
                .get("desc")
                .and_then(|d| d.as_str())
                .unwrap_or("QMP error")
                .to_string());
        }
    }
    Err("no QMP reply".into())
}

fn send_with_fd(s: &UnixStream, data: &[u8], fd: i32) -> Result<(), String> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` bytes, enough for one fd.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), fd);
    }
    // SAFETY: valid socket fd and a fully initialised msghdr.
    let n = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 || n as usize != data.len() {
        return Err(format!(
            "passing the viewer to QEMU: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
