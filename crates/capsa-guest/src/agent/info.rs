//! `Open(Info)`: facts about the agent and the guest. Best effort: a fact
//! that cannot be read is reported as empty or zero rather than failing the
//! whole call (the host uses it as a liveness probe too).

use capsa_proto::{AgentInfo, PROTOCOL_VERSION};

/// Most bytes read from a `/proc` file (they are a few KiB).
const MAX_PROC_FILE: u64 = 64 * 1024;

fn read_proc(path: &str) -> String {
    use std::io::Read;
    let mut s = String::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(MAX_PROC_FILE).read_to_string(&mut s);
    }
    s
}

fn c_field(field: &[libc::c_char]) -> String {
    let bytes: Vec<u8> = field
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `MemTotal`-style field of `/proc/meminfo`, in KiB.
pub(crate) fn meminfo_kib(meminfo: &str, key: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix(key)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// Gathers the reply to `Info`.
pub(super) fn info() -> AgentInfo {
    // SAFETY: utsname is plain data; uname fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uts is a valid utsname.
    let (kernel, hostname) = if unsafe { libc::uname(&mut uts) } == 0 {
        (c_field(&uts.release), c_field(&uts.nodename))
    } else {
        (String::new(), String::new())
    };
    let uptime_secs = read_proc("/proc/uptime")
        .split_whitespace()
        .next()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|v| v.is_finite())
        .unwrap_or(0.0);
    let meminfo = read_proc("/proc/meminfo");
    // SAFETY: sysconf has no memory-safety preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    AgentInfo {
        agent_version: crate::VERSION.to_string(),
        protocol: PROTOCOL_VERSION,
        kernel,
        hostname,
        uptime_secs,
        mem_total_kib: meminfo_kib(&meminfo, "MemTotal"),
        mem_available_kib: meminfo_kib(&meminfo, "MemAvailable"),
        cpus: u32::try_from(cpus).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_parsing() {
        let m = "MemTotal:       16318412 kB\nMemFree: 1 kB\nMemAvailable:   12000000 kB\n";
        assert_eq!(meminfo_kib(m, "MemTotal"), 16318412);
        assert_eq!(meminfo_kib(m, "MemAvailable"), 12000000);
        assert_eq!(meminfo_kib(m, "Missing"), 0);
        assert_eq!(meminfo_kib("MemTotal: x kB", "MemTotal"), 0);
    }

    #[test]
    fn info_on_this_host() {
        let i = info();
        assert!(!i.kernel.is_empty());
        assert!(i.cpus >= 1);
        assert!(i.mem_total_kib > 0);
        assert!(i.uptime_secs > 0.0);
    }
}
