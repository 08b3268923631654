//! A per-VM cgroup capping QEMU's memory and CPU.
//!
//! The cgroup is made beneath the calling process's own cgroup, so capsa never
//! lifts QEMU out of limits placed on capsa itself (a systemd unit, a
//! container). cgroup v2 is used when `/sys/fs/cgroup` is the unified
//! hierarchy; on a v1 (or hybrid) host the `memory` and `cpu` v1 controllers
//! are used instead, with the same limits. When neither can be written (not
//! root and not delegated, no controllers), QEMU runs without one and this is
//! logged once and reported by [`status`].

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// TCG translation cache QEMU gets when its memory is capped (MiB). QEMU's
/// default is up to 1 GiB, touched as the guest runs new code, which no
/// sensible cap could hold; when full, QEMU flushes it and starts over.
pub const TCG_TB_SIZE_MIB: u32 = 256;
/// Memory a QEMU process needs beyond guest RAM: the translation cache
/// ([`TCG_TB_SIZE_MIB`]) plus ~100 MiB of device emulation, QEMU's own heap
/// and page cache charged to it (an idle TCG sandbox measured 166 MiB RSS
/// beyond guest RAM in BENCHMARKS.md; see the cgroup peak in the
/// confinement section there).
pub const MEMORY_OVERHEAD_MIB: u64 = 384;
/// CPU period, microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;
/// CPU QEMU gets beyond one CPU per vCPU, per period (its main loop and I/O).
pub const CPU_OVERHEAD_US: u64 = 50_000;

const ROOT: &str = "/sys/fs/cgroup";

/// The limits for a VM with `cpus` vCPUs and `memory_mib` of RAM.
pub fn limits(cpus: u32, memory_mib: u64) -> (u64, u64) {
    let memory = (memory_mib + MEMORY_OVERHEAD_MIB) << 20;
    let quota = u64::from(cpus.max(1)) * CPU_PERIOD_US + CPU_OVERHEAD_US;
    (memory, quota)
}

/// The VM cgroup's CPU weight relative to a single process (v1 shares are
/// 1024 per process, v2 weights 100): as much as QEMU's busy threads (one
/// per vCPU plus its main loop) would have had outside a cgroup. A group
/// otherwise weighs as one process against every other process on a busy
/// host, which measured +20-35 % exec latency on a loaded 2-core host.
pub fn weight(cpus: u32, per_process: u64) -> u64 {
    per_process * (u64::from(cpus.max(1)) + 1)
}

/// One VM's cgroup (v2) or pair of cgroups (v1 memory and cpu).
#[derive(Debug)]
pub(crate) struct Cgroup {
    dirs: Vec<PathBuf>,
    /// `cgroup.procs` of each, opened before QEMU is forked: the child joins
    /// by writing `0` to them, so QEMU never runs outside its cgroup.
    procs: Vec<File>,
}

static SEQ: AtomicU64 = AtomicU64::new(0);
static UNAVAILABLE: OnceLock<String> = OnceLock::new();

impl Cgroup {
    /// Makes a cgroup with the limits for `cpus` and `memory_mib`, or says why not.
    pub fn create(cpus: u32, memory_mib: u64) -> Result<Cgroup, String> {
        let (memory, quota) = limits(cpus, memory_mib);
        let name = format!(
            "capsa-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let own = read("/proc/self/cgroup")?;
        let mut cg = Cgroup {
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        if Path::new(ROOT).join("cgroup.controllers").exists() {
            let parent = Path::new(ROOT).join(own_path(&own, None)?);
            let available = read(parent.join("cgroup.controllers"))?;
            for c in ["memory", "cpu"] {
                if !available.split_whitespace().any(|x| x == c) {
                    return Err(format!(
                        "the {c} controller is not delegated to {}",
                        parent.display()
                    ));
                }
            }
            let enabled = read(parent.join("cgroup.subtree_control"))?;
            if !(enabled.contains("memory") && enabled.contains("cpu")) {
                // Refused (EBUSY) when the parent itself holds processes and
                // is not the root: cgroup v2 keeps processes in leaves only.
                write(parent.join("cgroup.subtree_control"), "+memory +cpu")?;
            }
            sweep(&parent);
            let dir = parent.join(&name);
            cg.mkdir(&dir)?;
            write(dir.join("memory.max"), &memory.to_string())?;
            write(dir.join("memory.swap.max"), "0").ok();
            write(dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
            write(
                dir.join("cpu.weight"),
                &weight(cpus, 100).min(10_000).to_string(),
            )?;
            cg.open_procs(&dir)?;
        } else {
            for (c, file) in [
                ("memory", "memory.limit_in_bytes"),
                ("cpu", "cpu.cfs_quota_us"),
            ] {
                let parent = Path::new(ROOT).join(c).join(own_path(&own, Some(c))?);
                if !parent.join(file).exists() {
                    return Err(format!(
                        "no cgroup v2 at {ROOT} and no v1 {c} controller at {}",
                        parent.display()
                    ));
                }
                sweep(&parent);
                let dir = parent.join(&name);
                cg.mkdir(&dir)?;
                if c == "memory" {
                    write(dir.join("memory.limit_in_bytes"), &memory.to_string())?;
                } else {
                    write(dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write(dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                    write(dir.join("cpu.shares"), &weight(cpus, 1024).to_string())?;
                }
                cg.open_procs(&dir)?;
            }
        }
        tracing::debug!(dirs = ?cg.dirs, memory, quota, "VM cgroup made");
        Ok(cg)
    }

    fn mkdir(&mut self, dir: &Path) -> Result<(), String> {
        std::fs::create_dir(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        self.dirs.push(dir.to_path_buf());
        Ok(())
    }

    fn open_procs(&mut self, dir: &Path) -> Result<(), String> {
        let p = dir.join("cgroup.procs");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(|e| format!("opening {}: {e}", p.display()))?;
        self.procs.push(f);
        Ok(())
    }

    /// The fds the forked child writes `0` to.
    pub fn procs_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(|f| f.as_raw_fd()).collect()
    }

    /// Copies of the `cgroup.procs` handles, kept by the running VM so the
    /// helpers it starts later (a share's virtiofsd) join the same cgroup.
    pub fn join_handles(&self) -> std::io::Result<Vec<File>> {
        self.procs.iter().map(File::try_clone).collect()
    }
}

impl Drop for Cgroup {
    /// Removes the cgroup; called once QEMU has been reaped (an rmdir of a
    /// cgroup that still holds a process fails, and the sweep retries later).
    fn drop(&mut self) {
        for d in &self.dirs {
            if let Err(e) = std::fs::remove_dir(d) {
                tracing::debug!(dir = %d.display(), "cgroup not removed: {e}");
            }
        }
    }
}

/// Says once (per process) why VMs run without a cgroup.
pub(crate) fn note_unavailable(why: &str) {
    if UNAVAILABLE.set(why.to_string()).is_ok() {
        tracing::warn!(
            "VMs run without a cgroup (no memory/CPU cap on QEMU): {why}. Fix: run as root on a \
             host with the memory and cpu controllers, or delegate a cgroup to capsa; \
             CAPSA_CONFINE=seccomp,user silences this"
        );
    }
}

/// Whether this process could make VM cgroups, for `capsa doctor`: `Ok(kind)`
/// or `Err(why not)`. Makes and removes a probe cgroup.
pub fn status() -> Result<String, String> {
    let cg = Cgroup::create(1, 64)?;
    let kind = if cg.dirs.len() == 1 { "v2" } else { "v1" };
    Ok(format!("cgroup {kind} under {}", parent_of(&cg.dirs)))
}

fn parent_of(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .filter_map(|d| d.parent())
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" and ")
}

/// The cgroup path (relative) of this process for controller `c` (v1), or
/// in the unified hierarchy (`None`), from `/proc/self/cgroup`.
fn own_path(own: &str, c: Option<&str>) -> Result<PathBuf, String> {
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let hit = match c {
            None => id == "0" && ctrls.is_empty(),
            Some(c) => ctrls.split(',').any(|x| x == c),
        };
        if hit {
            return Ok(PathBuf::from(path.trim_start_matches('/')));
        }
    }
    Err(format!(
        "this process is in no {} cgroup",
        c.unwrap_or("unified")
    ))
}

/// Removes empty cgroups left by capsa processes that died before removing
/// theirs (named `capsa-PID-N`), so they do not pile up.
fn sweep(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten().take(4096) {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("capsa-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the pid exists.
        let alive = pid > 0 && unsafe { libc::kill(pid, 0) } == 0;
        if !alive {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

fn read(p: impl AsRef<Path>) -> Result<String, String> {
    std::fs::read_to_string(p.as_ref())
        .map_err(|e| format!("reading {}: {e}", p.as_ref().display()))
}

fn write(p: impl AsRef<Path>, v: &str) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p.as_ref())
        .and_then(|mut f| f.write_all(v.as_bytes()))
        .map_err(|e| format!("writing {v:?} to {}: {e}", p.as_ref().display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_spec() {
        assert_eq!(limits(1, 256), ((256 + MEMORY_OVERHEAD_MIB) << 20, 150_000));
        assert_eq!(limits(2, 1024).1, 250_000);
        assert_eq!(weight(1, 1024), 2048);
        assert_eq!(weight(0, 100), 200);
    }

    #[test]
    fn finds_own_path() {
        let v1 = "4:memory:/a/b\n1:cpu,cpuacct:/\n0::/u";
        assert_eq!(own_path(v1, Some("memory")).unwrap(), PathBuf::from("a/b"));
        assert_eq!(own_path(v1, Some("cpu")).unwrap(), PathBuf::from(""));
        assert_eq!(own_path(v1, None).unwrap(), PathBuf::from("u"));
        assert!(own_path("1:pids:/", Some("memory")).is_err());
    }
}
