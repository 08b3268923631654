//! Kernel modules: find them, read their `.modinfo`, order them for loading.
//!
//! Debian's kernel packages ship no `modules.dep` (depmod runs at install
//! time), so dependencies come from each module's own `.modinfo` section
//! (`depends=a,b`). Module names treat `-` and `_` alike, as the kernel does.
//! Module files are untrusted input: parsing is bounded and never panics.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use crate::elf::Elf;
use crate::error::ImageError;
use crate::vmlinux::{decompress, Compression};

/// Modules every bundle tries to include (skipped with a debug log if the
/// kernel has neither the module nor the driver built in).
///
/// `crc32c_generic` is here because ext4 and jbd2 only have a *soft*
/// dependency on the `crypto-crc32c` alias, which cannot be resolved without
/// reading every module; without it ext4 with metadata checksums fails to mount.
pub const DEFAULT_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "vsock",
    "vmw_vsock_virtio_transport",
    "crc32c_generic",
    "ext4",
    "virtiofs",
    "9p",
    "9pnet_virtio",
    "overlay",
    // Image root filesystems (`capsa run --image`) are EROFS (or ext4).
    "erofs",
];

/// Modules a display needs (DRM + fbdev for QEMU's bochs-display, virtio
/// tablet and keyboard, evdev for `/dev/input/event*`). They go into every
/// bundle but into a list of their own, `modules-display.load`, which the
/// guest init loads only with `capsa.display=1`: headless boots skip them.
pub const DISPLAY_MODULES: &[&str] = &["bochs", "virtio_input", "evdev"];

/// Largest decompressed module accepted.
const MAX_MODULE_BYTES: u64 = 64 << 20;
/// Most modules in one load order (a whole distribution kernel has ~6000).
const MAX_PLAN: usize = 8192;
/// Deepest dependency chain followed (real chains are < 10 deep).
const MAX_DEPTH: usize = 64;
/// Bounds for walking a module tree.
const MAX_TREE_DEPTH: usize = 16;
const MAX_TREE_FILES: usize = 200_000;

/// Canonical module name: the kernel treats `-` and `_` as the same.
pub(crate) fn normalize(name: &str) -> String {
    name.trim().replace('-', "_")
}

/// The module name and compression of a module file name, if it is one.
pub(crate) fn module_file_name(file: &str) -> Option<(String, Option<Compression>)> {
    let (stem, c) = if let Some(s) = file.strip_suffix(".ko") {
        (s, None)
    } else if let Some(s) = file.strip_suffix(".ko.xz") {
        (s, Some(Compression::Xz))
    } else if let Some(s) = file.strip_suffix(".ko.zst") {
        (s, Some(Compression::Zstd))
    } else if let Some(s) = file.strip_suffix(".ko.gz") {
        (s, Some(Compression::Gzip))
    } else {
        return None;
    };
    (!stem.is_empty()).then(|| (normalize(stem), c))
}

/// The relative path a module gets in the initramfs (stored decompressed).
pub(crate) fn decompressed_rel_path(rel: &str) -> String {
    for ext in [".xz", ".zst", ".gz"] {
        if let Some(s) = rel.strip_suffix(ext) {
            if s.ends_with(".ko") {
                return s.to_string();
            }
        }
    }
    rel.to_string()
}

/// What a module's `.modinfo` says about loading it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ModInfo {
    /// `name=` (normalized), if present.
    pub name: Option<String>,
    /// `depends=`: modules that must be loaded first (normalized).
    pub depends: Vec<String>,
    /// `softdep=pre: ...`: modules that should be loaded first if available.
    pub softdep_pre: Vec<String>,
}

/// Parses a `.modinfo` section: NUL-separated `key=value` strings.
pub(crate) fn parse_modinfo(section: &[u8]) -> ModInfo {
    let mut info = ModInfo::default();
    for entry in section.split(|&b| b == 0).take(4096) {
        let entry = String::from_utf8_lossy(entry);
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        match key {
            "name" if !value.trim().is_empty() => info.name = Some(normalize(value)),
            "depends" => {
                for dep in value.split(',').map(normalize).filter(|d| !d.is_empty()) {
                    if !info.depends.contains(&dep) {
                        info.depends.push(dep);
                    }
                }
            }
            "softdep" => {
                let mut in_pre = false;
                for word in value.split_whitespace() {
                    match word {
                        "pre:" => in_pre = true,
                        "post:" => in_pre = false,
                        w if in_pre => {
                            let w = normalize(w);
                            if !info.softdep_pre.contains(&w) {
                                info.softdep_pre.push(w);
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    info
}

/// Reads the `.modinfo` of an (uncompressed) module file.
pub(crate) fn modinfo_of(module: &[u8]) -> Result<ModInfo, String> {
    let elf = Elf::parse(module).map_err(|e| format!("not an ELF module: {e}"))?;
    match elf.section(".modinfo").map_err(|e| e.to_string())? {
        Some(s) => Ok(parse_modinfo(s)),
        None => Err("no .modinfo section".into()),
    }
}

/// The module files of one kernel release, indexed by name.
#[derive(Debug, Clone)]
pub(crate) struct ModuleTree {
    /// `/lib/modules/<release>` (or an equivalent directory).
    pub root: PathBuf,
    /// Normalized name -> path relative to `root`.
    by_name: BTreeMap<String, String>,
    /// Normalized names of built-in drivers (`modules.builtin`).
    builtin: BTreeSet<String>,
}

impl ModuleTree {
    /// Indexes the tree by file name (module names equal their file stems by
    /// kbuild construction, so no module needs to be opened here).
    pub(crate) fn scan(root: &Path) -> Result<Self, ImageError> {
        let err = |reason: String| ImageError::ModuleTree {
            path: root.to_path_buf(),
            reason,
        };
        let meta = std::fs::metadata(root).map_err(|e| err(e.to_string()))?;
        if !meta.is_dir() {
            return Err(err("not a directory".into()));
        }
        let mut by_name: BTreeMap<String, String> = BTreeMap::new();
        let mut files = 0usize;
        let mut stack = vec![(root.to_path_buf(), String::new(), 0usize)];
        while let Some((dir, rel, depth)) = stack.pop() {
            let mut entries: Vec<_> = std::fs::read_dir(&dir)
                .map_err(|e| err(format!("{}: {e}", dir.display())))?
                .filter_map(Result::ok)
                .collect();
            entries.sort_by_key(|e| e.file_name());
            for entry in entries {
                let Ok(ft) = entry.file_type() else { continue };
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                let child_rel = if rel.is_empty() {
                    name.clone()
                } else {
                    format!("{rel}/{name}")
                };
                // Symlinks (`build`, `source`) point at headers outside the tree.
                if ft.is_dir() && depth < MAX_TREE_DEPTH {
                    stack.push((entry.path(), child_rel, depth + 1));
                } else if ft.is_file() {
                    files += 1;
                    if files > MAX_TREE_FILES {
                        return Err(err(format!("more than {MAX_TREE_FILES} files")));
                    }
                    if let Some((module, _)) = module_file_name(&name) {
                        let better = match by_name.get(&module) {
                            None => true,
                            Some(old) => priority(&child_rel) > priority(old),
                        };
                        if better {
                            by_name.insert(module, child_rel);
                        }
                    }
                }
            }
        }
        let builtin = read_builtin(&root.join("modules.builtin"));
        Ok(Self {
            root: root.to_path_buf(),
            by_name,
            builtin,
        })
    }

    /// Relative path of module `name`, if the tree has it.
    pub(crate) fn path_of(&self, name: &str) -> Option<&str> {
        self.by_name.get(&normalize(name)).map(String::as_str)
    }

    /// Whether `name` is built into the kernel.
    pub(crate) fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize(name))
    }

    /// Number of module files found.
    pub(crate) fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Reads and decompresses module `name`.
    pub(crate) fn read(&self, name: &str) -> Result<Option<(String, Vec<u8>)>, ImageError> {
        let Some(rel) = self.path_of(name) else {
            return Ok(None);
        };
        let path = self.root.join(rel);
        let bad = |reason: String| ImageError::BadModule {
            path: path.clone(),
            reason,
        };
        let raw = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
        let file_name = rel.rsplit('/').next().unwrap_or(rel);
        let data = match module_file_name(file_name).and_then(|(_, c)| c) {
            Some(c) => decompress(c, &raw, MAX_MODULE_BYTES).map_err(bad)?,
            None => raw,
        };
        Ok(Some((rel.to_string(), data)))
    }
}

/// depmod's search order: `updates/` beats `extra/` beats the kernel's own tree.
fn priority(rel: &str) -> u8 {
    if rel.starts_with("updates/") {
        2
    } else if rel.starts_with("extra/") {
        1
    } else {
        0
    }
}

fn read_builtin(path: &Path) -> BTreeSet<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        tracing::debug!("no {}; assuming no built-in modules", path.display());
        return BTreeSet::new();
    };
    text.lines()
        .take(100_000)
        .filter_map(|l| l.trim().rsplit('/').next())
        .filter_map(module_file_name)
        .map(|(n, _)| n)
        .collect()
}

/// How a module name resolves for one kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// A loadable module with this metadata.
    Module(ModInfo),
    /// Built into the kernel: nothing to load.
    Builtin,
    /// Neither.
    Missing,
}

/// Where [`load_order`] gets module metadata from (a tree on disk, or a map in tests).
pub(crate) trait ModuleSource {
    /// Resolves one (normalized) module name.
    fn lookup(&mut self, name: &str) -> Result<Lookup, ImageError>;
}

/// Trailer of a signed module (`scripts/sign-file`).
const SIGNATURE_MAGIC: &[u8] = b"~Module signature appended~\n";

/// Removes an appended module signature; returns whether there was one.
///
/// Checking signatures of the default module set costs ~200 ms of a
/// ~450 ms module load under TCG, and a VM without Secure Boot does not
/// enforce them, so bundles ship unsigned modules when the kernel config
/// allows it (see `ResolvedKernel::accepts_unsigned_modules`).
pub(crate) fn strip_signature(module: &mut Vec<u8>) -> bool {
    let Some(end) = module.len().checked_sub(SIGNATURE_MAGIC.len()) else {
        return false;
    };
    if &module[end..] != SIGNATURE_MAGIC || end < 12 {
        return false;
    }
    // struct module_signature: algo, hash, id_type, signer_len, key_id_len, pad[3], be32 sig_len.
    let info = &module[end - 12..end];
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    let total = 12usize
        .saturating_add(sig_len)
        .saturating_add(info[3] as usize)
        .saturating_add(info[4] as usize);
    match end.checked_sub(total) {
        Some(keep) if crate::elf::is_elf(&module[..keep]) => {
            module.truncate(keep);
            true
        }
        _ => false,
    }
}

/// The result of [`load_order`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Modules to load, dependencies first.
    pub order: Vec<String>,
    /// Requested or depended-on names that are built in.
    pub builtin: Vec<String>,
    /// `(name, needed by)` for names that exist nowhere; `needed by` is
    /// `None` for requested names. Modules needing them are left out.
    pub missing: Vec<(String, Option<String>)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Visiting,
    Included,
    Excluded,
}

/// Orders `requested` modules and their dependencies for loading.
///
/// Hard dependencies (`depends=`) come first; a module whose hard dependency
/// is missing is left out. Soft pre-dependencies are included when they exist.
/// Cycles (impossible in a real kernel) are broken, not followed.
pub(crate) fn load_order(
    requested: &[String],
    src: &mut impl ModuleSource,
) -> Result<Plan, ImageError> {
    let mut plan = Plan::default();
    let mut state: HashMap<String, State> = HashMap::new();
    for name in requested {
        let name = normalize(name);
        if name.is_empty() {
            continue;
        }
        visit(&name, None, 0, src, &mut state, &mut plan)?;
    }
    Ok(plan)
}

fn visit(
    name: &str,
    needed_by: Option<&str>,
    depth: usize,
    src: &mut impl ModuleSource,
    state: &mut HashMap<String, State>,
    plan: &mut Plan,
) -> Result<bool, ImageError> {
    match state.get(name) {
        Some(State::Included) => return Ok(true),
        Some(State::Excluded) => return Ok(false),
        Some(State::Visiting) => {
            tracing::debug!("module dependency cycle through {name}; ignoring that edge");
            return Ok(true);
        }
        None => {}
    }
    if depth > MAX_DEPTH || plan.order.len() >= MAX_PLAN {
        tracing::warn!("module dependencies of {name} too deep or too many; leaving it out");
        state.insert(name.to_string(), State::Excluded);
        return Ok(false);
    }
    let info = match src.lookup(name)? {
        Lookup::Builtin => {
            state.insert(name.to_string(), State::Included);
            plan.builtin.push(name.to_string());
            return Ok(true);
        }
        Lookup::Missing => {
            state.insert(name.to_string(), State::Excluded);
            plan.missing
                .push((name.to_string(), needed_by.map(str::to_string)));
            return Ok(false);
        }
        Lookup::Module(info) => info,
    };
    state.insert(name.to_string(), State::Visiting);
    for soft in &info.softdep_pre {
        if soft != name && matches!(src.lookup(soft)?, Lookup::Module(_)) {
            visit(soft, Some(name), depth + 1, src, state, plan)?;
        }
    }
    let mut ok = true;
    for dep in &info.depends {
        if dep != name && !visit(dep, Some(name), depth + 1, src, state, plan)? {
            ok = false;
        }
    }
    if ok {
        state.insert(name.to_string(), State::Included);
        plan.order.push(name.to_string());
    } else {
        tracing::debug!("leaving out module {name}: a dependency is missing");
        state.insert(name.to_string(), State::Excluded);
    }
    Ok(ok)
}

/// A [`ModuleSource`] over a [`ModuleTree`] that keeps the decompressed
/// files it read, for writing them into the initramfs afterwards.
pub(crate) struct TreeSource<'a> {
    tree: &'a ModuleTree,
    /// Normalized name -> (relative path, decompressed bytes).
    pub loaded: HashMap<String, (String, Vec<u8>)>,
    infos: HashMap<String, Lookup>,
}

impl<'a> TreeSource<'a> {
    /// A source reading from `tree`.
    pub(crate) fn new(tree: &'a ModuleTree) -> Self {
        Self {
            tree,
            loaded: HashMap::new(),
            infos: HashMap::new(),
        }
    }
}

impl ModuleSource for TreeSource<'_> {
    fn lookup(&mut self, name: &str) -> Result<Lookup, ImageError> {
        if let Some(l) = self.infos.get(name) {
            return Ok(l.clone());
        }
        let result = if self.tree.is_builtin(name) {
            Lookup::Builtin
        } else {
            match self.tree.read(name)? {
                None => Lookup::Missing,
                Some((rel, data)) => {
                    let info = modinfo_of(&data).map_err(|reason| ImageError::BadModule {
                        path: self.tree.root.join(&rel),
                        reason,
                    })?;
                    self.loaded.insert(name.to_string(), (rel, data));
                    Lookup::Module(info)
                }
            }
        };
        self.infos.insert(name.to_string(), result.clone());
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elf::build::elf_with_sections;

    struct MapSource(HashMap<String, Lookup>, usize);

    impl ModuleSource for MapSource {
        fn lookup(&mut self, name: &str) -> Result<Lookup, ImageError> {
            self.1 += 1;
            Ok(self.0.get(name).cloned().unwrap_or(Lookup::Missing))
        }
    }

    fn m(deps: &[&str]) -> Lookup {
        Lookup::Module(ModInfo {
            name: None,
            depends: deps.iter().map(|d| d.to_string()).collect(),
            softdep_pre: vec![],
        })
    }

    fn src(entries: &[(&str, Lookup)]) -> MapSource {
        MapSource(
            entries
                .iter()
                .map(|(n, l)| (n.to_string(), l.clone()))
                .collect(),
            0,
        )
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn modinfo_parsing() {
        let sec = b"license=GPL\0\0author=x=y\0softdep=pre: crypto-crc32c foo post: bar\0depends=jbd2,mbcache,crc16,,jbd2\0name=ext4\0vermagic=6.1\0garbage\0\xff\xfe=\0";
        let i = parse_modinfo(sec);
        assert_eq!(i.name.as_deref(), Some("ext4"));
        assert_eq!(i.depends, names(&["jbd2", "mbcache", "crc16"]));
        assert_eq!(i.softdep_pre, names(&["crypto_crc32c", "foo"]));
        assert_eq!(parse_modinfo(b""), ModInfo::default());
        assert_eq!(parse_modinfo(b"depends=").depends, Vec::<String>::new());
        assert_eq!(
            parse_modinfo(b"depends=virtio-pci-legacy").depends,
            names(&["virtio_pci_legacy"])
        );
    }

    #[test]
    fn modinfo_from_elf_module() {
        let ko = elf_with_sections(
            &[
                (".text", 1, b"\x90\x90"),
                (".modinfo", 1, b"depends=a,b-c\0name=m\0"),
            ],
            false,
        );
        let i = modinfo_of(&ko).unwrap();
        assert_eq!(i.depends, names(&["a", "b_c"]));
        assert!(modinfo_of(b"not elf").is_err());
        let no_modinfo = elf_with_sections(&[(".text", 1, b"\x90")], false);
        assert!(modinfo_of(&no_modinfo).is_err());
        for cut in 0..ko.len() {
            let _ = modinfo_of(&ko[..cut]);
        }
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let mut s = src(&[
            ("ext4", m(&["jbd2", "mbcache", "crc16"])),
            ("jbd2", m(&[])),
            ("mbcache", m(&[])),
            ("crc16", Lookup::Builtin),
            ("virtiofs", m(&["fuse", "virtio", "virtio_ring"])),
            ("fuse", m(&[])),
            ("virtio", m(&[])),
            ("virtio_ring", m(&["virtio"])),
            (
                "virtio_pci",
                m(&["virtio", "virtio_ring", "virtio_pci_modern_dev"]),
            ),
            ("virtio_pci_modern_dev", m(&[])),
        ]);
        let plan = load_order(&names(&["virtio_pci", "ext4", "virtiofs", "ext4"]), &mut s).unwrap();
        assert_eq!(
            plan.order,
            names(&[
                "virtio",
                "virtio_ring",
                "virtio_pci_modern_dev",
                "virtio_pci",
                "jbd2",
                "mbcache",
                "ext4",
                "fuse",
                "virtiofs"
            ])
        );
        assert_eq!(plan.builtin, names(&["crc16"]));
        assert!(plan.missing.is_empty());
        for (i, name) in plan.order.iter().enumerate() {
            if let Some(Lookup::Module(info)) = s.0.get(name) {
                for d in &info.depends {
                    if let Some(j) = plan.order.iter().position(|x| x == d) {
                        assert!(j < i, "{d} must precede {name}");
                    }
                }
            }
        }
    }

    #[test]
    fn dash_and_underscore_are_the_same() {
        let mut s = src(&[("virtio_rng", m(&[])), ("a_b", m(&["virtio_rng"]))]);
        let plan = load_order(&names(&["virtio-rng", "a-b"]), &mut s).unwrap();
        assert_eq!(plan.order, names(&["virtio_rng", "a_b"]));
    }

    #[test]
    fn missing_dependencies_exclude_the_module() {
        let mut s = src(&[("a", m(&["gone"])), ("b", m(&["a"])), ("c", m(&[]))]);
        let plan = load_order(&names(&["b", "c", "nope"]), &mut s).unwrap();
        assert_eq!(plan.order, names(&["c"]));
        assert_eq!(
            plan.missing,
            vec![
                ("gone".to_string(), Some("a".to_string())),
                ("nope".to_string(), None)
            ]
        );
    }

    #[test]
    fn soft_pre_dependencies_are_optional() {
        let soft = |pre: &[&str]| {
            Lookup::Module(ModInfo {
                name: None,
                depends: vec![],
                softdep_pre: names(pre),
            })
        };
        let mut s = src(&[
            ("ext4", soft(&["crc32c_generic", "crypto_crc32c"])),
            ("crc32c_generic", m(&[])),
        ]);
        let plan = load_order(&names(&["ext4"]), &mut s).unwrap();
        assert_eq!(plan.order, names(&["crc32c_generic", "ext4"]));
        assert!(
            plan.missing.is_empty(),
            "soft deps are not reported missing"
        );
    }

    #[test]
    fn cycles_terminate() {
        let mut s = src(&[("a", m(&["b"])), ("b", m(&["c"])), ("c", m(&["a", "c"]))]);
        let plan = load_order(&names(&["a"]), &mut s).unwrap();
        assert_eq!(plan.order, names(&["c", "b", "a"]));
        assert!(s.1 < 20);
    }

    #[test]
    fn deep_chains_are_bounded() {
        let entries: Vec<(String, Lookup)> = (0..1000)
            .map(|i| (format!("m{i}"), m(&[&format!("m{}", i + 1)])))
            .collect();
        let mut s = MapSource(entries.into_iter().collect(), 0);
        let plan = load_order(&names(&["m0"]), &mut s).unwrap();
        assert!(
            plan.order.is_empty(),
            "chain deeper than the bound is left out"
        );
    }

    #[test]
    fn signatures_are_stripped_exactly() {
        let body = elf_with_sections(&[(".modinfo", 1, b"name=x\0")], false);
        let mut signed = body.clone();
        signed.extend_from_slice(&[0xAB; 300]); // PKCS#7 blob
        signed.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        signed.extend_from_slice(&300u32.to_be_bytes());
        signed.extend_from_slice(SIGNATURE_MAGIC);
        assert!(strip_signature(&mut signed));
        assert_eq!(signed, body);
        assert!(!strip_signature(&mut signed), "nothing left to strip");
        // A lying length leaves the file alone.
        let mut bad = body.clone();
        bad.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        bad.extend_from_slice(&u32::MAX.to_be_bytes());
        bad.extend_from_slice(SIGNATURE_MAGIC);
        let before = bad.clone();
        assert!(!strip_signature(&mut bad));
        assert_eq!(bad, before);
        let mut tiny = SIGNATURE_MAGIC.to_vec();
        assert!(!strip_signature(&mut tiny));
    }

    #[test]
    fn module_file_names() {
        assert_eq!(
            module_file_name("virtio-rng.ko"),
            Some(("virtio_rng".into(), None))
        );
        assert_eq!(
            module_file_name("ext4.ko.xz"),
            Some(("ext4".into(), Some(Compression::Xz)))
        );
        assert_eq!(
            module_file_name("ext4.ko.zst"),
            Some(("ext4".into(), Some(Compression::Zstd)))
        );
        assert_eq!(module_file_name(".ko"), None);
        assert_eq!(module_file_name("modules.dep"), None);
        assert_eq!(
            decompressed_rel_path("kernel/fs/ext4/ext4.ko.zst"),
            "kernel/fs/ext4/ext4.ko"
        );
        assert_eq!(decompressed_rel_path("kernel/a.ko"), "kernel/a.ko");
    }

    #[test]
    fn tree_scan_reads_compressed_modules_and_builtins() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("kernel/drivers/virtio")).unwrap();
        std::fs::create_dir_all(root.join("updates")).unwrap();
        let ko = |deps: &str| {
            elf_with_sections(
                &[(".modinfo", 1, format!("depends={deps}\0").as_bytes())],
                false,
            )
        };
        std::fs::write(root.join("kernel/drivers/virtio/virtio.ko"), ko("")).unwrap();
        let xz = crate::vmlinux::tests::compress(Compression::Xz, &ko("virtio"));
        std::fs::write(root.join("kernel/drivers/virtio/virtio_ring.ko.xz"), xz).unwrap();
        let zst = crate::vmlinux::tests::compress(Compression::Zstd, &ko("virtio_ring,crc16"));
        std::fs::write(root.join("kernel/drivers/virtio/virtio-pci.ko.zst"), zst).unwrap();
        std::fs::write(root.join("updates/virtio.ko"), ko("")).unwrap();
        std::fs::write(root.join("modules.builtin"), "kernel/lib/crc16.ko\n").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink("/", root.join("build")).unwrap();

        let tree = ModuleTree::scan(root).unwrap();
        assert_eq!(tree.len(), 3);
        assert_eq!(tree.path_of("virtio"), Some("updates/virtio.ko"));
        assert!(tree.is_builtin("crc16"));
        let mut s = TreeSource::new(&tree);
        let plan = load_order(&names(&["virtio_pci"]), &mut s).unwrap();
        assert_eq!(plan.order, names(&["virtio", "virtio_ring", "virtio_pci"]));
        assert_eq!(plan.builtin, names(&["crc16"]));
        let (rel, data) = &s.loaded["virtio_ring"];
        assert_eq!(rel, "kernel/drivers/virtio/virtio_ring.ko.xz");
        assert!(data.starts_with(b"\x7fELF"), "stored decompressed");

        std::fs::write(root.join("kernel/drivers/virtio/virtio.ko"), b"garbage").unwrap();
        std::fs::remove_file(root.join("updates/virtio.ko")).unwrap();
        let tree = ModuleTree::scan(root).unwrap();
        let err = load_order(&names(&["virtio"]), &mut TreeSource::new(&tree)).unwrap_err();
        assert!(matches!(err, ImageError::BadModule { .. }), "{err}");
    }
}
