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
        "input-events" => input_events(args),
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

/// Most events `input-events` prints before it stops.
const MAX_INPUT_EVENTS: usize = 100_000;
/// Most input devices `input-events` watches.
const MAX_INPUT_DEVICES: usize = 32;

/// `input-events COUNT TIMEOUT_MS`: prints the events of every
/// `/dev/input/event*` device as `EV <type> <code> <value>` lines (sync
/// events left out), after a `ready` line once the devices are open; stops
/// after COUNT events or TIMEOUT_MS milliseconds. Tests use it to see what
/// the host's tablet and keyboard deliver.
fn input_events(args: &[String]) -> io::Result<i32> {
    let count: usize = args
        .first()
        .and_then(|a| a.parse().ok())
        .filter(|n| *n <= MAX_INPUT_EVENTS)
        .ok_or_else(|| usage("usage: input-events COUNT TIMEOUT_MS (COUNT <= 100000)"))?;
    let timeout_ms: u64 = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| usage("usage: input-events COUNT TIMEOUT_MS"))?;
    let mut devices = Vec::new();
    for entry in std::fs::read_dir("/dev/input")?.flatten().take(1024) {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with("event") || devices.len() >= MAX_INPUT_DEVICES {
            continue;
        }
        devices.push(std::fs::File::open(entry.path())?);
    }
    let mut out = io::stdout().lock();
    writeln!(out, "ready {}", devices.len())?;
    out.flush()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(timeout_ms);
    let mut printed = 0usize;
    // struct input_event on 64-bit: timeval (16), type u16, code u16, value i32.
    const EV_SIZE: usize = 24;
    let mut buf = [0u8; EV_SIZE * 64];
    while printed < count {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let mut fds: Vec<libc::pollfd> = devices
            .iter()
            .map(|f| libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: fds is a valid array of fds.len() pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for (i, p) in fds.iter().enumerate() {
            if p.revents & libc::POLLIN == 0 {
                continue;
            }
            // evdev reads return whole events.
            let got = (&devices[i]).read(&mut buf)?;
            for ev in buf[..got - got % EV_SIZE].chunks_exact(EV_SIZE) {
                let ty = u16::from_ne_bytes([ev[16], ev[17]]);
                let code = u16::from_ne_bytes([ev[18], ev[19]]);
                let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
                if ty == 0 {
                    continue;
                }
                writeln!(out, "EV {ty} {code} {value}")?;
                printed += 1;
            }
        }
        out.flush()?;
    }
    Ok(0)
}
