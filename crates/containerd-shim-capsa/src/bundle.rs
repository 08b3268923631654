//! containerd's bundle: `config.json` (the OCI runtime spec), read as
//! hostile input through a capability directory, bounded, never panicking.
//! Only what a capsa VM can honour is taken: the process (args, env, cwd,
//! user, terminal, console size) and capsa's own annotations.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use cap_std::ambient_authority;
use cap_std::fs::Dir;
use serde::Deserialize;

use crate::error::{Result, ShimError};

/// Largest `config.json` read.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;
/// Most args or env entries in a process.
pub const MAX_ITEMS: usize = 4096;
/// Most bytes of args + env + cwd together.
pub const MAX_PROCESS_BYTES: usize = 1 << 20;
/// Annotation giving the VM's memory in MiB.
pub const ANNOTATION_MEMORY: &str = "io.capsa.memory_mib";
/// Annotation giving the VM's vCPUs.
pub const ANNOTATION_CPUS: &str = "io.capsa.cpus";
/// VM memory without a limit or an annotation (MiB).
pub const DEFAULT_MEMORY_MIB: u64 = 512;
/// Smallest VM (MiB): below it the guest kernel and agent do not fit.
pub const MIN_MEMORY_MIB: u64 = 128;
/// Largest VM (MiB).
pub const MAX_MEMORY_MIB: u64 = 65536;
/// Most vCPUs.
pub const MAX_CPUS: u32 = 64;
/// Memory for the guest's kernel, init and agent (MiB), added to a
/// container's memory limit so the container itself gets about its limit
/// (a 1 GiB limit shows 1000-1088 MiB of MemTotal in the guest: tested).
pub const GUEST_OVERHEAD_MIB: u64 = 64;

/// The parts of the OCI runtime spec the shim uses.
#[derive(Debug, Deserialize, Default)]
pub struct Spec {
    /// The container's process.
    #[serde(default)]
    pub process: Option<Process>,
    /// Annotations (capsa's VM sizing).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// The container's mounts (only reported: the guest makes its own
    /// `/proc`, `/sys` and `/dev`; host binds are not passed in, v1).
    #[serde(default)]
    pub mounts: Vec<OciMount>,
    /// Linux settings (only the resource limits, which size the VM).
    #[serde(default)]
    pub linux: Option<Linux>,
    /// The container's hostname (runc sets it in the container's UTS
    /// namespace; here it is the VM's).
    #[serde(default)]
    pub hostname: Option<String>,
}

/// `linux` of the OCI spec: only what sizes the VM.
#[derive(Debug, Deserialize, Default)]
pub struct Linux {
    /// cgroup resource limits (`ctr run --memory-limit/--cpus`, a
    /// Kubernetes container's `resources.limits`).
    #[serde(default)]
    pub resources: Option<Resources>,
}

/// `linux.resources`.
#[derive(Debug, Deserialize, Default)]
pub struct Resources {
    /// Memory limits.
    #[serde(default)]
    pub memory: Option<MemoryLimits>,
    /// CPU limits.
    #[serde(default)]
    pub cpu: Option<CpuLimits>,
}

/// `linux.resources.memory`.
#[derive(Debug, Deserialize, Default)]
pub struct MemoryLimits {
    /// Bytes; zero or negative means none.
    #[serde(default)]
    pub limit: Option<i64>,
}

/// `linux.resources.cpu`.
#[derive(Debug, Deserialize, Default)]
pub struct CpuLimits {
    /// CFS quota in microseconds per period; zero or negative means none.
    #[serde(default)]
    pub quota: Option<i64>,
    /// CFS period in microseconds.
    #[serde(default)]
    pub period: Option<u64>,
}

/// An OCI mount.
#[derive(Debug, Deserialize, Default, Clone)]
pub struct OciMount {
    /// Where it goes in the container.
    #[serde(default)]
    pub destination: String,
    /// Filesystem type.
    #[serde(default, rename = "type")]
    pub kind: String,
    /// Host source.
    #[serde(default)]
    pub source: String,
    /// Mount options.
    #[serde(default)]
    pub options: Vec<String>,
}

impl OciMount {
    /// Whether this brings a host path into the container (a bind mount).
    pub fn is_host_bind(&self) -> bool {
        self.kind == "bind" || self.options.iter().any(|o| o == "bind" || o == "rbind")
    }
}

/// An OCI process (`config.json`'s `process`, or an exec's spec).
#[derive(Debug, Deserialize, Default, Clone)]
pub struct Process {
    /// Whether it runs on a terminal.
    #[serde(default)]
    pub terminal: bool,
    /// Initial terminal size.
    #[serde(default, rename = "consoleSize")]
    pub console_size: Option<ConsoleSize>,
    /// Its user.
    #[serde(default)]
    pub user: User,
    /// argv.
    #[serde(default)]
    pub args: Vec<String>,
    /// `KEY=VALUE` entries.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory (absolute).
    #[serde(default)]
    pub cwd: String,
}

/// A terminal size.
#[derive(Debug, Deserialize, Default, Clone, Copy)]
pub struct ConsoleSize {
    /// Rows.
    #[serde(default)]
    pub height: u32,
    /// Columns.
    #[serde(default)]
    pub width: u32,
}

/// A numeric user.
#[derive(Debug, Deserialize, Default, Clone, Copy)]
pub struct User {
    /// uid.
    #[serde(default)]
    pub uid: u32,
    /// gid.
    #[serde(default)]
    pub gid: u32,
}

impl Spec {
    /// Reads `<bundle>/config.json` (no symlink out of the bundle, bounded).
    pub fn read(bundle: &Path) -> Result<Spec> {
        let shown = bundle.join("config.json").display().to_string();
        let bad = |message: String, fix: &'static str| ShimError::Bundle {
            path: shown.clone(),
            message,
            fix,
        };
        let dir = Dir::open_ambient_dir(bundle, ambient_authority()).map_err(|e| {
            bad(
                format!("cannot open the bundle directory: {e}"),
                "containerd passes an existing bundle; check its state directory",
            )
        })?;
        let f = dir.open("config.json").map_err(|e| {
            bad(
                format!("cannot open: {e}"),
                "the bundle needs a regular config.json inside it",
            )
        })?;
        let mut buf = Vec::new();
        f.take(MAX_CONFIG_BYTES + 1)
            .read_to_end(&mut buf)
            .map_err(|e| bad(format!("cannot read: {e}"), "check the bundle's disk"))?;
        if buf.len() as u64 > MAX_CONFIG_BYTES {
            return Err(bad(
                format!("larger than {MAX_CONFIG_BYTES} bytes"),
                "keep the OCI spec under 4 MiB (fewer env entries or annotations)",
            ));
        }
        Self::parse(&buf).map_err(|m| bad(m, "give a valid OCI runtime spec"))
    }

    /// Parses and checks a spec.
    pub fn parse(bytes: &[u8]) -> std::result::Result<Spec, String> {
        let spec: Spec = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        match &spec.process {
            None => Err("no process".into()),
            Some(p) => p.check().map(|()| spec),
        }
    }

    /// VM memory (MiB) and vCPUs. capsa's annotations win; else the
    /// container's own limits size the VM, as a runc container's cgroup
    /// would be sized: memory is the limit plus [`GUEST_OVERHEAD_MIB`],
    /// vCPUs are the CFS quota over its period, rounded up. Without either,
    /// the defaults (the shim's settings: 512 MiB and 1 vCPU unless its
    /// settings file says otherwise). The message of an error names the fix.
    pub fn vm_size(
        &self,
        default_memory_mib: u64,
        default_cpus: u32,
    ) -> std::result::Result<(u64, u32), String> {
        let res = self.linux.as_ref().and_then(|l| l.resources.as_ref());
        let mem = match self.annotations.get(ANNOTATION_MEMORY) {
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|m| (MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(m))
                .ok_or_else(|| {
                    format!(
                        "annotation {ANNOTATION_MEMORY}={v:?}: give {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB} (MiB)"
                    )
                })?,
            None => match res.and_then(|r| r.memory.as_ref()).and_then(|m| m.limit) {
                Some(limit) if limit > 0 => {
                    let mib = (limit as u64).div_ceil(1 << 20);
                    if mib > MAX_MEMORY_MIB - GUEST_OVERHEAD_MIB {
                        return Err(format!(
                            "the memory limit ({limit} bytes) is more than a capsa VM can have \
                             ({} MiB plus {GUEST_OVERHEAD_MIB} MiB for the guest): lower the limit, \
                             or size the VM with the annotation {ANNOTATION_MEMORY}",
                            MAX_MEMORY_MIB - GUEST_OVERHEAD_MIB
                        ));
                    }
                    (mib + GUEST_OVERHEAD_MIB).max(MIN_MEMORY_MIB)
                }
                _ => default_memory_mib,
            },
        };
        let cpus = match self.annotations.get(ANNOTATION_CPUS) {
            Some(v) => v
                .parse::<u32>()
                .ok()
                .filter(|c| (1..=MAX_CPUS).contains(c))
                .ok_or_else(|| {
                    format!("annotation {ANNOTATION_CPUS}={v:?}: give 1 to {MAX_CPUS}")
                })?,
            None => match res.and_then(|r| r.cpu.as_ref()) {
                Some(CpuLimits {
                    quota: Some(q),
                    period: Some(p),
                }) if *q > 0 && *p > 0 => {
                    let n = (*q as u128).div_ceil(*p as u128);
                    if n > MAX_CPUS as u128 {
                        return Err(format!(
                            "the CPU limit (quota {q} per period {p}, {n} CPUs) is more than a \
                             capsa VM's {MAX_CPUS} vCPUs: lower the limit, or size the VM with \
                             the annotation {ANNOTATION_CPUS}"
                        ));
                    }
                    n as u32
                }
                _ => default_cpus,
            },
        };
        Ok((mem, cpus))
    }
}

/// Longest `/etc/hostname` read from the pod's file.
const MAX_HOSTNAME_FILE: u64 = 256;

impl Spec {
    /// The hostname the VM should have: the spec's `hostname` (refused when
    /// it is not a valid one), else the first line of the file containerd's
    /// CRI binds at `/etc/hostname` (the pod's: CRI sets no `hostname` on a
    /// pod's containers, they share the sandbox's UTS namespace under runc;
    /// an unreadable or invalid file is logged and skipped).
    pub fn vm_hostname(&self) -> std::result::Result<Option<String>, String> {
        if let Some(h) = self.hostname.as_deref().filter(|h| !h.is_empty()) {
            return match capsa::valid_hostname(h) {
                true => Ok(Some(h.to_string())),
                false => Err(format!(
                    "hostname {:?} is not a valid hostname: give 1-64 letters, digits, '-' or '.', not starting with '-' or '.'",
                    h.chars().take(80).collect::<String>()
                )),
            };
        }
        let Some(m) = self
            .mounts
            .iter()
            .find(|m| m.destination == "/etc/hostname" && m.is_host_bind())
        else {
            return Ok(None);
        };
        let mut text = String::new();
        let read = std::fs::File::open(&m.source)
            .and_then(|f| f.take(MAX_HOSTNAME_FILE).read_to_string(&mut text));
        let line = text.lines().next().unwrap_or_default().trim();
        match read {
            Ok(_) if capsa::valid_hostname(line) => Ok(Some(line.to_string())),
            Ok(_) => {
                tracing::warn!(
                    file = m.source,
                    "no valid hostname in the pod's hostname file; the VM keeps its own"
                );
                Ok(None)
            }
            Err(e) => {
                tracing::warn!(
                    file = m.source,
                    "the pod's hostname file: {e}; the VM keeps its own"
                );
                Ok(None)
            }
        }
    }
}

impl Process {
    /// Parses an exec's process spec (the JSON in `ExecProcessRequest.spec`).
    pub fn parse(bytes: &[u8]) -> std::result::Result<Process, String> {
        if bytes.len() > MAX_PROCESS_BYTES * 2 {
            return Err(format!(
                "the process spec is larger than {} bytes",
                MAX_PROCESS_BYTES * 2
            ));
        }
        let p: Process = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        p.check().map(|()| p)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.args.is_empty() || self.args[0].is_empty() {
            return Err("the process has no args (nothing to run)".into());
        }
        if self.args.len() > MAX_ITEMS || self.env.len() > MAX_ITEMS {
            return Err(format!("more than {MAX_ITEMS} args or env entries"));
        }
        let total: usize = self
            .args
            .iter()
            .chain(self.env.iter())
            .map(String::len)
            .sum::<usize>()
            + self.cwd.len();
        if total > MAX_PROCESS_BYTES {
            return Err(format!(
                "args, env and cwd take more than {MAX_PROCESS_BYTES} bytes"
            ));
        }
        if !self.cwd.is_empty() && !self.cwd.starts_with('/') {
            return Err(format!("cwd {:?} is not absolute", self.cwd));
        }
        if self
            .args
            .iter()
            .chain(self.env.iter())
            .any(|s| s.contains('\0'))
        {
            return Err("an arg or env entry contains a NUL byte".into());
        }
        Ok(())
    }

    /// The capsa command running this process (`rows`/`cols` for a PTY).
    pub fn command(&self) -> capsa::Command {
        let mut cmd = capsa::Command::new(self.args[0].clone())
            .args(self.args[1..].iter().cloned())
            .user(self.user.uid, self.user.gid);
        for kv in &self.env {
            let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
            if !k.is_empty() {
                cmd = cmd.env(k, v);
            }
        }
        cmd = cmd.current_dir(if self.cwd.is_empty() { "/" } else { &self.cwd });
        if self.terminal {
            let (rows, cols) = match self.console_size {
                Some(s) if s.height > 0 && s.width > 0 => (clamp16(s.height), clamp16(s.width)),
                _ => (24, 80),
            };
            cmd = cmd.pty(rows, cols);
        }
        cmd
    }
}

/// A terminal dimension clamped to what a PTY takes.
pub fn clamp16(v: u32) -> u16 {
    v.clamp(1, u32::from(u16::MAX)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bound() {
        let s = Spec::parse(
            br#"{"process":{"terminal":true,"consoleSize":{"height":30,"width":100},"user":{"uid":1,"gid":2},
               "args":["sh","-c","echo hi"],"env":["PATH=/bin","A=b=c"],"cwd":"/"},
               "annotations":{"io.capsa.memory_mib":"256"}}"#,
        )
        .unwrap();
        assert_eq!(s.vm_size(512, 1).unwrap(), (256, 1));
        let p = s.process.unwrap();
        let req = p.command();
        let req = req.request();
        assert_eq!(req.argv, ["sh", "-c", "echo hi"]);
        assert!(req.env.contains(&("A".into(), "b=c".into())));
        assert_eq!((req.uid, req.gid), (Some(1), Some(2)));
        assert_eq!(req.pty.map(|p| (p.rows, p.cols)), Some((30, 100)));
        // Hostile or broken specs are refused, never a panic.
        for bad in [
            &b"{}"[..],
            b"not json",
            br#"{"process":{"args":[]}}"#,
            br#"{"process":{"args":["x"],"cwd":"rel"}}"#,
            br#"{"process":{"args":["a\u0000b"]}}"#,
        ] {
            assert!(
                Spec::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let big = format!(
            r#"{{"process":{{"args":["x"],"env":[{}]}}}}"#,
            vec!["\"A=B\""; MAX_ITEMS + 1].join(",")
        );
        assert!(Spec::parse(big.as_bytes()).is_err());
        let s = Spec::parse(
            br#"{"process":{"args":["x"]},"annotations":{"io.capsa.memory_mib":"9999999"}}"#,
        )
        .unwrap();
        assert!(s.vm_size(512, 1).unwrap_err().contains("128 to 65536"));
    }

    #[test]
    fn the_hostname_comes_from_the_spec_or_the_pods_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hostname");
        let spec = |hostname: &str| {
            Spec::parse(
                format!(
                    r#"{{"process":{{"args":["x"]}},{hostname}"mounts":[{{"destination":"/etc/hostname","type":"bind","source":{:?},"options":["rbind"]}}]}}"#,
                    file.display()
                )
                .as_bytes(),
            )
            .unwrap()
            .vm_hostname()
        };
        std::fs::write(&file, "pod1\nignored\n").unwrap();
        assert_eq!(spec(""), Ok(Some("pod1".into())));
        assert_eq!(spec(r#""hostname":"web-1","#), Ok(Some("web-1".into())));
        assert!(spec(r#""hostname":"-bad host","#)
            .unwrap_err()
            .contains("not a valid"));
        // A bad or missing file only loses the name.
        std::fs::write(&file, "bad name\n").unwrap();
        assert_eq!(spec(""), Ok(None));
        std::fs::write(&file, "x".repeat(1000)).unwrap();
        assert_eq!(spec(""), Ok(None));
        std::fs::remove_file(&file).unwrap();
        assert_eq!(spec(""), Ok(None));
    }

    #[test]
    fn limits_size_the_vm_and_annotations_win() {
        let size = |linux: &str, ann: &str| {
            Spec::parse(
                format!(
                    r#"{{"process":{{"args":["x"]}},"linux":{linux},"annotations":{{{ann}}}}}"#
                )
                .as_bytes(),
            )
            .unwrap()
            .vm_size(DEFAULT_MEMORY_MIB, 1)
        };
        let none = r#"{"resources":{}}"#;
        assert_eq!(size(none, ""), Ok((512, 1)));
        let spec = Spec::parse(br#"{"process":{"args":["x"]}}"#).unwrap();
        assert_eq!(spec.vm_size(768, 2), Ok((768, 2)), "the settings' defaults");
        assert_eq!(size("null", ""), Ok((512, 1)));
        // 1 GiB + the guest's share; quota 150000/100000 rounds up to 2.
        let limited = r#"{"resources":{"memory":{"limit":1073741824},"cpu":{"quota":150000,"period":100000}}}"#;
        assert_eq!(size(limited, ""), Ok((1024 + 64, 2)));
        // Unlimited values (0, -1) and a tiny limit.
        let unlimited =
            r#"{"resources":{"memory":{"limit":-1},"cpu":{"quota":-1,"period":100000}}}"#;
        assert_eq!(size(unlimited, ""), Ok((512, 1)));
        let tiny = r#"{"resources":{"memory":{"limit":1},"cpu":{"quota":1,"period":0}}}"#;
        assert_eq!(size(tiny, ""), Ok((128, 1)));
        // Annotations win over limits.
        assert_eq!(
            size(
                limited,
                r#""io.capsa.memory_mib":"256","io.capsa.cpus":"1""#
            ),
            Ok((256, 1))
        );
        // Beyond a VM: refused with the fix, never wrapped or clamped silently.
        let huge = format!(r#"{{"resources":{{"memory":{{"limit":{}}}}}}}"#, i64::MAX);
        let e = size(&huge, "").unwrap_err();
        assert!(
            e.contains("more than a capsa VM") && e.contains(ANNOTATION_MEMORY),
            "{e}"
        );
        let many = format!(
            r#"{{"resources":{{"cpu":{{"quota":{},"period":1}}}}}}"#,
            i64::MAX
        );
        let e = size(&many, "").unwrap_err();
        assert!(e.contains("64 vCPUs") && e.contains(ANNOTATION_CPUS), "{e}");
        assert!(Process::parse(br#"{"args":["ls"],"cwd":"/tmp"}"#).is_ok());
        let s = Spec::parse(
            br#"{"process":{"args":["x"]},"mounts":[
            {"destination":"/proc","type":"proc","source":"proc"},
            {"destination":"/data","type":"bind","source":"/srv","options":["rbind","ro"]},
            {"destination":"/v","source":"/x","options":["rbind"]}]}"#,
        )
        .unwrap();
        let binds: Vec<bool> = s.mounts.iter().map(OciMount::is_host_bind).collect();
        assert_eq!(binds, [false, true, true]);
    }

    #[test]
    fn config_json_stays_in_the_bundle_and_is_bounded() {
        let b = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(
            outside.path().join("config.json"),
            br#"{"process":{"args":["x"]}}"#,
        )
        .unwrap();
        // A symlink out of the bundle is not followed.
        std::os::unix::fs::symlink(
            outside.path().join("config.json"),
            b.path().join("config.json"),
        )
        .unwrap();
        let e = Spec::read(b.path()).unwrap_err().to_string();
        assert!(e.contains("cannot open") && e.contains("fix:"), "{e}");
        std::fs::remove_file(b.path().join("config.json")).unwrap();
        // Too large.
        let big = vec![b' '; MAX_CONFIG_BYTES as usize + 1];
        std::fs::write(b.path().join("config.json"), big).unwrap();
        let e = Spec::read(b.path()).unwrap_err().to_string();
        assert!(e.contains("larger than"), "{e}");
        // Missing.
        let e = Spec::read(&b.path().join("nope")).unwrap_err().to_string();
        assert!(e.contains("fix:"), "{e}");
        std::fs::write(
            b.path().join("config.json"),
            br#"{"process":{"args":["x"]}}"#,
        )
        .unwrap();
        assert!(Spec::read(b.path()).is_ok());
    }
}
