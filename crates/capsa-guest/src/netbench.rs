//! `/init net-bench ...`: TCP measurements from inside a guest, the same
//! program whatever network backend carries them (capsa's stack or QEMU's
//! slirp), so benchmarks compare backends and not guest tools (busybox `nc`
//! writes in small pieces).
//!
//! - `net-bench connect ADDR:PORT N`: N sequential connects; prints
//!   `connect ok=K fail=F p50_us=.. p99_us=..`.
//! - `net-bench send ADDR:PORT MIB FLOWS`: MIB MiB of zeros spread over FLOWS
//!   parallel connections; prints `send bytes=.. ms=..`.
//! - `net-bench recv ADDR:PORT MIB FLOWS`: asks each flow's server for its
//!   share (`<bytes>\n`), reads to EOF; prints `recv bytes=.. ms=..`.
//!
//! Bounded: at most 100,000 connects, 64 flows, 64 GiB.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(10);

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_string())
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> io::Result<T> {
    args.get(i).and_then(|a| a.parse().ok()).ok_or_else(|| {
        bad(&format!(
            "bad or missing {what}; usage: net-bench connect|send|recv ADDR:PORT ..."
        ))
    })
}

/// Runs the tool; returns the exit code.
pub fn run(args: &[String]) -> io::Result<i32> {
    let mode = args.first().map(String::as_str).unwrap_or("");
    let addr: SocketAddr = arg(args, 1, "ADDR:PORT")?;
    match mode {
        "connect" => {
            let n: usize = arg(args, 2, "N")?;
            if n == 0 || n > 100_000 {
                return Err(bad("N must be 1..=100000"));
            }
            let mut lat = Vec::with_capacity(n);
            let mut fail = 0usize;
            for _ in 0..n {
                let t = Instant::now();
                match TcpStream::connect_timeout(&addr, TIMEOUT) {
                    Ok(s) => {
                        lat.push(t.elapsed().as_micros() as u64);
                        drop(s);
                    }
                    Err(_) => fail += 1,
                }
            }
            lat.sort_unstable();
            let pct = |p: usize| {
                lat.get((lat.len() * p / 100).min(lat.len().saturating_sub(1)))
                    .copied()
                    .unwrap_or(0)
            };
            println!(
                "connect ok={} fail={fail} p50_us={} p99_us={}",
                lat.len(),
                pct(50),
                pct(99)
            );
            Ok(if fail == 0 { 0 } else { 1 })
        }
        "send" | "recv" => {
            let mib: u64 = arg(args, 2, "MIB")?;
            let flows: u64 = arg(args, 3, "FLOWS")?;
            if !(1..=64).contains(&flows) || mib == 0 || mib > 64 * 1024 {
                return Err(bad("FLOWS must be 1..=64 and MIB 1..=65536"));
            }
            let per = (mib << 20) / flows;
            let t = Instant::now();
            let workers: Vec<_> = (0..flows)
                .map(|_| {
                    let send = mode == "send";
                    std::thread::spawn(move || -> io::Result<u64> {
                        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
                        if send {
                            let buf = vec![0u8; 64 * 1024];
                            let mut left = per;
                            while left > 0 {
                                let n = left.min(buf.len() as u64) as usize;
                                s.write_all(&buf[..n])?;
                                left -= n as u64;
                            }
                            s.shutdown(std::net::Shutdown::Write)?;
                            // Wait for the server's close: everything arrived.
                            let _ = s.read(&mut [0u8; 1]);
                            Ok(per)
                        } else {
                            s.write_all(format!("{per}\n").as_bytes())?;
                            let mut buf = vec![0u8; 64 * 1024];
                            let mut got = 0u64;
                            loop {
                                match s.read(&mut buf)? {
                                    0 => break,
                                    n => got += n as u64,
                                }
                            }
                            Ok(got)
                        }
                    })
                })
                .collect();
            let mut total = 0u64;
            for w in workers {
                total += w
                    .join()
                    .map_err(|_| io::Error::other("a flow panicked"))??;
            }
            println!("{mode} bytes={total} ms={}", t.elapsed().as_millis());
            Ok(0)
        }
        _ => Err(bad("usage: net-bench connect|send|recv ADDR:PORT ...")),
    }
}
