//! Building, listing and removing cached bundles.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cache::{self, FileLock};
use crate::error::ImageError;
use crate::initramfs::{self, Contents, GuestFile, GuestModule, InitrdCompression};
use crate::kernel::{self, KernelSource, ResolvedKernel};
use crate::modules::{self, load_order, Lookup, ModuleSource, ModuleTree, TreeSource};
use crate::progress::Progress;
use crate::vmlinux::{self, KernelFormat};

/// Bumped whenever the bundle layout or the initramfs contents change in a
/// way the inputs do not capture, so old cache entries are not reused.
const FORMAT_VERSION: u32 = 1;
/// Length of a bundle id (hex digits of the content sha256).
pub const ID_LEN: usize = 16;
/// Name of the initramfs inside a bundle directory.
pub const INITRD_FILE: &str = "initrd.img";
/// Name of the manifest inside a bundle directory.
pub const MANIFEST_FILE: &str = "bundle.json";

/// A host file to place into the guest's initramfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtraFile {
    /// File on the host (symlinks are followed; must be a regular file).
    pub host: PathBuf,
    /// Absolute path in the guest (not `/init`; parents are created as needed).
    pub guest: String,
    /// Permission bits in the guest (e.g. `0o755`).
    pub mode: u32,
}

impl ExtraFile {
    /// A file for `guest` with the given permission bits.
    pub fn new(host: impl Into<PathBuf>, guest: impl Into<String>, mode: u32) -> Self {
        Self {
            host: host.into(),
            guest: guest.into(),
            mode,
        }
    }
}

/// What to build a bundle from. `Default` gives the default bundle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundleOptions {
    /// Kernel image to use instead of the resolution order (see [`crate::resolve_kernel`]).
    pub kernel: Option<PathBuf>,
    /// Modules to include on top of [`crate::DEFAULT_MODULES`] (with their
    /// dependencies); each must exist as a module or be built in.
    pub extra_modules: Vec<String>,
    /// Files to add to the initramfs.
    pub extra_files: Vec<ExtraFile>,
    /// Cache directory; `None` means `$XDG_CACHE_HOME/capsa` or `~/.cache/capsa`.
    pub cache_dir: Option<PathBuf>,
    /// Compression of the initramfs (gzip unless set).
    pub initrd_compression: InitrdCompression,
}

/// A built guest bundle: a kernel and an initramfs in one cache directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// Content id (hex prefix of the sha256 over every input).
    pub id: String,
    /// The bundle's directory.
    pub dir: PathBuf,
    /// The kernel to boot (`-kernel`).
    pub kernel: PathBuf,
    /// The initramfs (`-initrd`).
    pub initrd: PathBuf,
    /// Kernel release (`uname -r` in the guest).
    pub kernel_version: String,
    /// Where the kernel came from when the bundle was built.
    pub kernel_source: KernelSource,
    /// Whether `kernel` is a PVH ELF (fast boot) or a bzImage.
    pub kernel_format: KernelFormat,
    /// Modules in the initramfs, in load order.
    pub modules: Vec<String>,
    /// When the bundle was built.
    pub created: SystemTime,
    /// Bytes on disk (kernel + initramfs + manifest).
    pub size_bytes: u64,
}

/// `bundle.json`: what is not derivable from the directory itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    id: String,
    kernel_version: String,
    kernel_source: KernelSource,
    kernel_format: KernelFormat,
    modules: Vec<String>,
    created: SystemTime,
    init_sha256: String,
    busybox: PathBuf,
    extra_files: Vec<ExtraFile>,
    #[serde(default)]
    initrd_compression: InitrdCompression,
}

/// Builds the bundle for `opts`, or returns the cached one with the same content id.
pub fn build(opts: &BundleOptions, progress: &Progress) -> Result<Bundle, ImageError> {
    let start = Instant::now();
    let cache = cache::cache_dir(opts.cache_dir.as_deref())?;
    let bundles = cache.join("bundles");
    cache::mkdirs(&bundles)?;

    let kernel = kernel::resolve(
        &cache,
        opts.kernel.as_deref(),
        &opts.extra_modules,
        progress,
    )?;
    let kernel_sha =
        cache::file_sha256(&cache, &kernel.image).map_err(|e| ImageError::BadKernel {
            path: kernel.image.clone(),
            reason: e.to_string(),
        })?;
    let modules = plan_modules(&cache, &kernel, &opts.extra_modules)?;
    let (init, init_sha, init_origin) = init_binary(&cache)?;
    let busybox = initramfs::find_busybox()?;
    let busybox_sha =
        cache::file_sha256(&cache, &busybox.path).map_err(|e| ImageError::Busybox {
            reason: format!("cannot read {}: {e}", busybox.path.display()),
        })?;
    let extra = read_extra_files(&opts.extra_files)?;

    let id = content_id(
        &kernel_sha,
        &kernel.version,
        &modules,
        &init_sha,
        &busybox_sha,
        &extra,
        opts.initrd_compression,
    );
    let dir = bundles.join(&id);
    if let Ok(Some(b)) = load(&dir) {
        tracing::debug!("bundle {id} is cached ({:?})", start.elapsed());
        return Ok(b);
    }
    let _lock = FileLock::exclusive(&bundles.join(format!(".{id}.lock")))?;
    match load(&dir) {
        Ok(Some(b)) => {
            tracing::debug!("bundle {id} was built by another builder meanwhile");
            return Ok(b);
        }
        Ok(None) => {}
        Err(e) => tracing::warn!("rebuilding damaged bundle {id}: {e}"),
    }
    // Holding the id's lock: leftovers of this id (an old format, a damaged
    // copy, a crashed build) belong to no one else.
    discard_leftovers(&bundles, &id, &dir)?;

    let step = progress.spinner(format!("Building guest bundle {id}"));
    let work = tempfile::Builder::new()
        .prefix(&format!(".build-{id}-"))
        .tempdir_in(&bundles)
        .map_err(|e| ImageError::cache(&bundles, e))?;

    step.set_message("Preparing the kernel");
    let format = place_kernel(&cache, &kernel, &kernel_sha, work.path())?;

    step.set_message("Writing the initramfs");
    let guest_modules: Vec<GuestModule> = modules.iter().map(|m| m.guest.clone()).collect();
    let contents = Contents {
        init: &init,
        busybox: &busybox,
        release: &kernel.version,
        modules: &guest_modules,
        extra_files: &extra,
    };
    let tree = initramfs::tree(&contents)?;
    let initrd = work.path().join(INITRD_FILE);
    let t = Instant::now();
    initramfs::write(&tree, &initrd, opts.initrd_compression)
        .map_err(|e| ImageError::cache(&initrd, e))?;
    tracing::debug!("initramfs written in {:?}", t.elapsed());

    let manifest = Manifest {
        format: FORMAT_VERSION,
        id: id.clone(),
        kernel_version: kernel.version.clone(),
        kernel_source: kernel.source.clone(),
        kernel_format: format,
        modules: modules.iter().map(|m| m.guest.name.clone()).collect(),
        created: SystemTime::now(),
        init_sha256: init_sha.clone(),
        busybox: busybox.path.clone(),
        extra_files: opts.extra_files.clone(),
        initrd_compression: opts.initrd_compression,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| ImageError::Manifest {
        path: work.path().join(MANIFEST_FILE),
        reason: e.to_string(),
    })?;
    let mpath = work.path().join(MANIFEST_FILE);
    std::fs::write(&mpath, json).map_err(|e| ImageError::cache(&mpath, e))?;

    let staged = work.keep();
    if let Err(e) = std::fs::rename(&staged, &dir) {
        let _ = std::fs::remove_dir_all(&staged);
        // Someone without our lock (an older capsa) may have won the race.
        if let Some(b) = load(&dir)? {
            return Ok(b);
        }
        return Err(ImageError::cache(&dir, e));
    }
    let bundle = load(&dir)?.ok_or_else(|| ImageError::Manifest {
        path: dir.join(MANIFEST_FILE),
        reason: "vanished right after being written".into(),
    })?;
    step.finish(format!(
        "Built guest bundle {id} in {:.1?}",
        start.elapsed()
    ));
    tracing::info!(
        "built bundle {id} ({}, {} modules, init from {init_origin}) in {:?}",
        kernel.version,
        bundle.modules.len(),
        start.elapsed()
    );
    Ok(bundle)
}

/// A module chosen for the bundle, with the hash of its source file.
#[derive(Debug)]
struct Planned {
    guest: GuestModule,
    /// sha256 of the module file as found (memoized), plus how it was changed.
    sha256: String,
}

/// Orders the default and extra modules; extras that cannot be honoured are errors.
fn plan_modules(
    cache: &Path,
    kernel: &ResolvedKernel,
    extra: &[String],
) -> Result<Vec<Planned>, ImageError> {
    let wanted = kernel::wanted_modules(extra);
    let extra: Vec<String> = extra
        .iter()
        .map(|m| modules::normalize(m))
        .filter(|m| !m.is_empty())
        .collect();
    let Some(dir) = &kernel.modules_dir else {
        if let Some(name) = extra.first() {
            return Err(ImageError::ModuleNotFound {
                name: name.clone(),
                kernel_version: kernel.version.clone(),
                no_tree: true,
            });
        }
        return Ok(Vec::new());
    };
    let tree = ModuleTree::scan(dir)?;
    let mut source = TreeSource::new(&tree);
    let plan = load_order(&wanted, &mut source)?;
    for (name, needed_by) in &plan.missing {
        match needed_by {
            None if extra.contains(name) => {
                return Err(ImageError::ModuleNotFound {
                    name: name.clone(),
                    kernel_version: kernel.version.clone(),
                    no_tree: false,
                })
            }
            None => tracing::debug!(
                "default module {name} not available for {}; skipped",
                kernel.version
            ),
            Some(by) => tracing::debug!("module {by} needs {name}, which is missing; {by} skipped"),
        }
    }
    for name in &extra {
        if !plan.order.contains(name) && !plan.builtin.contains(name) {
            return Err(ImageError::BadModule {
                path: tree
                    .path_of(name)
                    .map(|r| dir.join(r))
                    .unwrap_or_else(|| dir.clone()),
                reason: format!("{name} needs a module this kernel does not have"),
            });
        }
    }
    let rel_of: HashMap<String, String> = plan
        .order
        .iter()
        .filter_map(|n| {
            source
                .loaded
                .get(n)
                .map(|(rel, _)| (n.clone(), modules::decompressed_rel_path(rel)))
        })
        .collect();
    let strip = kernel.accepts_unsigned_modules();
    tracing::debug!(
        "module signatures: {}",
        if strip { "stripped" } else { "kept" }
    );
    let mut out = Vec::with_capacity(plan.order.len());
    for name in &plan.order {
        let depends = match source.lookup(name)? {
            Lookup::Module(info) => info
                .depends
                .iter()
                .filter_map(|d| rel_of.get(d).cloned())
                .collect(),
            _ => Vec::new(),
        };
        let Some((src_rel, mut data)) = source.loaded.remove(name) else {
            continue;
        };
        let src = dir.join(&src_rel);
        let file_sha = cache::file_sha256(cache, &src).map_err(|e| ImageError::BadModule {
            path: src.clone(),
            reason: e.to_string(),
        })?;
        let sha256 = if strip && modules::strip_signature(&mut data) {
            format!("{file_sha}-unsigned")
        } else {
            file_sha
        };
        let Some(rel) = rel_of.get(name).cloned() else {
            continue;
        };
        out.push(Planned {
            guest: GuestModule {
                name: name.clone(),
                rel,
                data,
                depends,
            },
            sha256,
        });
    }
    Ok(out)
}

/// The guest init (bytes, sha256, origin): `CAPSA_GUEST_INIT` if set, else
/// the embedded binary (hashed once per process).
fn init_binary(cache: &Path) -> Result<(Vec<u8>, String, String), ImageError> {
    static EMBEDDED_SHA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    match capsa_guest_bin::init_binary_override() {
        Some(path) => {
            let bad = |reason: String| ImageError::InitBinary {
                path: path.clone(),
                reason,
            };
            let data = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
            initramfs::check_static(&data).map_err(|why| bad(format!("it {why}")))?;
            let sha = cache::file_sha256(cache, &path).map_err(|e| bad(e.to_string()))?;
            Ok((data, sha, path.display().to_string()))
        }
        None => {
            let data = capsa_guest_bin::init_binary();
            let sha = EMBEDDED_SHA
                .get_or_init(|| cache::sha256_hex(&data))
                .clone();
            Ok((data.into_owned(), sha, "embedded binary".into()))
        }
    }
}

fn read_extra_files(files: &[ExtraFile]) -> Result<Vec<GuestFile>, ImageError> {
    files
        .iter()
        .map(|f| {
            let err = |reason: String| ImageError::ExtraFile {
                host: f.host.clone(),
                guest: f.guest.clone(),
                reason,
            };
            if !f.guest.starts_with('/') {
                return Err(err("guest path is not absolute".into()));
            }
            let path = crate::cpio::archive_path(&f.guest).map_err(|e| err(e.to_string()))?;
            if path == "init" {
                return Err(err("/init is capsa-init".into()));
            }
            let meta = std::fs::metadata(&f.host).map_err(|e| err(e.to_string()))?;
            if !meta.is_file() {
                return Err(err("not a regular file".into()));
            }
            let data = std::fs::read(&f.host).map_err(|e| err(e.to_string()))?;
            Ok(GuestFile {
                host: f.host.clone(),
                path: format!("/{path}"),
                mode: f.mode & 0o7777,
                data,
            })
        })
        .collect()
}

fn content_id(
    kernel_sha: &str,
    release: &str,
    modules: &[Planned],
    init_sha: &str,
    busybox_sha: &str,
    extra: &[GuestFile],
    compression: InitrdCompression,
) -> String {
    let mut h = Sha256::new();
    let mut field = |name: &str, value: &[u8]| {
        // Length-prefixed so that no two input lists hash alike.
        h.update(name.as_bytes());
        h.update((value.len() as u64).to_le_bytes());
        h.update(value);
    };
    field("format", &FORMAT_VERSION.to_le_bytes());
    field("capsa-image", env!("CARGO_PKG_VERSION").as_bytes());
    field("kernel", kernel_sha.as_bytes());
    field("release", release.as_bytes());
    for m in modules {
        field("module", m.guest.rel.as_bytes());
        field("module-sha256", m.sha256.as_bytes());
        field("module-deps", m.guest.depends.join(",").as_bytes());
    }
    field("init", init_sha.as_bytes());
    field("busybox", busybox_sha.as_bytes());
    for f in extra {
        field("extra", f.path.as_bytes());
        field("extra-mode", &f.mode.to_le_bytes());
        field("extra-sha256", cache::sha256_hex(&f.data).as_bytes());
    }
    if compression != InitrdCompression::Gzip {
        // Only added when not the default, so gzip ids stay what they were.
        field("initrd-compression", format!("{compression:?}").as_bytes());
    }
    cache::hex(&h.finalize())[..ID_LEN].to_string()
}

/// Puts the kernel into `dir`: the extracted PVH vmlinux (from the shared
/// `<cache>/vmlinux` store, extracted once per kernel) or else the bzImage.
fn place_kernel(
    cache: &Path,
    kernel: &ResolvedKernel,
    sha: &str,
    dir: &Path,
) -> Result<KernelFormat, ImageError> {
    let store = cache.join("vmlinux");
    cache::mkdirs(&store)?;
    let elf = store.join(format!("{sha}.elf"));
    let no_pvh = store.join(format!("{sha}.no-pvh"));
    if !elf.is_file() && !no_pvh.is_file() {
        let bad = |reason: String| ImageError::BadKernel {
            path: kernel.image.clone(),
            reason,
        };
        let image = std::fs::read(&kernel.image).map_err(|e| bad(e.to_string()))?;
        let t = Instant::now();
        if crate::elf::is_elf(&image) {
            if !vmlinux::is_pvh_elf(&image) {
                return Err(bad(
                    "ELF kernel without a Xen PVH note (QEMU cannot boot it with -kernel); \
                                build with CONFIG_PVH=y or pass the bzImage"
                        .into(),
                ));
            }
            cache::write_atomic(&elf, &image).map_err(|e| ImageError::cache(&elf, e))?;
        } else {
            match vmlinux::extract_vmlinux(&image) {
                Ok(v) if vmlinux::is_pvh_elf(&v) => {
                    cache::write_atomic(&elf, &v).map_err(|e| ImageError::cache(&elf, e))?;
                    tracing::debug!(
                        "extracted PVH vmlinux ({} bytes) in {:?}",
                        v.len(),
                        t.elapsed()
                    );
                }
                Ok(_) => {
                    tracing::warn!(
                        "{}: vmlinux has no PVH note; using the slower bzImage",
                        kernel.image.display()
                    );
                    cache::write_atomic(&no_pvh, b"no PVH note\n")
                        .map_err(|e| ImageError::cache(&no_pvh, e))?;
                }
                Err(why) => {
                    tracing::warn!(
                        "{}: cannot extract vmlinux ({why}); using the slower bzImage",
                        kernel.image.display()
                    );
                    cache::write_atomic(&no_pvh, why.as_bytes())
                        .map_err(|e| ImageError::cache(&no_pvh, e))?;
                }
            }
        }
    }
    let (format, src) = if elf.is_file() {
        (KernelFormat::PvhElf, elf)
    } else {
        (KernelFormat::BzImage, kernel.image.clone())
    };
    let dst = dir.join(format.file_name());
    cache::link_or_copy(&src, &dst).map_err(|e| ImageError::cache(&dst, e))?;
    Ok(format)
}

/// Reads a bundle directory; `Ok(None)` if it does not exist (or is from an
/// older format, which is then treated as absent and rebuilt).
fn load(dir: &Path) -> Result<Option<Bundle>, ImageError> {
    let mpath = dir.join(MANIFEST_FILE);
    let bytes = match std::fs::read(&mpath) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ImageError::cache(&mpath, e)),
    };
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| ImageError::Manifest {
        path: mpath.clone(),
        reason: e.to_string(),
    })?;
    if m.format != FORMAT_VERSION {
        tracing::debug!(
            "{}: format {} (current {FORMAT_VERSION}); ignoring",
            mpath.display(),
            m.format
        );
        return Ok(None);
    }
    let kernel = dir.join(m.kernel_format.file_name());
    let initrd = dir.join(INITRD_FILE);
    let mut size = bytes.len() as u64;
    for f in [&kernel, &initrd] {
        let meta = std::fs::metadata(f).map_err(|e| ImageError::Manifest {
            path: mpath.clone(),
            reason: format!("{}: {e}", f.display()),
        })?;
        size += meta.len();
    }
    Ok(Some(Bundle {
        id: m.id,
        dir: dir.to_path_buf(),
        kernel,
        initrd,
        kernel_version: m.kernel_version,
        kernel_source: m.kernel_source,
        kernel_format: m.kernel_format,
        modules: m.modules,
        created: m.created,
        size_bytes: size,
    }))
}

/// Every bundle in the cache, oldest first. Unreadable entries are skipped
/// (logged at debug level), so one broken bundle does not hide the others.
pub fn list(cache_dir: Option<&Path>) -> Result<Vec<Bundle>, ImageError> {
    let bundles = cache::cache_dir(cache_dir)?.join("bundles");
    let entries = match std::fs::read_dir(&bundles) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ImageError::cache(&bundles, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| ImageError::cache(&bundles, e))?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') || !entry.path().is_dir() {
            continue;
        }
        match load(&entry.path()) {
            Ok(Some(b)) => out.push(b),
            Ok(None) => {}
            Err(e) => tracing::debug!("skipping {}: {e}", entry.path().display()),
        }
    }
    out.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
    Ok(out)
}

/// Deletes the bundle `id` (or the only one whose id starts with `id`).
pub fn remove(cache_dir: Option<&Path>, id: &str) -> Result<(), ImageError> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return Err(ImageError::InvalidId { id: id.to_string() });
    }
    let cache = cache::cache_dir(cache_dir)?;
    let bundles = cache.join("bundles");
    let mut matches: Vec<String> = match std::fs::read_dir(&bundles) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| !n.starts_with('.') && n.starts_with(id))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(ImageError::cache(&bundles, e)),
    };
    matches.sort();
    let full = match matches.as_slice() {
        [] => {
            return Err(ImageError::BundleNotFound {
                id: id.to_string(),
                cache: bundles,
            })
        }
        [one] => one.clone(),
        _ if matches.iter().any(|m| m == id) => id.to_string(),
        _ => {
            return Err(ImageError::AmbiguousId {
                id: id.to_string(),
                matches,
            })
        }
    };
    let dir = bundles.join(&full);
    let _lock = FileLock::exclusive(&bundles.join(format!(".{full}.lock")))?;
    // Rename first so that a concurrent reader never sees a half-deleted bundle.
    let doomed = bundles.join(format!(".remove-{full}-{}", std::process::id()));
    std::fs::rename(&dir, &doomed).map_err(|e| ImageError::cache(&dir, e))?;
    std::fs::remove_dir_all(&doomed).map_err(|e| ImageError::cache(&doomed, e))?;
    // The lock file stays: deleting it could let two builders lock different inodes.
    prune_vmlinux_store(&cache);
    Ok(())
}

/// Removes `dir` and `.build-<id>-*` work dirs; the caller holds the id's lock.
fn discard_leftovers(bundles: &Path, id: &str, dir: &Path) -> Result<(), ImageError> {
    if dir.exists() {
        let doomed = bundles.join(format!(".remove-{id}-{}", std::process::id()));
        std::fs::rename(dir, &doomed).map_err(|e| ImageError::cache(dir, e))?;
        std::fs::remove_dir_all(&doomed).map_err(|e| ImageError::cache(&doomed, e))?;
    }
    let prefix = format!(".build-{id}-");
    for e in std::fs::read_dir(bundles)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
    {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            tracing::debug!("removing leftover {}", e.path().display());
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    Ok(())
}

/// Drops extracted kernels no bundle links to any more (link count 1).
fn prune_vmlinux_store(cache: &Path) {
    use std::os::unix::fs::MetadataExt;
    let store = cache.join("vmlinux");
    for e in std::fs::read_dir(&store)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
    {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "elf")
            && std::fs::metadata(&p).is_ok_and(|m| m.nlink() == 1)
        {
            tracing::debug!("removing unused {}", p.display());
            let _ = std::fs::remove_file(&p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_before_touching_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "../x", "ABC", "zz", &"a".repeat(65)] {
            assert!(
                matches!(
                    remove(Some(dir.path()), bad),
                    Err(ImageError::InvalidId { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            remove(Some(dir.path()), "abc"),
            Err(ImageError::BundleNotFound { .. })
        ));
        assert!(list(Some(dir.path())).unwrap().is_empty());
    }

    #[test]
    fn content_id_depends_on_every_input() {
        let m = |sha: &str| Planned {
            guest: GuestModule {
                name: "a".into(),
                rel: "kernel/a.ko".into(),
                data: vec![],
                depends: vec![],
            },
            sha256: sha.into(),
        };
        let f = |mode| GuestFile {
            host: "/h".into(),
            path: "/x".into(),
            mode,
            data: b"x".to_vec(),
        };
        let base = content_id(
            "k",
            "6.1",
            &[m("1")],
            "init",
            "bb",
            &[f(0o755)],
            InitrdCompression::Gzip,
        );
        assert_eq!(base.len(), ID_LEN);
        assert_eq!(
            base,
            content_id(
                "k",
                "6.1",
                &[m("1")],
                "init",
                "bb",
                &[f(0o755)],
                InitrdCompression::Gzip
            )
        );
        for other in [
            content_id(
                "K",
                "6.1",
                &[m("1")],
                "init",
                "bb",
                &[f(0o755)],
                InitrdCompression::Gzip,
            ),
            content_id(
                "k",
                "6.2",
                &[m("1")],
                "init",
                "bb",
                &[f(0o755)],
                InitrdCompression::Gzip,
            ),
            content_id(
                "k",
                "6.1",
                &[m("2")],
                "init",
                "bb",
                &[f(0o755)],
                InitrdCompression::Gzip,
            ),
            content_id(
                "k",
                "6.1",
                &[],
                "init",
                "bb",
                &[f(0o755)],
                InitrdCompression::Gzip,
            ),
            content_id(
                "k",
                "6.1",
                &[m("1")],
                "init2",
                "bb",
                &[f(0o755)],
                InitrdCompression::Gzip,
            ),
            content_id(
                "k",
                "6.1",
                &[m("1")],
                "init",
                "bb2",
                &[f(0o755)],
                InitrdCompression::Gzip,
            ),
            content_id(
                "k",
                "6.1",
                &[m("1")],
                "init",
                "bb",
                &[f(0o644)],
                InitrdCompression::Gzip,
            ),
            content_id(
                "k",
                "6.1",
                &[m("1")],
                "init",
                "bb",
                &[],
                InitrdCompression::Gzip,
            ),
            content_id(
                "k",
                "6.1",
                &[m("1")],
                "init",
                "bb",
                &[f(0o755)],
                InitrdCompression::None,
            ),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn extra_modules_must_exist() {
        use crate::elf::build::elf_with_sections;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("lib/modules/6.6.6");
        std::fs::create_dir_all(root.join("kernel")).unwrap();
        let ko = |info: &str| elf_with_sections(&[(".modinfo", 1, info.as_bytes())], false);
        std::fs::write(root.join("kernel/virtio_blk.ko"), ko("depends=virtio\0")).unwrap();
        std::fs::write(root.join("kernel/virtio.ko"), ko("depends=\0")).unwrap();
        std::fs::write(root.join("kernel/nbd.ko"), ko("depends=\0")).unwrap();
        std::fs::write(root.join("kernel/broken.ko"), ko("depends=gone\0")).unwrap();
        std::fs::write(root.join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n").unwrap();
        let kernel = ResolvedKernel {
            image: "/k".into(),
            modules_dir: Some(root.clone()),
            version: "6.6.6".into(),
            source: KernelSource::Explicit { path: "/k".into() },
            config: None,
        };
        let cache = dir.path().join("cache");
        let names = |p: &[Planned]| p.iter().map(|m| m.guest.name.clone()).collect::<Vec<_>>();
        let plan = plan_modules(&cache, &kernel, &[]).unwrap();
        assert_eq!(
            names(&plan),
            ["virtio", "virtio_blk"],
            "defaults present in the tree, deps first"
        );
        assert_eq!(plan[1].guest.depends, ["kernel/virtio.ko"]);
        let plan = plan_modules(&cache, &kernel, &["nbd".into(), "ext4".into()]).unwrap();
        assert_eq!(
            names(&plan),
            ["virtio", "virtio_blk", "nbd"],
            "built-in ext4 needs nothing"
        );
        let e = plan_modules(&cache, &kernel, &["nope".into()]).unwrap_err();
        assert!(
            matches!(e, ImageError::ModuleNotFound { ref name, .. } if name == "nope"),
            "{e}"
        );
        let e = plan_modules(&cache, &kernel, &["broken".into()]).unwrap_err();
        assert!(matches!(e, ImageError::BadModule { .. }), "{e}");
        let no_tree = ResolvedKernel {
            modules_dir: None,
            ..kernel
        };
        assert!(plan_modules(&cache, &no_tree, &[]).unwrap().is_empty());
        let e = plan_modules(&cache, &no_tree, &["nbd".into()]).unwrap_err();
        assert!(
            matches!(e, ImageError::ModuleNotFound { no_tree: true, .. }),
            "{e}"
        );
    }

    #[test]
    fn extra_file_validation() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("f");
        std::fs::write(&host, b"hi").unwrap();
        let ok = read_extra_files(&[ExtraFile::new(&host, "/usr/local/bin/f", 0o100755)]).unwrap();
        assert_eq!(ok[0].path, "/usr/local/bin/f");
        assert_eq!(ok[0].mode, 0o755);
        for (h, g) in [
            (&host, "relative"),
            (&host, "/init"),
            (&host, "/a/../b"),
            (&dir.path().to_path_buf(), "/d"),
        ] {
            let e = read_extra_files(&[ExtraFile::new(h, g, 0o644)]).unwrap_err();
            assert!(e.to_string().contains("fix:"), "{e}");
        }
    }
}
