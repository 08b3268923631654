//! The shim's settings. containerd hands a runtime its options on every
//! Create; for a runtime that is not runc they are `runtimeoptions.v1.Options`
//! and carry one useful field, `ConfigPath` (containerd's CRI config
//! `[...runtimes.capsa.options] ConfigPath = "..."`, or `ctr run
//! --runtime-config-path`), as Kata's shim reads its configuration. That file
//! is TOML; what it leaves out comes from the shim's environment (which is
//! containerd's), then the defaults.
//!
//! ```toml
//! pool_size = 2            # warm VMs per image and VM size, 0..=8
//! fast_start = true        # base snapshots (and so the pool) on
//! default_memory_mib = 512 # a container without a memory limit or annotation
//! default_cpus = 1         # a container without a CPU limit or annotation
//! pool_max_idle_secs = 1800 # idle pool members older than this are removed; 0: never
//! ```

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::CodedInputStream;
use serde::Deserialize;

use crate::bundle::{DEFAULT_MEMORY_MIB, MAX_CPUS, MAX_MEMORY_MIB, MIN_MEMORY_MIB};
use crate::error::{Result, ShimError};
use crate::pool::MAX_POOL_SIZE;

/// Environment variable: `0` makes every task boot its VM cold (no base
/// snapshot is made or restored).
pub const FAST_START_ENV: &str = "CAPSA_SHIM_FAST_START";
/// Largest settings file read.
pub const MAX_FILE_BYTES: u64 = 64 << 10;
/// Longest `ConfigPath`.
const MAX_PATH_BYTES: usize = 4096;
/// containerd's message for a non-runc runtime's options.
const RUNTIME_OPTIONS: &str = "runtimeoptions.v1.Options";

/// What the shim does, resolved from the file, the environment and defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Idle pool members kept per base snapshot (0: no pool).
    pub pool_size: usize,
    /// Whether base snapshots are made and restored.
    pub fast_start: bool,
    /// VM memory (MiB) when the container has no limit and no annotation.
    pub default_memory_mib: u64,
    /// vCPUs when the container has no limit and no annotation.
    pub default_cpus: u32,
    /// Ready pool members idle longer than this are removed (`None`: never).
    pub pool_max_idle: Option<Duration>,
    /// The file these came from, if any (for the log).
    pub file: Option<PathBuf>,
}

/// The file's keys; any other key is refused (a typo must not be ignored).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    pool_size: Option<usize>,
    fast_start: Option<bool>,
    default_memory_mib: Option<u64>,
    default_cpus: Option<u32>,
    pool_max_idle_secs: Option<u64>,
}

/// Idle pool members are removed after this long by default (30 min).
pub const DEFAULT_POOL_MAX_IDLE: Duration = Duration::from_secs(30 * 60);
/// Longest idle time a settings file may give (7 days).
const MAX_POOL_MAX_IDLE_SECS: u64 = 7 * 24 * 3600;

impl Settings {
    /// From the environment alone (tasks created without options).
    pub fn from_env() -> Settings {
        Settings {
            pool_size: crate::pool::size(),
            fast_start: std::env::var(FAST_START_ENV).map_or(true, |v| v != "0"),
            default_memory_mib: DEFAULT_MEMORY_MIB,
            default_cpus: 1,
            pool_max_idle: Some(DEFAULT_POOL_MAX_IDLE),
            file: None,
        }
    }

    /// From a Create request's runtime options: the file they name, over
    /// the environment. Options of another runtime, an unreadable file or a
    /// bad value are errors naming the fix, never silently the defaults.
    pub fn from_options(options: Option<&Any>) -> Result<Settings> {
        let mut s = Settings::from_env();
        let Some(path) = config_path(options)? else {
            return Ok(s);
        };
        let f = read_file(&path)?;
        let bad = |message: String| ShimError::Config {
            path: path.display().to_string(),
            message,
        };
        if let Some(n) = f.pool_size {
            if n > MAX_POOL_SIZE {
                return Err(bad(format!("pool_size = {n}: give 0 to {MAX_POOL_SIZE}")));
            }
            s.pool_size = n;
        }
        if let Some(m) = f.default_memory_mib {
            if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&m) {
                return Err(bad(format!(
                    "default_memory_mib = {m}: give {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB}"
                )));
            }
            s.default_memory_mib = m;
        }
        if let Some(c) = f.default_cpus {
            if !(1..=MAX_CPUS).contains(&c) {
                return Err(bad(format!("default_cpus = {c}: give 1 to {MAX_CPUS}")));
            }
            s.default_cpus = c;
        }
        if let Some(secs) = f.pool_max_idle_secs {
            if secs > MAX_POOL_MAX_IDLE_SECS {
                return Err(bad(format!(
                    "pool_max_idle_secs = {secs}: give 0 (never) to {MAX_POOL_MAX_IDLE_SECS} (7 days)"
                )));
            }
            s.pool_max_idle = (secs > 0).then(|| Duration::from_secs(secs));
        }
        if let Some(b) = f.fast_start {
            s.fast_start = b;
        }
        s.file = Some(path);
        Ok(s)
    }
}

/// The `ConfigPath` of containerd's runtime options, if any.
fn config_path(options: Option<&Any>) -> Result<Option<PathBuf>> {
    let Some(any) = options.filter(|a| !a.type_url.is_empty() || !a.value.is_empty()) else {
        return Ok(None);
    };
    let kind = any.type_url.rsplit('/').next().unwrap_or_default();
    if kind != RUNTIME_OPTIONS {
        return Err(ShimError::InvalidArgument(format!(
            "the runtime options are {:?}, which the capsa shim does not read; fix: give the \
             runtime only a ConfigPath (containerd's [...runtimes.capsa.options] ConfigPath, or \
             ctr run --runtime-config-path), not runc's options",
            truncate(&any.type_url)
        )));
    }
    let path = decode_config_path(&any.value).map_err(|e| {
        ShimError::InvalidArgument(format!(
            "containerd's runtime options do not decode ({e}); fix: check containerd's runtime config"
        ))
    })?;
    match path {
        None => Ok(None),
        Some(p) if p.is_empty() => Ok(None),
        Some(p) if !p.starts_with('/') || p.len() > MAX_PATH_BYTES => {
            Err(ShimError::InvalidArgument(format!(
                "ConfigPath {:?} is not an absolute path; fix: give the settings file's full path",
                truncate(&p)
            )))
        }
        Some(p) => Ok(Some(PathBuf::from(p))),
    }
}

/// `config_path` (field 2) of `runtimeoptions.v1.Options { string type_url = 1;
/// string config_path = 2; }`; other fields are skipped, as protobuf says.
fn decode_config_path(bytes: &[u8]) -> std::result::Result<Option<String>, String> {
    let mut input = CodedInputStream::from_bytes(bytes);
    let mut path = None;
    while let Some(tag) = input.read_raw_tag_or_eof().map_err(|e| e.to_string())? {
        let (field, wire) = (tag >> 3, tag & 7);
        if field == 2 && wire == 2 {
            path = Some(input.read_string().map_err(|e| e.to_string())?);
        } else {
            let wire = containerd_shim::protos::protobuf::rt::WireType::new(wire)
                .ok_or_else(|| format!("wire type {wire} of field {field}"))?;
            input.skip_field(wire).map_err(|e| e.to_string())?;
        }
    }
    Ok(path)
}

fn read_file(path: &Path) -> Result<File> {
    let bad = |message: String| ShimError::Config {
        path: path.display().to_string(),
        message,
    };
    let f = std::fs::File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
    let mut text = String::new();
    f.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| bad(format!("cannot read as UTF-8 text: {e}")))?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(bad(format!("larger than {MAX_FILE_BYTES} bytes")));
    }
    toml::from_str(&text).map_err(|e| bad(format!("not valid settings: {e}")))
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(path: &str) -> Any {
        // type_url = 1 ("x"), config_path = 2, and an unknown varint field 5.
        let mut v = vec![0x0a, 1, b'x', 0x12, path.len() as u8];
        v.extend_from_slice(path.as_bytes());
        v.extend_from_slice(&[0x28, 7]);
        Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: v,
            ..Default::default()
        }
    }

    #[test]
    fn options_name_the_file_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("shim.toml");
        std::fs::write(
            &file,
            "pool_size = 3\nfast_start = false\ndefault_memory_mib = 768\ndefault_cpus = 2\npool_max_idle_secs = 0\n",
        )
        .unwrap();
        let s = Settings::from_options(Some(&options(file.to_str().unwrap()))).unwrap();
        assert_eq!(
            (
                s.pool_size,
                s.fast_start,
                s.default_memory_mib,
                s.default_cpus
            ),
            (3, false, 768, 2)
        );
        assert_eq!(s.pool_max_idle, None, "0 means never");
        // No options, or empty ones: the environment and defaults.
        assert_eq!(Settings::from_options(None).unwrap().file, None);
        assert_eq!(
            Settings::from_options(Some(&Any::default())).unwrap().file,
            None
        );

        let err = |text: &str| {
            std::fs::write(&file, text).unwrap();
            Settings::from_options(Some(&options(file.to_str().unwrap())))
                .unwrap_err()
                .to_string()
        };
        assert!(err("pool_size = 9\n").contains("give 0 to 8"));
        assert!(err("default_memory_mib = 64\n").contains("give 128"));
        assert!(err("default_cpus = 0\n").contains("give 1 to 64"));
        assert!(err("pool_max_idle_secs = 99999999\n").contains("7 days"));
        assert!(err("pool_sise = 1\n").contains("pool_sise"));
        assert!(err("pool_size = -1\n").contains("not valid settings"));
        std::fs::write(&file, vec![b'#'; MAX_FILE_BYTES as usize + 2]).unwrap();
        let e = Settings::from_options(Some(&options(file.to_str().unwrap())))
            .unwrap_err()
            .to_string();
        assert!(e.contains("larger than"), "{e}");

        let missing = Settings::from_options(Some(&options("/nonexistent/shim.toml")))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("/nonexistent/shim.toml"), "{missing}");
        let relative = Settings::from_options(Some(&options("shim.toml")))
            .unwrap_err()
            .to_string();
        assert!(relative.contains("absolute"), "{relative}");
        let runc = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: vec![],
            ..Default::default()
        };
        let e = Settings::from_options(Some(&runc)).unwrap_err().to_string();
        assert!(e.contains("ConfigPath"), "{e}");
        // Truncated protobuf: an error, not a panic.
        let mut broken = options("/x");
        broken.value.truncate(4);
        assert!(Settings::from_options(Some(&broken)).is_err());
    }
}
