//! Parsing of the `capsa.*` options on the kernel command line.
//!
//! The command line is written by the host, but `capsa-init` must never panic
//! on it: whatever it holds, parsing is bounded and returns either a
//! [`Config`] (with warnings for things it ignored) or a [`CmdlineError`].

use std::fmt;
use std::path::PathBuf;

/// Most bytes of `/proc/cmdline` looked at; Linux itself keeps at most a few KiB.
pub const MAX_CMDLINE_BYTES: usize = 64 * 1024;
/// Most parameters looked at; the rest are ignored with a warning.
pub const MAX_PARAMS: usize = 1024;
/// Longest accepted hostname (Linux `HOST_NAME_MAX`).
pub const MAX_HOSTNAME_LEN: usize = 64;
/// Longest accepted `capsa.run` path (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// Hostname used when `capsa.hostname` is absent or invalid.
pub const DEFAULT_HOSTNAME: &str = "capsa";
/// `TERM` used when `capsa.term` is absent or invalid.
pub const DEFAULT_TERM: &str = "linux";

/// What the guest runs once it is set up.
///
/// New modes (the vsock agent) are added as variants here and handled in
/// `pid1`; the parsing below is the only place that maps option text to a mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// An interactive busybox login shell on the console (`capsa.mode=shell`, the default).
    Shell,
    /// One program without arguments, stdio on the console (`capsa.run=/path`).
    Run {
        /// Absolute path of the program inside the guest.
        program: PathBuf,
    },
    /// The vsock agent (`capsa.mode=agent`): exec, files and info for the host
    /// on vsock port `capsa_proto::AGENT_PORT`, until the host stops the VM.
    Agent,
}

/// Everything `capsa-init` takes from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The workload to run.
    pub mode: Mode,
    /// Hostname to set (`capsa.hostname=`).
    pub hostname: String,
    /// `TERM` for the workload (`capsa.term=`).
    pub term: String,
    /// Log every step with timings (`capsa.debug=1`).
    pub debug: bool,
    /// Load the display and input drivers (`capsa.display=1`).
    pub display: bool,
    /// A root filesystem image to mount for user commands
    /// (`capsa.rootfs=erofs|ext4` with `capsa.upper=tmpfs:MIB|disk`).
    pub rootfs: Option<RootfsBoot>,
    /// Options that were ignored, to be logged on the console.
    pub warnings: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mode: Mode::Shell,
            hostname: DEFAULT_HOSTNAME.to_string(),
            term: DEFAULT_TERM.to_string(),
            debug: false,
            display: false,
            rootfs: None,
            warnings: Vec::new(),
        }
    }
}

/// The root filesystem the host attached (virtio-blk serial `capsa-rootfs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsBoot {
    /// File system type of the image: `erofs` or `ext4`.
    pub fstype: &'static str,
    /// The writable layer.
    pub upper: Upper,
}

/// The writable layer over the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upper {
    /// A tmpfs capped at this many MiB.
    Tmpfs(u64),
    /// An ext4 disk with serial `capsa-upper`.
    Disk,
}

/// Largest tmpfs upper accepted (1 TiB; the host caps it at the guest's RAM).
pub const MAX_TMPFS_MIB: u64 = 1 << 20;

/// A command line `capsa-init` cannot act on; the guest powers off after printing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmdlineError {
    /// `capsa.mode` names a mode this `capsa-init` does not have.
    UnknownMode(String),
    /// `capsa.mode=run` without `capsa.run=PATH`.
    RunWithoutProgram,
    /// `capsa.run` given together with a different explicit `capsa.mode`.
    ConflictingMode(String),
    /// `capsa.run` is not an absolute path (or is empty or too long).
    BadProgram(String),
    /// `capsa.rootfs` / `capsa.upper` missing, unknown or inconsistent.
    BadRootfs(String),
}

impl fmt::Display for CmdlineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownMode(m) => write!(
                f,
                "unknown capsa.mode={m:?}; this capsa-init supports shell, run and agent \
                 (fix: rebuild the bundle with a newer capsa-init or change the mode)"
            ),
            Self::RunWithoutProgram => {
                write!(
                    f,
                    "capsa.mode=run needs capsa.run=/absolute/path (fix: add it)"
                )
            }
            Self::ConflictingMode(m) => write!(
                f,
                "capsa.run given together with capsa.mode={m:?} (fix: drop one of them)"
            ),
            Self::BadRootfs(why) => write!(
                f,
                "bad root filesystem options: {why} (fix: let capsa set capsa.rootfs and \
                 capsa.upper, e.g. with --image)"
            ),
            Self::BadProgram(p) => write!(
                f,
                "capsa.run={p:?} is not an absolute path of at most {MAX_PATH_LEN} bytes \
                 (fix: pass e.g. capsa.run=/bin/true)"
            ),
        }
    }
}

impl std::error::Error for CmdlineError {}

/// Splits a kernel command line into parameters the way Linux does: spaces
/// separate, double quotes group (and are removed), `--` ends the kernel part.
///
/// Returns at most [`MAX_PARAMS`] parameters of the first
/// [`MAX_CMDLINE_BYTES`] bytes, and whether anything was cut off.
pub fn split_params(line: &str) -> (Vec<String>, bool) {
    let mut truncated = false;
    let line = if line.len() > MAX_CMDLINE_BYTES {
        truncated = true;
        let mut end = MAX_CMDLINE_BYTES;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        &line[..end]
    } else {
        line
    };
    let mut params = Vec::new();
    let mut current = String::new();
    let mut in_token = false;
    let mut in_quote = false;
    for c in line.chars() {
        match c {
            '"' => {
                in_quote = !in_quote;
                in_token = true;
            }
            c if c.is_whitespace() && !in_quote => {
                if in_token {
                    if current == "--" {
                        return (params, truncated);
                    }
                    if params.len() == MAX_PARAMS {
                        return (params, true);
                    }
                    params.push(std::mem::take(&mut current));
                    in_token = false;
                }
            }
            c => {
                current.push(c);
                in_token = true;
            }
        }
    }
    if in_token && current != "--" {
        if params.len() == MAX_PARAMS {
            truncated = true;
        } else {
            params.push(current);
        }
    }
    (params, truncated)
}

/// Parses the `capsa.*` options of a kernel command line (later ones win).
pub fn parse(line: &str) -> Result<Config, CmdlineError> {
    let (params, truncated) = split_params(line);
    let mut cfg = Config::default();
    if truncated {
        cfg.warnings
            .push("kernel command line too long; ignored its tail".to_string());
    }
    let mut mode: Option<String> = None;
    let mut run: Option<String> = None;
    let mut rootfs: Option<String> = None;
    let mut upper: Option<String> = None;
    for param in &params {
        let Some(rest) = param.strip_prefix("capsa.") else {
            continue;
        };
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        match key {
            "mode" => mode = Some(value.to_string()),
            "run" => run = Some(value.to_string()),
            "rootfs" => rootfs = Some(value.to_string()),
            "upper" => upper = Some(value.to_string()),
            "hostname" => match valid_hostname(value) {
                true => cfg.hostname = value.to_string(),
                false => cfg.warnings.push(format!(
                    "ignoring invalid capsa.hostname={:?}; using {:?}",
                    truncate(value),
                    cfg.hostname
                )),
            },
            "term" => match valid_term(value) {
                true => cfg.term = value.to_string(),
                false => cfg
                    .warnings
                    .push(format!("ignoring invalid capsa.term={:?}", truncate(value))),
            },
            "debug" => match parse_bool(value) {
                Some(b) => cfg.debug = b,
                None => cfg.warnings.push(format!(
                    "ignoring capsa.debug={:?}; expected 0 or 1",
                    truncate(value)
                )),
            },
            "display" => match parse_bool(value) {
                Some(b) => cfg.display = b,
                None => cfg.warnings.push(format!(
                    "ignoring capsa.display={:?}; expected 0 or 1",
                    truncate(value)
                )),
            },
            other => cfg
                .warnings
                .push(format!("ignoring unknown option capsa.{}", truncate(other))),
        }
    }
    cfg.mode = match (mode.as_deref(), run) {
        (None | Some("shell"), None) => Mode::Shell,
        (None | Some("run"), Some(program)) => Mode::Run {
            program: valid_program(&program)?,
        },
        (Some("run"), None) => return Err(CmdlineError::RunWithoutProgram),
        (Some("shell"), Some(_)) => return Err(CmdlineError::ConflictingMode("shell".to_string())),
        (Some("agent"), None) => Mode::Agent,
        (Some("agent"), Some(_)) => return Err(CmdlineError::ConflictingMode("agent".to_string())),
        (Some(other), _) => return Err(CmdlineError::UnknownMode(truncate(other))),
    };
    cfg.rootfs = parse_rootfs(rootfs.as_deref(), upper.as_deref())?;
    Ok(cfg)
}

fn parse_rootfs(
    rootfs: Option<&str>,
    upper: Option<&str>,
) -> Result<Option<RootfsBoot>, CmdlineError> {
    let bad = |s: String| Err(CmdlineError::BadRootfs(s));
    let fstype = match rootfs {
        None if upper.is_none() => return Ok(None),
        None => return bad("capsa.upper without capsa.rootfs".into()),
        Some("erofs") => "erofs",
        Some("ext4") => "ext4",
        Some(other) => return bad(format!("capsa.rootfs={:?}", truncate(other))),
    };
    let upper = match upper {
        Some("disk") => Upper::Disk,
        Some(u) => match u.strip_prefix("tmpfs:").map(str::parse::<u64>) {
            Some(Ok(mib)) if (1..=MAX_TMPFS_MIB).contains(&mib) => Upper::Tmpfs(mib),
            _ => return bad(format!("capsa.upper={:?}", truncate(u))),
        },
        None => return bad("capsa.rootfs without capsa.upper".into()),
    };
    Ok(Some(RootfsBoot { fstype, upper }))
}

fn valid_program(p: &str) -> Result<PathBuf, CmdlineError> {
    if p.starts_with('/') && p.len() > 1 && p.len() <= MAX_PATH_LEN && !p.contains('\0') {
        Ok(PathBuf::from(p))
    } else {
        Err(CmdlineError::BadProgram(truncate(p)))
    }
}

/// RFC 1123 host names (letters, digits, `-`, `.`), as `sethostname` expects.
fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= MAX_HOSTNAME_LEN
        && !h.starts_with(['-', '.'])
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn valid_term(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+'))
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "" | "1" | "y" | "yes" | "on" | "true" => Some(true),
        "0" | "n" | "no" | "off" | "false" => Some(false),
        _ => None,
    }
}

/// Keeps error messages short whatever the input.
fn truncate(s: &str) -> String {
    const MAX: usize = 80;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_to_shell() {
        let c = parse("console=ttyS0 quiet panic=-1").unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn run_mode_and_options() {
        let c = parse(
            "console=ttyS0 capsa.run=/bin/true capsa.hostname=box-1 capsa.term=xterm-256color capsa.debug=1",
        )
        .unwrap();
        assert_eq!(
            c.mode,
            Mode::Run {
                program: PathBuf::from("/bin/true")
            }
        );
        assert_eq!(c.hostname, "box-1");
        assert_eq!(c.term, "xterm-256color");
        assert!(c.debug);
        assert!(!c.display);
        assert!(parse("capsa.display=1").unwrap().display);
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn explicit_modes() {
        assert_eq!(parse("capsa.mode=shell").unwrap().mode, Mode::Shell);
        assert_eq!(
            parse("capsa.mode=run capsa.run=/x").unwrap().mode,
            Mode::Run {
                program: "/x".into()
            }
        );
        assert_eq!(
            parse("capsa.mode=run"),
            Err(CmdlineError::RunWithoutProgram)
        );
        assert!(matches!(
            parse("capsa.mode=shell capsa.run=/x"),
            Err(CmdlineError::ConflictingMode(_))
        ));
        assert_eq!(parse("capsa.mode=agent").unwrap().mode, Mode::Agent);
        assert!(matches!(
            parse("capsa.mode=agent capsa.run=/x"),
            Err(CmdlineError::ConflictingMode(m)) if m == "agent"
        ));
        assert!(
            matches!(parse("capsa.mode=vsock"), Err(CmdlineError::UnknownMode(m)) if m == "vsock")
        );
        assert!(matches!(
            parse("capsa.run=relative"),
            Err(CmdlineError::BadProgram(_))
        ));
        assert!(matches!(
            parse("capsa.run="),
            Err(CmdlineError::BadProgram(_))
        ));
        assert!(matches!(
            parse("capsa.run"),
            Err(CmdlineError::BadProgram(_))
        ));
    }

    #[test]
    fn rootfs_options() {
        let c = parse("capsa.mode=agent capsa.rootfs=erofs capsa.upper=tmpfs:256").unwrap();
        assert_eq!(
            c.rootfs,
            Some(RootfsBoot {
                fstype: "erofs",
                upper: Upper::Tmpfs(256)
            })
        );
        let c = parse("capsa.rootfs=ext4 capsa.upper=disk").unwrap();
        assert_eq!(c.rootfs.unwrap().upper, Upper::Disk);
        for bad in [
            "capsa.rootfs=btrfs capsa.upper=disk",
            "capsa.rootfs=erofs",
            "capsa.upper=disk",
            "capsa.rootfs=erofs capsa.upper=tmpfs:0",
            "capsa.rootfs=erofs capsa.upper=tmpfs:x",
            "capsa.rootfs=erofs capsa.upper=tmpfs:99999999999999999999",
        ] {
            assert!(
                matches!(parse(bad), Err(CmdlineError::BadRootfs(_))),
                "{bad}"
            );
        }
        assert_eq!(parse("quiet").unwrap().rootfs, None);
    }

    #[test]
    fn last_value_wins() {
        let c = parse("capsa.hostname=a capsa.hostname=b").unwrap();
        assert_eq!(c.hostname, "b");
    }

    #[test]
    fn quotes_group_and_are_removed() {
        let (p, t) = split_params(r#"a "b c" d="e f" "g=h i"  "#);
        assert_eq!(p, vec!["a", "b c", "d=e f", "g=h i"]);
        assert!(!t);
        let c = parse(r#"capsa.run="/opt/my prog""#).unwrap();
        assert_eq!(
            c.mode,
            Mode::Run {
                program: "/opt/my prog".into()
            }
        );
    }

    #[test]
    fn init_args_after_dashes_are_ignored() {
        let c = parse("quiet -- capsa.run=/bin/true").unwrap();
        assert_eq!(c.mode, Mode::Shell);
        let (p, _) = split_params("a --");
        assert_eq!(p, vec!["a"]);
    }

    #[test]
    fn invalid_values_are_warnings() {
        let c =
            parse("capsa.hostname=-bad capsa.term=x;y capsa.debug=maybe capsa.colour=red").unwrap();
        assert_eq!(c.hostname, DEFAULT_HOSTNAME);
        assert_eq!(c.term, DEFAULT_TERM);
        assert!(!c.debug);
        assert_eq!(c.warnings.len(), 4, "{:?}", c.warnings);
        let long = "h".repeat(MAX_HOSTNAME_LEN + 1);
        assert_eq!(
            parse(&format!("capsa.hostname={long}")).unwrap().hostname,
            DEFAULT_HOSTNAME
        );
    }

    #[test]
    fn odd_input_never_panics() {
        let inputs = [
            "",
            "\"",
            "\"\"\"",
            "capsa.",
            "capsa.=",
            "=",
            "capsa.mode=",
            "\u{0}\u{1}capsa.run=/\u{0}",
            "capsa.hostname=é\u{301}",
            "\t\n\r ",
        ];
        for i in inputs {
            let _ = parse(i);
        }
        let huge = "capsa.debug=1 ".repeat(MAX_PARAMS * 3);
        let c = parse(&huge).unwrap();
        assert!(c.warnings.iter().any(|w| w.contains("too long")));
        let big = "é".repeat(MAX_CMDLINE_BYTES);
        let (_, truncated) = split_params(&big);
        assert!(truncated);
        let long_mode = format!("capsa.mode={}", "x".repeat(10_000));
        match parse(&long_mode) {
            Err(e) => assert!(e.to_string().len() < 400),
            Ok(_) => panic!("unknown mode accepted"),
        }
    }
}
