//! Debian root filesystems built from apt with `mmdebstrap`, stored as single-layer OCI images.
//!
//! ```text
//! <cache>/debian/<suite>/archives/   every .deb downloaded so far (synced in before, out after)
//! <cache>/debian/<suite>/lists/      the package lists of the last `apt-get update`
//! ```
//!
//! (`<cache>` is `$CAPSA_DEB_CACHE` when set.) A rebuild whose packages are all in `archives/` and whose lists are younger than
//! [`DebianOptions::lists_max_age`] runs with `--skip=update` and touches no network.
//! `mmdebstrap` runs as root when capsa does, else in a user namespace (`--mode=auto`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::OciError;
use crate::spec::{ConfigFile, Descriptor, Digest, ImageConfig, Manifest, RootFs};
use crate::spec::{MT_LAYER_TAR, MT_OCI_CONFIG, MT_OCI_MANIFEST};
use crate::store::{ImageRecord, Store};

/// Most packages one build may name.
const MAX_PACKAGES: usize = 500;
/// Lines of mmdebstrap's stderr kept for an error message.
const STDERR_TAIL: usize = 30;

/// What to build.
#[derive(Debug, Clone)]
pub struct DebianOptions {
    /// The suite (`bookworm`, `trixie`, `stable`, ...).
    pub suite: String,
    /// Packages to install on top of the variant.
    pub packages: Vec<String>,
    /// mmdebstrap variant: `apt` (default: Essential + apt), `minbase`, `essential`, ...
    pub variant: String,
    /// The Debian mirror; default: the host's from /etc/apt/sources.list*, else deb.debian.org.
    pub mirror: Option<String>,
    /// Where downloaded .debs and package lists are kept (default `<capsa cache>/debian`).
    pub cache_dir: PathBuf,
    /// Package lists older than this are fetched again.
    pub lists_max_age: Duration,
    /// Always fetch the package lists.
    pub refresh: bool,
    /// Run mmdebstrap even if an image from the same inputs (suite, variant, packages, mirror,
    /// package lists) is in the store.
    pub rebuild: bool,
    /// A preset adding its packages, files and environment (e.g. [`Recipe::Desktop`]).
    pub recipe: Option<Recipe>,
}

/// A file a recipe puts into the image.
#[derive(Debug, Clone, Copy)]
pub struct RecipeFile {
    /// Absolute path in the image.
    pub path: &'static str,
    /// Permission bits.
    pub mode: u32,
    /// The contents.
    pub contents: &'static str,
}

/// A preset for `capsa image build --recipe`: packages, files and environment that make a
/// Debian image do one job, on top of the `--packages` given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipe {
    /// A desktop for a sandbox with a display: Xorg (modesetting on the bochs DRM
    /// framebuffer), udev + libinput for the virtio tablet and keyboard, openbox, xterm,
    /// x11-utils, xdotool and scrot, and `/usr/local/bin/capsa-desktop` to start it.
    Desktop,
}

const DESKTOP_PACKAGES: &[&str] = &[
    "openbox",
    "procps",
    "scrot",
    "udev",
    "x11-utils",
    "xdotool",
    "xfonts-base",
    "xserver-xorg-core",
    "xserver-xorg-input-libinput",
    "xterm",
];

const DESKTOP_FILES: &[RecipeFile] = &[
    RecipeFile {
        path: "/usr/local/bin/capsa-desktop",
        mode: 0o755,
        contents: include_str!("../recipes/desktop/capsa-desktop"),
    },
    RecipeFile {
        path: "/etc/X11/xorg.conf.d/10-capsa.conf",
        mode: 0o644,
        contents: include_str!("../recipes/desktop/10-capsa.conf"),
    },
];

impl Recipe {
    /// Every recipe, for help texts and errors.
    pub const ALL: &'static [Recipe] = &[Recipe::Desktop];

    /// Parses a `--recipe` value.
    pub fn parse(s: &str) -> Result<Recipe, OciError> {
        Recipe::ALL
            .iter()
            .copied()
            .find(|r| r.name() == s)
            .ok_or_else(|| OciError::BadRequest {
                what: "--recipe",
                reason: format!("{s:?} is not a recipe"),
                fix: "use --recipe desktop (Xorg, openbox, xterm; add a browser with --packages chromium)",
            })
    }

    /// The name `--recipe` takes.
    pub fn name(self) -> &'static str {
        match self {
            Recipe::Desktop => "desktop",
        }
    }

    /// Packages installed on top of the build's own.
    pub fn packages(self) -> &'static [&'static str] {
        match self {
            Recipe::Desktop => DESKTOP_PACKAGES,
        }
    }

    /// Files written into the image after the packages are installed.
    pub fn files(self) -> &'static [RecipeFile] {
        match self {
            Recipe::Desktop => DESKTOP_FILES,
        }
    }

    /// Variables added to the image's `Env`.
    pub fn env(self) -> &'static [&'static str] {
        match self {
            // So `capsa exec desk -- xdotool ...` finds the desktop.
            Recipe::Desktop => &["DISPLAY=:0"],
        }
    }

    /// mmdebstrap customize hooks (shell, `$1` is the root) run after the files are in.
    fn hooks(self) -> Vec<String> {
        match self {
            // fontconfig validates its caches by the font directories' mtimes, which the
            // reproducible tar then clamps: every program would rescan every font at start
            // (openbox spent ~15 s of TCG on it). Set the mtimes to the clamp first, then
            // build the caches, so they stay valid in the image.
            Recipe::Desktop => vec![format!(
                "if [ -x \"$1\"/usr/bin/fc-cache ]; then \
                 for d in /usr/share/fonts /usr/local/share/fonts /usr/share/X11/fonts; do \
                 if [ -d \"$1$d\" ]; then find \"$1$d\" -type d -exec touch -d @{t} {{}} +; fi; \
                 done; chroot \"$1\" fc-cache -s -f; fi",
                t = crate::store::REPRODUCIBLE_TIME
            )],
        }
    }

    /// Identifies the recipe's content for the build cache key.
    fn fingerprint(self) -> String {
        let mut k = format!("{}\n{:?}\n{:?}\n", self.name(), self.packages(), self.env());
        for f in self.files() {
            k.push_str(&format!("{} {:o} {}\n", f.path, f.mode, f.contents));
        }
        for h in self.hooks() {
            k.push_str(&h);
        }
        Digest::of(k.as_bytes()).hex().to_string()
    }
}

impl DebianOptions {
    /// Defaults for `suite` with `packages`, caching under `$CAPSA_DEB_CACHE` if set, else
    /// `debian/` beside the image store.
    pub fn new(suite: &str, packages: Vec<String>) -> Result<Self, OciError> {
        let cache_dir = match std::env::var_os("CAPSA_DEB_CACHE").filter(|d| !d.is_empty()) {
            Some(d) => PathBuf::from(d),
            None => {
                let images = Store::default_dir()?;
                images
                    .parent()
                    .map(|p| p.join("debian"))
                    .unwrap_or_else(|| images.join("debian"))
            }
        };
        Ok(DebianOptions {
            suite: suite.to_string(),
            packages,
            variant: "apt".into(),
            mirror: None,
            cache_dir,
            lists_max_age: Duration::from_secs(24 * 3600),
            refresh: false,
            rebuild: false,
            recipe: None,
        })
    }
}

/// The result of a build.
#[derive(Debug, Clone)]
pub struct DebianBuild {
    /// The stored image.
    pub record: ImageRecord,
    /// Whether the package lists came from the cache (no `apt-get update`).
    pub cached_lists: bool,
    /// .deb files in the cache before the build.
    pub debs_before: usize,
    /// .deb files in the cache after it (more means some were downloaded).
    pub debs_after: usize,
    /// How long mmdebstrap ran (zero when the image came from the build cache).
    pub mmdebstrap_time: Duration,
    /// The same inputs were built before: the stored image was reused, mmdebstrap did not run.
    pub cached_image: bool,
}

fn valid_word(s: &str, extra: &[u8], max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || extra.contains(&b))
}

/// Checks an image name for a local build: lowercase `name[:tag]`, path-like segments allowed.
pub fn valid_image_name(name: &str) -> Result<String, OciError> {
    let bad = |reason: &str| {
        OciError::BadRequest {
        what: "image name",
        reason: format!("{name:?} {reason}"),
        fix: "use lowercase letters, digits, '.', '_', '-' and '/', optionally :TAG (e.g. py:bookworm)",
    }
    };
    let (repo, tag) = match name.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => (r, Some(t)),
        _ => (name, None),
    };
    if !repo.split('/').all(|seg| valid_word(seg, b"._-", 128)) {
        return Err(bad("is not a valid repository name"));
    }
    if let Some(t) = tag {
        if !t.is_empty()
            && t.len() <= 128
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Ok(name.to_string());
        }
        return Err(bad("has an invalid tag"));
    }
    Ok(format!("{name}:latest"))
}

/// Whether `s` can stand in an mmdebstrap hook or option unquoted: they are
/// split on whitespace, and quotes would change the shell's reading.
fn hook_safe(s: &str) -> bool {
    !s.bytes()
        .any(|b| b.is_ascii_whitespace() || b == b'\'' || b == b'"')
}

fn validate(opts: &DebianOptions) -> Result<String, OciError> {
    if !valid_word(&opts.suite, b"-", 32) {
        return Err(OciError::BadRequest {
            what: "--debian",
            reason: format!("{:?} is not a Debian suite name", opts.suite),
            fix: "name a suite such as bookworm, trixie or stable",
        });
    }
    if !valid_word(&opts.variant, b"-", 32) {
        return Err(OciError::BadRequest {
            what: "--variant",
            reason: format!("{:?} is not an mmdebstrap variant", opts.variant),
            fix: "use apt (default), minbase, essential, required, important or standard",
        });
    }
    if opts.packages.len() > MAX_PACKAGES {
        return Err(OciError::BadRequest {
            what: "--packages",
            reason: format!("{} packages (at most {MAX_PACKAGES})", opts.packages.len()),
            fix: "install fewer packages, or the rest from the image itself",
        });
    }
    for p in &opts.packages {
        if !valid_word(p, b"+.-:=~", 128) {
            return Err(OciError::BadRequest {
                what: "--packages",
                reason: format!("{p:?} is not a Debian package name"),
                fix: "use package names (lowercase, digits, + . -), optionally =VERSION, comma-separated",
            });
        }
    }
    let mirror = match &opts.mirror {
        Some(m) => m.clone(),
        None => host_mirror().unwrap_or_else(|| "http://deb.debian.org/debian".into()),
    };
    let ok_scheme = ["http://", "https://", "file:///"]
        .iter()
        .any(|s| mirror.starts_with(s));
    if !ok_scheme || mirror.len() > 512 || !hook_safe(&mirror) {
        return Err(OciError::BadRequest {
            what: "--mirror",
            reason: format!("{mirror:?} is not a plain http(s):// or file:/// URL"),
            fix: "pass a mirror URL such as http://deb.debian.org/debian",
        });
    }
    let cache = opts.cache_dir.to_string_lossy();
    if !hook_safe(&cache) || !opts.cache_dir.is_absolute() {
        return Err(OciError::BadRequest {
            what: "cache directory",
            reason: format!("{cache:?} must be absolute, without spaces or quotes (mmdebstrap hooks split on them)"),
            fix: "set XDG_CACHE_HOME to such a directory",
        });
    }
    Ok(mirror)
}

/// The host's Debian mirror from /etc/apt/sources.list(.d), if it names one.
pub fn host_mirror() -> Option<String> {
    let mut candidates = Vec::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for f in files.iter().take(64) {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines().take(10_000) {
            let line = line.trim();
            let urls: Vec<&str> = if let Some(rest) = line.strip_prefix("URIs:") {
                rest.split_whitespace().collect()
            } else if line.starts_with("deb ") {
                line.split_whitespace()
                    .skip(1)
                    .filter(|w| !w.starts_with('['))
                    .take(1)
                    .collect()
            } else {
                continue;
            };
            for u in urls {
                let u = u.trim_end_matches('/');
                if u.ends_with("/debian") && (u.starts_with("http://") || u.starts_with("https://"))
                {
                    candidates.push(u.to_string());
                }
            }
        }
    }
    candidates.into_iter().next()
}

fn count_debs(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".deb"))
                .count()
        })
        .unwrap_or(0)
}

fn lists_fresh(dir: &Path, max_age: Duration) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return false;
    };
    let mut newest = None;
    let mut has_release = false;
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.ends_with("Release") {
            has_release = true;
            if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                newest = newest.max(Some(t));
            }
        }
    }
    has_release
        && newest
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < max_age)
}

/// Identifies the package lists: a hash over their Release files (names and contents).
fn lists_fingerprint(dir: &Path) -> Option<String> {
    use sha2::Digest as _;
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with("Release"))
        .collect();
    if names.is_empty() {
        return None;
    }
    names.sort();
    let mut h = sha2::Sha256::new();
    for p in names.iter().take(64) {
        h.update(p.file_name()?.as_encoded_bytes());
        h.update(std::fs::read(p).ok()?);
    }
    Some(Digest::from_sha256(&h.finalize()).hex().to_string())
}

/// The build cache key: everything that decides the image's content.
fn build_key(opts: &DebianOptions, packages: &[String], mirror: &str, lists: &str) -> String {
    let mut k = serde_json::json!({
        "suite": opts.suite, "variant": opts.variant, "packages": packages,
        "mirror": mirror, "lists": lists, "v": 1,
    });
    // Only with a recipe, so the keys of earlier builds without one stay valid.
    if let Some(r) = opts.recipe {
        k["recipe"] = r.fingerprint().into();
    }
    Digest::of(k.to_string().as_bytes()).hex().to_string()
}

/// Adds a recipe's files and hooks to the mmdebstrap command: each file is written under
/// `work` and uploaded into the root once the packages are installed.
fn add_recipe(cmd: &mut Command, recipe: Recipe, work: &Path) -> Result<(), OciError> {
    let dir = work.join("recipe");
    std::fs::create_dir_all(&dir).map_err(|e| OciError::io("creating", &dir, e))?;
    let shown = dir.to_string_lossy();
    if !hook_safe(&shown) {
        return Err(OciError::BadRequest {
            what: "image store directory",
            reason: format!("{shown:?} has spaces or quotes (mmdebstrap hooks split on them)"),
            fix: "set CAPSA_IMAGE_STORE or XDG_CACHE_HOME to a path without them",
        });
    }
    for (i, f) in recipe.files().iter().enumerate() {
        let host = dir.join(format!("{i}"));
        std::fs::write(&host, f.contents).map_err(|e| OciError::io("writing", &host, e))?;
        let parent = Path::new(f.path)
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into());
        cmd.arg(format!("--customize-hook=mkdir -p \"$1{parent}\""))
            .arg(format!(
                "--customize-hook=upload {} {}",
                host.display(),
                f.path
            ))
            .arg(format!(
                "--customize-hook=chmod {:o} \"$1{}\"",
                f.mode, f.path
            ));
    }
    for h in recipe.hooks() {
        cmd.arg(format!("--customize-hook={h}"));
    }
    Ok(())
}

/// Builds a Debian root filesystem and stores it as image `name`, progress lines going to
/// `progress` (mmdebstrap's own `I:` lines).
pub fn build(
    store: &Store,
    name: &str,
    opts: &DebianOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<DebianBuild, OciError> {
    let name = valid_image_name(name)?;
    let mirror = validate(opts)?;
    let cache = opts.cache_dir.join(&opts.suite);
    let archives = cache.join("archives");
    let lists = cache.join("lists");
    std::fs::create_dir_all(&archives)
        .map_err(|e| OciError::io("creating the .deb cache", &archives, e))?;
    let debs_before = count_debs(&archives);
    let cached_lists = !opts.refresh && lists_fresh(&lists, opts.lists_max_age);
    // One package set, one command line: the order given does not change the image.
    let mut packages = opts.packages.clone();
    if let Some(r) = opts.recipe {
        packages.extend(r.packages().iter().map(|p| p.to_string()));
    }
    packages.sort();
    packages.dedup();
    let builds = cache.join("builds");
    if cached_lists && !opts.rebuild {
        if let Some(fp) = lists_fingerprint(&lists) {
            let key = build_key(opts, &packages, &mirror, &fp);
            let hit = std::fs::read_to_string(builds.join(&key))
                .ok()
                .and_then(|d| Digest::parse(d.trim()).ok())
                .and_then(|d| store.find_digest(&d).ok().flatten())
                .filter(|r| r.blob_digests().all(|d| store.has_blob(d)));
            if let Some(rec) = hit {
                let record = store.add_name(&rec, std::slice::from_ref(&name))?;
                tracing::info!(digest = %record.digest, "debian image reused: same inputs as an earlier build");
                let n = count_debs(&archives);
                return Ok(DebianBuild {
                    record,
                    cached_lists,
                    debs_before: n,
                    debs_after: n,
                    mmdebstrap_time: Duration::ZERO,
                    cached_image: true,
                });
            }
        }
    }

    let work = store.work_dir("debian-")?;
    let out = work.path().join("rootfs.tar");
    let new_lists = work.path().join("lists");
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg(format!("--variant={}", opts.variant))
        .arg("--mode=auto")
        .arg("--format=tar")
        .arg("--skip=output/dev")
        .arg("--skip=essential/unlink")
        .arg("--aptopt=Acquire::Languages \"none\"")
        .arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/ \"$1\"/var/lib/apt/lists/")
        .arg(format!(
            "--setup-hook=sync-in {} /var/cache/apt/archives/",
            archives.display()
        ));
    if cached_lists {
        cmd.arg(format!(
            "--setup-hook=sync-in {} /var/lib/apt/lists/",
            lists.display()
        ))
        .arg("--skip=update");
    }
    cmd.arg(format!(
        "--customize-hook=sync-out /var/cache/apt/archives {}",
        archives.display()
    ));
    if !cached_lists {
        std::fs::create_dir(&new_lists).map_err(|e| OciError::io("creating", &new_lists, e))?;
        cmd.arg(format!(
            "--customize-hook=sync-out /var/lib/apt/lists {}",
            new_lists.display()
        ));
    }
    if let Some(recipe) = opts.recipe {
        add_recipe(&mut cmd, recipe, work.path())?;
    }
    if !packages.is_empty() {
        cmd.arg(format!("--include={}", packages.join(",")));
    }
    cmd.arg(&opts.suite).arg(&out).arg(&mirror);
    // Fixed timestamps make the tar (and so the image digest) depend on the package set only.
    cmd.env(
        "SOURCE_DATE_EPOCH",
        crate::store::REPRODUCIBLE_TIME.to_string(),
    );
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    tracing::info!(suite = %opts.suite, packages = ?opts.packages, %mirror, cached_lists, "running mmdebstrap");
    let t0 = Instant::now();
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => OciError::ToolMissing {
            tool: "mmdebstrap",
            package: "mmdebstrap",
        },
        _ => OciError::io("starting", "mmdebstrap", e),
    })?;
    let mut tail = std::collections::VecDeque::new();
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).split(b'\n').map_while(Result::ok) {
            let line: String = String::from_utf8_lossy(&line).chars().take(500).collect();
            progress(&line);
            if tail.len() == STDERR_TAIL {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
    let status = child
        .wait()
        .map_err(|e| OciError::io("waiting for", "mmdebstrap", e))?;
    let mmdebstrap_time = t0.elapsed();
    if !status.success() {
        let mut stderr: Vec<String> = tail.into_iter().collect();
        if cached_lists {
            stderr.push(
                "(capsa used cached package lists: if a package is missing or 404s, pass --refresh)"
                    .into(),
            );
        }
        return Err(OciError::ToolFailed {
            tool: "mmdebstrap",
            status: status.to_string(),
            stderr: stderr.join("\n"),
        });
    }
    if !cached_lists {
        // Swap in the new lists only after a successful build.
        let old = cache.join("lists.old");
        let _ = std::fs::remove_dir_all(&old);
        let _ = std::fs::rename(&lists, &old);
        std::fs::rename(&new_lists, &lists)
            .map_err(|e| OciError::io("storing package lists", &lists, e))?;
        let _ = std::fs::remove_dir_all(&old);
    }
    let debs_after = count_debs(&archives);

    let (layer_digest, layer_size) = store.adopt_blob(&out)?;
    let mut env = vec![
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        "LANG=C.UTF-8".to_string(),
    ];
    if let Some(r) = opts.recipe {
        env.extend(r.env().iter().map(|e| e.to_string()));
    }
    let config = ConfigFile {
        architecture: "amd64".into(),
        os: "linux".into(),
        config: Some(ImageConfig {
            env: Some(env),
            cmd: Some(vec!["/bin/bash".into()]),
            ..Default::default()
        }),
        rootfs: Some(RootFs {
            kind: "layers".into(),
            diff_ids: vec![layer_digest.clone()],
        }),
    };
    let cbytes = serde_json::to_vec(&config)
        .map_err(|e| OciError::io("encoding config", "(config)", std::io::Error::other(e)))?;
    let (config_digest, config_size) = store.add_blob(&cbytes[..], None)?;
    let layer = Descriptor {
        media_type: MT_LAYER_TAR.into(),
        digest: layer_digest,
        size: layer_size,
        platform: None,
        annotations: BTreeMap::new(),
    };
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(MT_OCI_MANIFEST.into()),
        config: Descriptor {
            media_type: MT_OCI_CONFIG.into(),
            digest: config_digest.clone(),
            size: config_size,
            platform: None,
            annotations: BTreeMap::new(),
        },
        layers: vec![layer],
    };
    let mbytes = serde_json::to_vec(&manifest)
        .map_err(|e| OciError::io("encoding manifest", "(manifest)", std::io::Error::other(e)))?;
    let (digest, msize): (Digest, u64) = store.add_blob(&mbytes[..], None)?;
    let record = ImageRecord {
        digest,
        names: vec![name],
        config_digest,
        size: msize + config_size + layer_size,
        layers: manifest.layers,
        config: config.config.unwrap_or_default(),
        index_digests: Vec::new(),
    };
    store.save_record(&record)?;
    if let Some(fp) = lists_fingerprint(&lists) {
        let key = build_key(opts, &packages, &mirror, &fp);
        let _ = std::fs::create_dir_all(&builds);
        if let Err(e) = std::fs::write(builds.join(key), record.digest.as_str()) {
            tracing::warn!("cannot record the build in {}: {e}", builds.display());
        }
    }
    tracing::info!(digest = %record.digest, secs = mmdebstrap_time.as_secs_f64(), debs_before, debs_after, "debian image built");
    Ok(DebianBuild {
        record,
        cached_lists,
        debs_before,
        debs_after,
        mmdebstrap_time,
        cached_image: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_inputs_are_checked() {
        assert_eq!(valid_image_name("py").unwrap(), "py:latest");
        assert_eq!(valid_image_name("me/py:3.11").unwrap(), "me/py:3.11");
        assert!(valid_image_name("Py").is_err());
        assert!(valid_image_name("py:").is_err());
        assert!(valid_image_name("../x").is_err());
        let mut o = DebianOptions {
            suite: "bookworm".into(),
            packages: vec!["python3".into(), "g++".into(), "libc6=2.36-9".into()],
            variant: "apt".into(),
            mirror: Some("http://deb.debian.org/debian".into()),
            cache_dir: PathBuf::from("/tmp/c"),
            lists_max_age: Duration::from_secs(1),
            refresh: false,
            rebuild: false,
            recipe: None,
        };
        assert!(validate(&o).is_ok());
        o.packages.push("-oAPT::x=1".into());
        assert!(validate(&o).is_err());
        o.packages.pop();
        o.packages.push("a b".into());
        assert!(validate(&o).is_err());
        o.packages.pop();
        o.suite = "book worm".into();
        assert!(validate(&o).is_err());
        o.suite = "bookworm".into();
        o.mirror = Some("http://x/debian' --evil".into());
        assert!(validate(&o).is_err());
        o.mirror = Some("ftp://x".into());
        assert!(validate(&o).is_err());
        o.mirror = None;
        o.cache_dir = PathBuf::from("/tmp/with space");
        assert!(validate(&o).is_err());
    }

    #[test]
    fn recipes() {
        assert_eq!(Recipe::parse("desktop").unwrap(), Recipe::Desktop);
        let e = Recipe::parse("gnome").unwrap_err().to_string();
        assert!(e.contains("--recipe desktop"), "{e}");
        let d = Recipe::Desktop;
        assert!(d.packages().contains(&"xserver-xorg-core"));
        for p in d.packages() {
            assert!(valid_word(p, b"+.-:=~", 128), "{p}");
        }
        for f in d.files() {
            assert!(f.path.starts_with('/') && !f.path.contains(char::is_whitespace));
        }
        let script = d.files()[0].contents;
        assert!(script.starts_with("#!/bin/sh\n") && script.contains("Xorg"));
        assert_eq!(d.fingerprint(), d.fingerprint());
        let mut o = DebianOptions {
            suite: "bookworm".into(),
            packages: Vec::new(),
            variant: "apt".into(),
            mirror: None,
            cache_dir: PathBuf::from("/tmp/c"),
            lists_max_age: Duration::from_secs(1),
            refresh: false,
            rebuild: false,
            recipe: None,
        };
        let plain = build_key(&o, &[], "http://m/debian", "l");
        o.recipe = Some(d);
        assert_ne!(plain, build_key(&o, &[], "http://m/debian", "l"));
        let mut cmd = Command::new("true");
        let tmp = tempfile::tempdir().unwrap();
        add_recipe(&mut cmd, d, tmp.path()).unwrap();
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args
            .iter()
            .any(|a| a.ends_with(" /usr/local/bin/capsa-desktop") && a.contains("upload")));
        assert!(args.iter().any(|a| a.contains("chmod 755")));
        assert!(args.iter().any(|a| a.contains("fc-cache")));
        let uploaded = std::fs::read_to_string(tmp.path().join("recipe/0")).unwrap();
        assert_eq!(uploaded, script);
    }
}
