//! Small vsock tools for users' own guest services (a tiny socat for vsock),
//! run as `/init vsock-serve ...` or `/init vsock-connect ...` inside a guest.
//!
//! - `vsock-serve PORT -- CMD ARGS...`: accept connections on vsock `PORT`;
//!   each one runs `CMD` with its stdin and stdout on the connection.
//! - `vsock-connect CID PORT`: connect to `CID:PORT` (the host is CID 2) and
//!   copy stdin to the connection and the connection to stdout.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};

use crate::agent::{Acceptor, VsockListener};

/// Runs a tool; returns the process exit code.
pub fn run(tool: &str, args: &[String]) -> i32 {
    let r = match tool {
        "vsock-serve" => serve(args),
        "vsock-connect" => connect(args),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unknown tool {tool}"),
        )),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("capsa-init {tool}: {e}");
            2
        }
    }
}

fn usage(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_string())
}

fn serve(args: &[String]) -> io::Result<i32> {
    let port: u32 = args
        .first()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| usage("usage: vsock-serve PORT -- CMD [ARGS...]"))?;
    let cmd: Vec<String> = args
        .iter()
        .skip(1)
        .skip_while(|a| *a == "--")
        .cloned()
        .collect();
    if cmd.is_empty() {
        return Err(usage("usage: vsock-serve PORT -- CMD [ARGS...]"));
    }
    let listener = VsockListener::bind(port)?;
    loop {
        let conn = listener.accept()?;
        let (input, output) = (dup(&conn)?, dup(&conn)?);
        drop(conn);
        let child = Command::new(&cmd[0])
            .args(&cmd[1..])
            .stdin(Stdio::from(input))
            .stdout(Stdio::from(output))
            .spawn();
        match child {
            // Reaped by a thread so the accept loop never waits on a client.
            Ok(mut c) => {
                std::thread::spawn(move || c.wait());
            }
            Err(e) => eprintln!("capsa-init vsock-serve: cannot run {}: {e}", cmd[0]),
        }
    }
}

fn dup(fd: &impl AsRawFd) -> io::Result<OwnedFd> {
    // SAFETY: dup(2) of a valid fd; the result is owned by the returned OwnedFd.
    let d = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if d < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(d) })
}

fn connect(args: &[String]) -> io::Result<i32> {
    let (Some(cid), Some(port)) = (
        args.first().and_then(|c| c.parse::<u32>().ok()),
        args.get(1).and_then(|p| p.parse::<u32>().ok()),
    ) else {
        return Err(usage("usage: vsock-connect CID PORT"));
    };
    // SAFETY: plain socket(2) call; the fd is owned right after.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; zero is a valid start.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    // SAFETY: addr is a valid sockaddr_vm of the size passed.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut to_sock = std::fs::File::from(sock.try_clone()?);
    let mut from_sock = std::fs::File::from(sock);
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut io::stdin().lock(), &mut to_sock);
        // SAFETY: shutdown(2) on our own socket fd.
        unsafe { libc::shutdown(to_sock.as_raw_fd(), libc::SHUT_WR) };
    });
    let mut buf = [0u8; 64 * 1024];
    let mut stdout = io::stdout().lock();
    loop {
        match from_sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => stdout.write_all(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    stdout.flush()?;
    drop(up);
    Ok(0)
}
