//! Finding a kernel (and its modules) for the guest.
//!
//! Order: explicit path; `CAPSA_KERNEL` (+ `CAPSA_MODULES`); a kernel fetched
//! earlier into the cache; the host's newest readable `/boot/vmlinuz-*` with
//! `/lib/modules/<version>`; the current Debian kernel package, fetched with
//! `apt-get download`. Debian's package holds ~390 MB of modules; only the
//! kernel, the modules bundles need (and a list of all the others, to fetch
//! them later on demand) are kept in the cache.

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::cache::{self, FileLock};
use crate::error::ImageError;
use crate::modules::{self, load_order, ModuleTree, TreeSource, DEFAULT_MODULES};
use crate::progress::Progress;
use crate::vmlinux;

/// Environment variable naming a kernel image to use.
pub const KERNEL_ENV: &str = "CAPSA_KERNEL";
/// Environment variable naming the module directory of that kernel.
pub const MODULES_ENV: &str = "CAPSA_MODULES";
/// The Debian metapackage that points at the current kernel.
pub const DEBIAN_KERNEL_METAPACKAGE: &str = "linux-image-amd64";
/// File in a cached kernel's module dir listing every module of the package.
const MODULES_ALL: &str = "modules.all";

/// Where a kernel came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum KernelSource {
    /// Passed explicitly (`--kernel PATH`, [`crate::BundleOptions::kernel`]).
    Explicit {
        /// The kernel file.
        path: PathBuf,
    },
    /// Named by `CAPSA_KERNEL`.
    Environment {
        /// The kernel file.
        path: PathBuf,
    },
    /// A Debian kernel fetched by an earlier build, from the cache.
    Cache {
        /// Debian package name.
        package: String,
        /// Debian package version.
        version: String,
    },
    /// The host's own kernel from `/boot`.
    Host {
        /// The kernel file.
        path: PathBuf,
    },
    /// Downloaded just now with `apt-get download`.
    Downloaded {
        /// Debian package name.
        package: String,
        /// Debian package version.
        version: String,
    },
}

impl fmt::Display for KernelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Explicit { path } => write!(f, "explicit {}", path.display()),
            Self::Environment { path } => write!(f, "{KERNEL_ENV}={}", path.display()),
            Self::Cache { package, version } => write!(f, "cached {package} {version}"),
            Self::Host { path } => write!(f, "host {}", path.display()),
            Self::Downloaded { package, version } => write!(f, "downloaded {package} {version}"),
        }
    }
}

/// A kernel image plus what is needed to build a bundle from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedKernel {
    /// The kernel file (bzImage, or an ELF vmlinux).
    pub image: PathBuf,
    /// Its module directory (`/lib/modules/<version>`), if it has one.
    pub modules_dir: Option<PathBuf>,
    /// The kernel release (`uname -r`).
    pub version: String,
    /// Where it came from.
    pub source: KernelSource,
    /// The kernel's build configuration (`/boot/config-<version>`), if known.
    pub config: Option<PathBuf>,
}

impl ResolvedKernel {
    /// Whether the kernel can load modules without their signatures: it has
    /// a known config that neither forces signatures nor forces lockdown.
    /// Unknown means no (keep the signatures).
    pub fn accepts_unsigned_modules(&self) -> bool {
        let Some(config) = &self.config else {
            return false;
        };
        let Ok(text) = std::fs::read_to_string(config) else {
            return false;
        };
        !text.lines().any(|l| {
            matches!(
                l.trim(),
                "CONFIG_MODULE_SIG_FORCE=y"
                    | "CONFIG_LOCK_DOWN_KERNEL_FORCE_INTEGRITY=y"
                    | "CONFIG_LOCK_DOWN_KERNEL_FORCE_CONFIDENTIALITY=y"
            )
        }) && text.lines().any(|l| l.starts_with("CONFIG_MODULES=y"))
    }
}

/// Finds a kernel along the resolution order, using the default cache directory.
pub fn resolve_kernel(
    explicit: Option<&Path>,
    progress: &Progress,
) -> Result<ResolvedKernel, ImageError> {
    resolve_kernel_in(None, explicit, progress)
}

/// [`resolve_kernel`] with an explicit cache directory (`None`: the default).
pub fn resolve_kernel_in(
    cache_dir: Option<&Path>,
    explicit: Option<&Path>,
    progress: &Progress,
) -> Result<ResolvedKernel, ImageError> {
    let cache = cache::cache_dir(cache_dir)?;
    resolve(&cache, explicit, &[], progress)
}

/// The resolution itself; `extra_modules` may make a cached Debian kernel be
/// fetched again to add modules it does not hold yet.
pub(crate) fn resolve(
    cache: &Path,
    explicit: Option<&Path>,
    extra_modules: &[String],
    progress: &Progress,
) -> Result<ResolvedKernel, ImageError> {
    if let Some(path) = explicit {
        return from_file(
            path,
            KernelSource::Explicit {
                path: path.to_path_buf(),
            },
        );
    }
    tracing::debug!("no explicit kernel");
    if let Some(path) = std::env::var_os(KERNEL_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
    {
        return from_file(&path, KernelSource::Environment { path: path.clone() });
    }
    tracing::debug!("{KERNEL_ENV} not set");

    let mut tried = vec![format!("no explicit kernel, {KERNEL_ENV} not set")];
    let kernels = cache.join("kernels");
    let wanted = wanted_modules(extra_modules);
    match cached_kernel(&kernels) {
        Some(k) => return with_modules(cache, k, &wanted, progress),
        None => {
            tracing::debug!("no kernel in {}", kernels.display());
            tried.push(format!("no kernel in {}", kernels.display()));
        }
    }
    match host_kernel() {
        Ok(k) => return Ok(k),
        Err(why) => {
            tracing::debug!("host kernel: {why}");
            tried.push(format!("host kernel: {why}"));
        }
    }
    match fetch_latest(cache, &wanted, progress) {
        Ok(k) => Ok(k),
        Err(why) => {
            tracing::debug!("apt-get download: {why}");
            tried.push(format!("Debian package {DEBIAN_KERNEL_METAPACKAGE}: {why}"));
            Err(ImageError::KernelNotFound { tried })
        }
    }
}

/// Default modules plus the requested ones, normalized and without duplicates.
pub(crate) fn wanted_modules(extra: &[String]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    DEFAULT_MODULES
        .iter()
        .chain(modules::DISPLAY_MODULES)
        .map(|s| s.to_string())
        .chain(extra.iter().cloned())
        .map(|m| modules::normalize(&m))
        .filter(|m| !m.is_empty() && seen.insert(m.clone()))
        .collect()
}

/// A kernel named by path: its release from the image (or file name), its
/// modules from `CAPSA_MODULES`, a sibling `lib/modules`, or `/lib/modules`.
fn from_file(path: &Path, source: KernelSource) -> Result<ResolvedKernel, ImageError> {
    let bad = |reason: String| ImageError::BadKernel {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut head = Vec::new();
    (&mut file)
        .take(64 * 1024)
        .read_to_end(&mut head)
        .map_err(|e| bad(e.to_string()))?;
    let mut release = vmlinux::kernel_release(&head);
    if release.is_none() && crate::elf::is_elf(&head) {
        let whole = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        release = vmlinux::kernel_release(&whole);
    }
    if !crate::elf::is_elf(&head) && head.get(0x202..0x206) != Some(b"HdrS") {
        return Err(bad(
            "neither a bzImage (no HdrS setup header) nor an ELF file".into(),
        ));
    }
    let release = release
        .or_else(|| {
            let name = path.file_name()?.to_str()?;
            let r = name
                .strip_prefix("vmlinuz-")
                .or_else(|| name.strip_prefix("vmlinux-"))?;
            Some(r.to_string())
        })
        .ok_or_else(|| {
            bad("cannot find the kernel release in the image or its file name".into())
        })?;
    let modules_dir = modules_dir_for(path, &release);
    match &modules_dir {
        Some(d) => tracing::debug!("modules of {release}: {}", d.display()),
        None => tracing::warn!(
            "no module directory for kernel {release} (set {MODULES_ENV}); the guest gets built-in drivers only"
        ),
    }
    let config = [
        path.with_file_name(format!("config-{release}")),
        PathBuf::from(format!("/boot/config-{release}")),
    ]
    .into_iter()
    .find(|p| p.is_file());
    Ok(ResolvedKernel {
        image: path.to_path_buf(),
        modules_dir,
        version: release,
        source,
        config,
    })
}

fn modules_dir_for(kernel: &Path, release: &str) -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(MODULES_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
    {
        let versioned = dir.join(release);
        return Some(if versioned.is_dir() { versioned } else { dir });
    }
    // An unpacked package: <root>/boot/vmlinuz-R next to <root>/lib/modules/R.
    let sibling = kernel.parent()?.join("../lib/modules").join(release);
    if sibling.is_dir() {
        return Some(sibling);
    }
    let system = Path::new("/lib/modules").join(release);
    system.is_dir().then_some(system)
}

/// The host's newest readable `/boot/vmlinuz-<v>` that has `/lib/modules/<v>`.
fn host_kernel() -> Result<ResolvedKernel, String> {
    let entries = std::fs::read_dir("/boot").map_err(|e| format!("/boot: {e}"))?;
    let mut candidates: Vec<(String, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let v = name.strip_prefix("vmlinuz-")?.to_string();
            Some((v, e.path()))
        })
        .collect();
    if candidates.is_empty() {
        return Err("no /boot/vmlinuz-*".into());
    }
    candidates.sort_by(|a, b| version_cmp(&b.0, &a.0));
    let mut why = Vec::new();
    for (version, path) in candidates {
        let modules = Path::new("/lib/modules").join(&version);
        if let Err(e) = std::fs::File::open(&path) {
            why.push(format!("{}: {e}", path.display()));
            continue;
        }
        if !modules.is_dir() {
            why.push(format!("{} missing", modules.display()));
            continue;
        }
        tracing::debug!("using host kernel {}", path.display());
        return Ok(ResolvedKernel {
            image: path.clone(),
            modules_dir: Some(modules),
            config: Some(PathBuf::from(format!("/boot/config-{version}"))).filter(|p| p.is_file()),
            version,
            source: KernelSource::Host { path },
        });
    }
    Err(why.join(", "))
}

/// Compares version strings piecewise, numbers numerically (`6.10` > `6.9`).
pub(crate) fn version_cmp(a: &str, b: &str) -> Ordering {
    fn pieces(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let b = s.as_bytes();
        for i in 1..=b.len() {
            if i == b.len() || b[i].is_ascii_digit() != b[start].is_ascii_digit() {
                out.push((b[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (pa, pb) = (pieces(a), pieces(b));
    for (x, y) in pa.iter().zip(pb.iter()) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    pa.len().cmp(&pb.len())
}

/// What the cache records about a fetched kernel (`kernel.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CachedKernel {
    package: String,
    version: String,
    release: String,
    fetched: SystemTime,
    #[serde(skip)]
    dir: PathBuf,
}

impl CachedKernel {
    fn modules_dir(&self) -> PathBuf {
        self.dir.join("modules").join(&self.release)
    }

    fn resolved(&self, source: KernelSource) -> ResolvedKernel {
        ResolvedKernel {
            image: self.dir.join("vmlinuz"),
            modules_dir: Some(self.modules_dir()),
            config: Some(self.dir.join("config")).filter(|p| p.is_file()),
            version: self.release.clone(),
            source,
        }
    }
}

/// The most recently fetched complete kernel in `<cache>/kernels`.
fn cached_kernel(kernels: &Path) -> Option<CachedKernel> {
    let mut best: Option<CachedKernel> = None;
    for entry in std::fs::read_dir(kernels).ok()?.filter_map(Result::ok) {
        let dir = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let manifest = dir.join("kernel.json");
        let parsed = std::fs::read(&manifest)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<CachedKernel>(&b).map_err(|e| e.to_string()));
        match parsed {
            Ok(mut k) if dir.join("vmlinuz").is_file() => {
                k.dir = dir;
                if best.as_ref().map_or(true, |b| k.fetched > b.fetched) {
                    best = Some(k);
                }
            }
            Ok(_) => tracing::debug!("{}: no vmlinuz; ignoring", dir.display()),
            Err(e) => tracing::debug!("{}: {e}; ignoring", manifest.display()),
        }
    }
    best
}

/// A cached kernel, fetched again first if `wanted` names modules the
/// package has but the cache does not keep yet.
fn with_modules(
    cache: &Path,
    k: CachedKernel,
    wanted: &[String],
    progress: &Progress,
) -> Result<ResolvedKernel, ImageError> {
    let source = KernelSource::Cache {
        package: k.package.clone(),
        version: k.version.clone(),
    };
    let tree = ModuleTree::scan(&k.modules_dir())?;
    let all: BTreeSet<String> = std::fs::read_to_string(k.modules_dir().join(MODULES_ALL))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .filter_map(modules::module_file_name)
        .map(|(n, _)| n)
        .collect();
    let absent: Vec<&String> = wanted
        .iter()
        .filter(|m| tree.path_of(m).is_none() && !tree.is_builtin(m) && all.contains(*m))
        .collect();
    if absent.is_empty() {
        tracing::debug!("using cached kernel {} ({})", k.release, k.dir.display());
        return Ok(k.resolved(source));
    }
    tracing::debug!("cached kernel lacks modules {absent:?}; fetching its package again");
    let kernels = cache.join("kernels");
    let _lock = FileLock::exclusive(&kernels.join(".lock"))?;
    // Keep what the cache already holds, so other bundles keep their modules.
    let mut keep: Vec<String> = wanted.to_vec();
    keep.extend(cached_module_names(&tree));
    fetch(cache, Some((&k.package, &k.version)), &keep, progress).map_err(|detail| {
        ImageError::Apt {
            step: format!("re-fetching {} {}", k.package, k.version),
            detail,
        }
    })
}

fn cached_module_names(tree: &ModuleTree) -> Vec<String> {
    let mut names = Vec::new();
    let mut stack = vec![tree.root.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
        {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some((n, _)) = e.file_name().to_str().and_then(modules::module_file_name)
            {
                names.push(n);
            }
        }
    }
    names
}

/// Fetches the current Debian kernel unless another process did while we
/// waited for the lock.
fn fetch_latest(
    cache: &Path,
    wanted: &[String],
    progress: &Progress,
) -> Result<ResolvedKernel, String> {
    if std::env::consts::ARCH != "x86_64" {
        return Err(format!(
            "only x86_64 hosts can fetch the amd64 kernel (this is {})",
            std::env::consts::ARCH
        ));
    }
    let kernels = cache.join("kernels");
    std::fs::create_dir_all(&kernels).map_err(|e| format!("{}: {e}", kernels.display()))?;
    let _lock = FileLock::exclusive(&kernels.join(".lock")).map_err(|e| e.to_string())?;
    if let Some(k) = cached_kernel(&kernels) {
        tracing::debug!("another build fetched {} meanwhile", k.release);
        return Ok(k.resolved(KernelSource::Cache {
            package: k.package.clone(),
            version: k.version.clone(),
        }));
    }
    fetch(cache, None, wanted, progress)
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            format!("`{program}` not found (not a Debian/Ubuntu host?)")
        }
        _ => format!("cannot run `{program}`: {e}"),
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let msg: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.starts_with("W: "))
            .take(10)
            .collect();
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        return Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            msg.join(" / ")
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `linux-image-amd64` -> `linux-image-<abi>-amd64` via `apt-cache depends`.
fn concrete_package() -> Result<String, String> {
    let out = run(Command::new("apt-cache").args(["depends", DEBIAN_KERNEL_METAPACKAGE]))?;
    parse_depends(&out).ok_or_else(|| {
        format!("`apt-cache depends {DEBIAN_KERNEL_METAPACKAGE}` names no linux-image package (is the apt index current?)")
    })
}

/// The first `Depends: linux-image-*` line of `apt-cache depends` output.
pub(crate) fn parse_depends(out: &str) -> Option<String> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(|p| p.trim().trim_start_matches('<').trim_end_matches('>'))
        .find(|p| {
            p.starts_with("linux-image-")
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.+".contains(&b))
        })
        .map(str::to_string)
}

/// Downloads and unpacks a kernel package and keeps the kernel plus the
/// closure of `wanted` modules in `<cache>/kernels/<package>_<version>`.
/// Must run under the kernels lock.
fn fetch(
    cache: &Path,
    pin: Option<(&str, &str)>,
    wanted: &[String],
    progress: &Progress,
) -> Result<ResolvedKernel, String> {
    let kernels = cache.join("kernels");
    std::fs::create_dir_all(&kernels).map_err(|e| format!("{}: {e}", kernels.display()))?;
    let io = |what: &Path| {
        let what = what.display().to_string();
        move |e: std::io::Error| format!("{what}: {e}")
    };
    let package_arg = match pin {
        Some((p, v)) => format!("{p}={v}"),
        None => concrete_package()?,
    };
    // Under the kernels lock: any other .fetch-* dir is a crashed fetch (~400 MB).
    for e in std::fs::read_dir(&kernels)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
    {
        if e.file_name().to_string_lossy().starts_with(".fetch-") {
            tracing::debug!("removing leftover {}", e.path().display());
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let work = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(&kernels)
        .map_err(io(&kernels))?;
    let download = work.path().join("download");
    std::fs::create_dir(&download).map_err(io(&download))?;

    let step = progress.spinner(format!("Downloading {package_arg}"));
    run(Command::new("apt-get")
        .args(["download", "-q"])
        .arg(&package_arg)
        .current_dir(&download))?;
    let deb = std::fs::read_dir(&download)
        .map_err(io(&download))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| format!("apt-get download {package_arg} produced no .deb"))?;
    let fields = run(Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&deb)
        .args(["Package", "Version"]))?;
    let field = |name: &str| {
        fields
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("{} has no {name} field", deb.display()))
    };
    let (package, version) = (field("Package")?, field("Version")?);

    step.set_message(format!("Unpacking {package} {version}"));
    let root = work.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    std::fs::remove_file(&deb).map_err(io(&deb))?;

    let boot = root.join("boot");
    let mut vmlinuz: Vec<(String, PathBuf)> = std::fs::read_dir(&boot)
        .map_err(io(&boot))?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let r = e
                .file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")?
                .to_string();
            Some((r, e.path()))
        })
        .collect();
    vmlinuz.sort_by(|a, b| version_cmp(&b.0, &a.0));
    let (release, image) = vmlinuz
        .into_iter()
        .next()
        .ok_or_else(|| format!("{package} contains no /boot/vmlinuz-*"))?;

    step.set_message(format!("Selecting modules of {release}"));
    let src_modules = root.join("lib/modules").join(&release);
    let stage = work.path().join("kernel");
    let dst_modules = stage.join("modules").join(&release);
    std::fs::create_dir_all(&dst_modules).map_err(io(&dst_modules))?;
    std::fs::copy(&image, stage.join("vmlinuz")).map_err(io(&image))?;
    let config = boot.join(format!("config-{release}"));
    if config.is_file() {
        std::fs::copy(&config, stage.join("config")).map_err(io(&config))?;
    }
    let mut kept = 0;
    if src_modules.is_dir() {
        let tree = ModuleTree::scan(&src_modules).map_err(|e| e.to_string())?;
        let mut source = TreeSource::new(&tree);
        let plan = load_order(wanted, &mut source).map_err(|e| e.to_string())?;
        // Wanted modules left out of the plan (a dependency is missing) are
        // kept too, so the cache is not re-fetched for them on every build.
        let names: BTreeSet<&String> = plan.order.iter().chain(wanted).collect();
        for name in names {
            let Some(rel) = tree.path_of(name) else {
                continue;
            };
            let to = dst_modules.join(rel);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            std::fs::copy(src_modules.join(rel), &to).map_err(io(&to))?;
            kept += 1;
        }
        for f in [
            "modules.builtin",
            "modules.builtin.modinfo",
            "modules.order",
        ] {
            let from = src_modules.join(f);
            if from.is_file() {
                std::fs::copy(&from, dst_modules.join(f)).map_err(io(&from))?;
            }
        }
        let mut all: Vec<String> = tree_paths(&src_modules);
        all.sort();
        std::fs::write(dst_modules.join(MODULES_ALL), all.join("\n") + "\n")
            .map_err(io(&dst_modules))?;
        tracing::debug!("kept {kept} of {} modules of {release}", tree.len());
    }
    let meta = CachedKernel {
        package: package.clone(),
        version: version.clone(),
        release: release.clone(),
        fetched: SystemTime::now(),
        dir: PathBuf::new(),
    };
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| e.to_string())?;
    std::fs::write(stage.join("kernel.json"), json).map_err(io(&stage))?;

    let dest = kernels.join(sanitize(&format!("{package}_{version}")));
    if dest.exists() {
        // Re-fetch adding modules: move the old copy into the work dir (deleted with it).
        std::fs::rename(&dest, work.path().join("old")).map_err(io(&dest))?;
    }
    std::fs::rename(&stage, &dest).map_err(io(&dest))?;
    step.finish(format!("Fetched {package} {version} ({kept} modules kept)"));
    tracing::info!(
        "fetched Debian kernel {package} {version} into {}",
        dest.display()
    );
    let source = KernelSource::Downloaded { package, version };
    Ok(ResolvedKernel {
        image: dest.join("vmlinuz"),
        modules_dir: Some(dest.join("modules").join(&release)),
        config: Some(dest.join("config")).filter(|p| p.is_file()),
        version: release,
        source,
    })
}

/// Every module path of a tree (relative), for `modules.all`.
fn tree_paths(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        for e in std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
        {
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let child = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push((e.path(), child)),
                Ok(t) if t.is_file() && modules::module_file_name(&name).is_some() => {
                    out.push(child)
                }
                _ => {}
            }
        }
    }
    out
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._+-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_naturally() {
        let mut v = vec![
            "6.1.0-9-amd64",
            "6.10.0-1-amd64",
            "6.1.0-10-amd64",
            "5.19.0-1-amd64",
        ];
        v.sort_by(|a, b| version_cmp(a, b));
        assert_eq!(
            v,
            [
                "5.19.0-1-amd64",
                "6.1.0-9-amd64",
                "6.1.0-10-amd64",
                "6.10.0-1-amd64"
            ]
        );
        assert_eq!(version_cmp("", ""), Ordering::Equal);
        assert_eq!(version_cmp("a", ""), Ordering::Greater);
    }

    #[test]
    fn apt_cache_depends_output() {
        let out =
            "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n  Recommends: firmware\n";
        assert_eq!(
            parse_depends(out).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(
            parse_depends("linux-image-amd64\n  Depends: <linux-image-6.12.9-amd64>\n").as_deref(),
            Some("linux-image-6.12.9-amd64")
        );
        assert_eq!(parse_depends("x\n  Depends: libc6\n"), None);
        assert_eq!(parse_depends("  Depends: linux-image-$(rm -rf)\n"), None);
    }

    #[test]
    fn wanted_modules_are_normalized_and_unique() {
        let w = wanted_modules(&["virtio-blk".into(), "nbd".into(), "nbd".into()]);
        assert_eq!(w.iter().filter(|m| *m == "virtio_blk").count(), 1);
        assert_eq!(w.last().map(String::as_str), Some("nbd"));
    }

    #[test]
    fn explicit_kernel_release_and_modules() {
        use crate::vmlinux::{tests::fake_bzimage, Compression};
        let dir = tempfile::tempdir().unwrap();
        let boot = dir.path().join("boot");
        std::fs::create_dir_all(&boot).unwrap();
        std::fs::create_dir_all(dir.path().join("lib/modules/6.6.6-test")).unwrap();
        let k = boot.join("vmlinuz-whatever");
        std::fs::write(
            &k,
            fake_bzimage(
                Compression::Gzip,
                &crate::elf::build::fake_vmlinux(true),
                true,
            ),
        )
        .unwrap();
        let r = from_file(&k, KernelSource::Explicit { path: k.clone() }).unwrap();
        assert_eq!(r.version, "6.6.6-test");
        assert!(r.modules_dir.unwrap().ends_with("lib/modules/6.6.6-test"));
        std::fs::write(&k, b"definitely not a kernel").unwrap();
        let e = from_file(&k, KernelSource::Explicit { path: k.clone() }).unwrap_err();
        assert!(e.to_string().contains("fix:"), "{e}");
        let e = from_file(
            &dir.path().join("missing"),
            KernelSource::Explicit { path: k.clone() },
        )
        .unwrap_err();
        assert!(matches!(e, ImageError::BadKernel { .. }));
    }
}
