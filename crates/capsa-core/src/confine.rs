//! How much a backend confines the VMM process it runs (see ARCHITECTURE.md,
//! "Threat model"). Plain settings, read from the environment in one place so
//! the library, the per-VM monitor and the daemon agree.

use std::path::PathBuf;

/// The environment variable that selects the confinement layers.
pub const CONFINE_ENV: &str = "CAPSA_CONFINE";
/// The environment variable that sets the range of per-sandbox uids (`BASE:COUNT`).
pub const JAIL_UIDS_ENV: &str = "CAPSA_JAIL_UIDS";
/// The environment variable that moves the per-sandbox jail directories.
pub const JAIL_DIR_ENV: &str = "CAPSA_JAIL_DIR";

/// First uid (and gid) handed to a confined QEMU by default.
///
/// Inside 0x70000000..0x7fffffff, which systemd leaves unused (its container
/// ranges end below it and nothing else allocates there); see
/// `CAPSA_JAIL_UIDS` to move it.
pub const DEFAULT_UID_BASE: u32 = 0x7ca5_0000;
/// How many per-sandbox uids there are by default (sandboxes at once, as root).
pub const DEFAULT_UID_COUNT: u32 = 4096;
/// Where per-sandbox jail directories live by default (root only).
pub const DEFAULT_JAIL_DIR: &str = "/run/capsa-jail";

/// Which confinement layers are on. All are on by default; each can be
/// turned off for measuring or for a host that lacks it (`CAPSA_CONFINE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confinement {
    /// QEMU runs under its own seccomp filter (`-sandbox on,...`) and the
    /// vsock device's threads under capsa's.
    pub seccomp: bool,
    /// When capsa runs as root, QEMU runs as a per-sandbox unprivileged uid
    /// that owns nothing but its jail directory.
    pub user: bool,
    /// QEMU runs in a per-sandbox cgroup capping its memory and CPU (when
    /// the host lets capsa create one).
    pub cgroup: bool,
    /// First per-sandbox uid/gid.
    pub uid_base: u32,
    /// Number of per-sandbox uids.
    pub uid_count: u32,
    /// Parent of the per-sandbox jail directories.
    pub jail_dir: PathBuf,
}

impl Default for Confinement {
    fn default() -> Self {
        Self {
            seccomp: true,
            user: true,
            cgroup: true,
            uid_base: DEFAULT_UID_BASE,
            uid_count: DEFAULT_UID_COUNT,
            jail_dir: PathBuf::from(DEFAULT_JAIL_DIR),
        }
    }
}

impl Confinement {
    /// Every layer off: what capsa did before confinement existed.
    pub fn off() -> Self {
        Self {
            seccomp: false,
            user: false,
            cgroup: false,
            ..Self::default()
        }
    }

    /// Reads `CAPSA_CONFINE`, `CAPSA_JAIL_UIDS` and `CAPSA_JAIL_DIR`.
    pub fn from_env() -> Result<Self, String> {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        Self::parse(
            get(CONFINE_ENV).as_deref(),
            get(JAIL_UIDS_ENV).as_deref(),
            get(JAIL_DIR_ENV).as_deref(),
        )
    }

    /// [`Confinement::from_env`] on given values (pure, for tests).
    ///
    /// `confine` is `on`/`all` (default), `off`/`none`, or a comma list of
    /// `seccomp`, `user`, `cgroup` naming the layers to keep.
    pub fn parse(
        confine: Option<&str>,
        uids: Option<&str>,
        jail_dir: Option<&str>,
    ) -> Result<Self, String> {
        let mut c = Self::default();
        match confine.map(str::trim) {
            None | Some("on" | "all" | "1" | "yes") => {}
            Some("off" | "none" | "0" | "no") => {
                c.seccomp = false;
                c.user = false;
                c.cgroup = false;
            }
            Some(list) => {
                c.seccomp = false;
                c.user = false;
                c.cgroup = false;
                for item in list.split(',').map(str::trim) {
                    match item {
                        "seccomp" => c.seccomp = true,
                        "user" => c.user = true,
                        "cgroup" => c.cgroup = true,
                        other => {
                            return Err(format!(
                                "{CONFINE_ENV}={list:?}: unknown layer {other:?}. Fix: use `on`, \
                                 `off`, or a comma list of seccomp, user, cgroup"
                            ))
                        }
                    }
                }
            }
        }
        if let Some(u) = uids {
            let bad = || {
                format!(
                    "{JAIL_UIDS_ENV}={u:?} is not BASE:COUNT with 0 < BASE and BASE+COUNT below \
                     2^31. Fix: e.g. {JAIL_UIDS_ENV}={DEFAULT_UID_BASE}:{DEFAULT_UID_COUNT}"
                )
            };
            let (b, n) = u.trim().split_once(':').ok_or_else(bad)?;
            let base: u32 = b.trim().parse().map_err(|_| bad())?;
            let count: u32 = n.trim().parse().map_err(|_| bad())?;
            // Above 2^31 uids turn negative in too many programs.
            if base == 0 || count == 0 || u64::from(base) + u64::from(count) > 1 << 31 {
                return Err(bad());
            }
            c.uid_base = base;
            c.uid_count = count;
        }
        if let Some(d) = jail_dir {
            let p = PathBuf::from(d.trim());
            if !p.is_absolute() {
                return Err(format!(
                    "{JAIL_DIR_ENV}={d:?} is not an absolute path. Fix: e.g. \
                     {JAIL_DIR_ENV}={DEFAULT_JAIL_DIR}"
                ));
            }
            c.jail_dir = p;
        }
        Ok(c)
    }

    /// A one-line summary, e.g. `seccomp,user,cgroup`.
    pub fn layers(&self) -> String {
        let mut v = Vec::new();
        if self.seccomp {
            v.push("seccomp");
        }
        if self.user {
            v.push("user");
        }
        if self.cgroup {
            v.push("cgroup");
        }
        if v.is_empty() {
            "off".into()
        } else {
            v.join(",")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_layers() {
        assert_eq!(
            Confinement::parse(None, None, None),
            Ok(Confinement::default())
        );
        let off = Confinement::parse(Some("off"), None, None).unwrap();
        assert_eq!(off.layers(), "off");
        let some = Confinement::parse(Some("seccomp, cgroup"), None, None).unwrap();
        assert!(some.seccomp && some.cgroup && !some.user);
        let err = Confinement::parse(Some("seccomp,jail"), None, None).unwrap_err();
        assert!(err.contains("\"jail\"") && err.contains("Fix"), "{err}");
    }

    #[test]
    fn parses_uid_range() {
        let c = Confinement::parse(None, Some("100000:16"), Some("/run/j")).unwrap();
        assert_eq!((c.uid_base, c.uid_count), (100000, 16));
        assert_eq!(c.jail_dir, PathBuf::from("/run/j"));
        for bad in ["0:5", "5", "x:1", "2147483647:2", "10:0"] {
            assert!(Confinement::parse(None, Some(bad), None).is_err(), "{bad}");
        }
        assert!(Confinement::parse(None, None, Some("rel/dir")).is_err());
    }
}
