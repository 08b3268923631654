//! The content-addressed image store.
//!
//! ```text
//! <store>/                 $XDG_CACHE_HOME/capsa/images, else ~/.cache/capsa/images
//!   blobs/sha256/<hex>     manifests, configs and layers, named by their verified sha256
//!   images/<hex>.json      one record per image, named by its manifest digest
//!   rootfs/<hex>.<fmt>     the read-only filesystem image converted from it, once per digest
//!   tmp/                   incoming blobs, archive spools, staging trees (same filesystem: renames are atomic)
//! ```

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::OciError;
use crate::mkfs::{FsFormat, FsImage, MkfsOptions};
use crate::spec::{
    Compression, ConfigFile, Descriptor, Digest, DockerSaveEntry, HashingReader, ImageConfig,
    Index, Manifest, MT_DOCKER_LIST, MT_DOCKER_MANIFEST, MT_LAYER_TAR, MT_OCI_CONFIG, MT_OCI_INDEX,
    MT_OCI_MANIFEST,
};
use crate::unpack::{Limits, StageReport, Stager};

/// Largest JSON document (index, manifest, config) read into memory.
const MAX_JSON: u64 = 8 << 20;
/// Most files an image archive may hold.
const MAX_ARCHIVE_FILES: usize = 100_000;
/// Most images one index may name.
const MAX_IMAGES: usize = 256;
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Superblock (and ext4 atime/ctime) time of every converted image: 2000-01-01T00:00:00Z.
pub const REPRODUCIBLE_TIME: u64 = 946_684_800;

/// Where a conversion is, for progress displays.
#[derive(Debug, Clone, Copy)]
pub enum ConvertStep {
    /// Unpacking layer `index` (0-based) of `count`, `size` compressed bytes.
    Layer {
        /// Which layer.
        index: usize,
        /// How many layers.
        count: usize,
        /// Its blob size.
        size: u64,
    },
    /// Building the filesystem image.
    Mkfs {
        /// Which format.
        format: FsFormat,
    },
}

/// A converted root filesystem.
#[derive(Debug, Clone)]
pub struct Rootfs {
    /// The image file.
    pub image: FsImage,
    /// What unpacking did; `None` when the image came from the cache.
    pub report: Option<StageReport>,
}

/// An image in the store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRecord {
    /// Digest of the (possibly synthesized, for `docker save`) OCI manifest: the image's identity.
    pub digest: Digest,
    /// Names (`repo:tag` or OCI ref names) pointing at it.
    pub names: Vec<String>,
    /// Config blob digest.
    pub config_digest: Digest,
    /// Layers, bottom first.
    pub layers: Vec<Descriptor>,
    /// The runtime config (Env, Cmd, ...).
    pub config: ImageConfig,
    /// Sum of the blob sizes.
    pub size: u64,
    /// Digests of registry indexes (manifest lists) that resolved to this image, so a tag or
    /// digest pointing at the index finds it without downloading anything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub index_digests: Vec<Digest>,
}

impl ImageRecord {
    /// Short id: the first 12 hex digits of the digest.
    pub fn short_id(&self) -> &str {
        &self.digest.hex()[..12]
    }

    /// Every blob this image owns in the store: manifest, config, layers, index documents.
    pub fn blob_digests(&self) -> impl Iterator<Item = &Digest> {
        std::iter::once(&self.digest)
            .chain(std::iter::once(&self.config_digest))
            .chain(self.layers.iter().map(|l| &l.digest))
            .chain(self.index_digests.iter())
    }

    /// Whether `d` names this image (its manifest or an index that resolved to it).
    pub fn answers_to(&self, d: &Digest) -> bool {
        &self.digest == d || self.index_digests.contains(d)
    }
}

/// The image store.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// The default location: `$XDG_CACHE_HOME/capsa/images`, else `~/.cache/capsa/images`.
    pub fn default_dir() -> Result<PathBuf, OciError> {
        if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
            return Ok(PathBuf::from(x).join("capsa/images"));
        }
        match std::env::var_os("HOME").filter(|x| !x.is_empty()) {
            Some(h) => Ok(PathBuf::from(h).join(".cache/capsa/images")),
            None => Err(OciError::NoCacheDir),
        }
    }

    /// Opens (creating if needed) a store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, OciError> {
        let root = root.into();
        for sub in ["blobs/sha256", "images", "rootfs", "tmp"] {
            let d = root.join(sub);
            fs::create_dir_all(&d).map_err(|e| OciError::io("creating store directory", &d, e))?;
        }
        Ok(Store { root })
    }

    /// Opens the store at the default location.
    pub fn open_default() -> Result<Self, OciError> {
        Self::open(Self::default_dir()?)
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a blob lives (whether or not it is present).
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    /// A fresh private directory under the store's `tmp/`, removed on drop.
    pub(crate) fn tempdir(&self, prefix: &str) -> Result<tempfile::TempDir, OciError> {
        let tmp = self.root.join("tmp");
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&tmp)
            .map_err(|e| OciError::io("creating a temporary directory in", &tmp, e))
    }

    /// Copies a blob into the store, verifying it against `expected` (digest and size) when given.
    /// Returns its digest and size.
    pub fn add_blob(
        &self,
        src: impl Read,
        expected: Option<&Descriptor>,
    ) -> Result<(Digest, u64), OciError> {
        let tmp_dir = self.root.join("tmp");
        let mut tmp = tempfile::NamedTempFile::new_in(&tmp_dir)
            .map_err(|e| OciError::io("creating a temporary blob in", &tmp_dir, e))?;
        // Never read more than promised (+1 to detect an overlong blob).
        let cap = expected
            .map(|d| d.size.saturating_add(1))
            .unwrap_or(u64::MAX);
        let mut hr = HashingReader::new(src.take(cap));
        io::copy(&mut hr, tmp.as_file_mut())
            .map_err(|e| OciError::io("copying a blob to", tmp.path(), e))?;
        let (digest, size) = hr.finish();
        if let Some(d) = expected {
            if d.digest != digest || d.size != size {
                return Err(OciError::DigestMismatch {
                    expected: d.digest.to_string(),
                    expected_size: d.size,
                    actual_digest: digest.to_string(),
                    actual_size: size,
                });
            }
        }
        let dest = self.blob_path(&digest);
        if !dest.exists() {
            tmp.as_file()
                .sync_all()
                .map_err(|e| OciError::io("syncing", tmp.path(), e))?;
            tmp.persist(&dest)
                .map_err(|e| OciError::io("storing blob", &dest, e.error))?;
        }
        Ok((digest, size))
    }

    /// Moves a file that lives in the store's `tmp/` into the blob store under its sha256, without
    /// copying it. Returns its digest and size.
    pub fn adopt_blob(&self, file: &Path) -> Result<(Digest, u64), OciError> {
        let f = File::open(file).map_err(|e| OciError::io("opening", file, e))?;
        let mut hr = HashingReader::new(io::BufReader::with_capacity(1 << 20, f));
        io::copy(&mut hr, &mut io::sink()).map_err(|e| OciError::io("hashing", file, e))?;
        let (digest, size) = hr.finish();
        let dest = self.blob_path(&digest);
        if dest.exists() {
            let _ = fs::remove_file(file);
        } else {
            fs::rename(file, &dest).map_err(|e| OciError::io("storing blob", &dest, e))?;
        }
        Ok((digest, size))
    }

    /// A fresh private directory under the store's `tmp/` (removed when the handle drops), for
    /// producing files to [`Store::adopt_blob`].
    pub fn work_dir(&self, prefix: &str) -> Result<tempfile::TempDir, OciError> {
        self.tempdir(prefix)
    }

    /// Starts writing a blob that must match `expected` (digest and size); see [`BlobWriter`].
    pub fn blob_writer(&self, expected: &Descriptor) -> Result<BlobWriter, OciError> {
        let tmp_dir = self.root.join("tmp");
        let tmp = tempfile::NamedTempFile::new_in(&tmp_dir)
            .map_err(|e| OciError::io("creating a temporary blob in", &tmp_dir, e))?;
        Ok(BlobWriter {
            out: io::BufWriter::with_capacity(1 << 20, tmp),
            hasher: <sha2::Sha256 as sha2::Digest>::new(),
            count: 0,
            expected: expected.clone(),
            dest: self.blob_path(&expected.digest),
        })
    }

    /// Whether a blob is present (it was verified when stored).
    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// Finds an image by the digest of its manifest or of an index that resolved to it.
    pub fn find_digest(&self, d: &Digest) -> Result<Option<ImageRecord>, OciError> {
        Ok(self.list()?.into_iter().find(|r| r.answers_to(d)))
    }

    /// Adds `name` to the image `digest` (moving it off any other image).
    pub fn add_name(&self, rec: &ImageRecord, names: &[String]) -> Result<ImageRecord, OciError> {
        let mut rec = rec.clone();
        for n in names {
            if !rec.names.contains(n) {
                rec.names.push(n.clone());
            }
        }
        self.save_record(&rec)?;
        Ok(rec)
    }

    /// Removes what no image record owns: blobs and leftovers in `tmp/` older than an hour
    /// (younger ones may belong to a pull or load in progress), converted filesystem images.
    /// `keep_rootfs` is asked about every orphaned filesystem image before it goes: something
    /// outside the store (a sandbox, a snapshot) may still use it.
    /// With `dry_run`, only reports.
    pub fn prune(
        &self,
        dry_run: bool,
        keep_rootfs: &mut dyn FnMut(&Path) -> bool,
    ) -> Result<PruneReport, OciError> {
        let records = self.list()?;
        let owned: std::collections::HashSet<&str> = records
            .iter()
            .flat_map(|r| r.blob_digests().map(|d| d.hex()))
            .collect();
        let mut report = PruneReport::default();
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        let blobs = self.root.join("blobs/sha256");
        for ent in fs::read_dir(&blobs).map_err(|e| OciError::io("listing", &blobs, e))? {
            let ent = ent.map_err(|e| OciError::io("listing", &blobs, e))?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            if owned.contains(name) {
                continue;
            }
            // A pull or load in progress stores its blobs before its record: leave young ones.
            let meta = ent.metadata().ok();
            let old = meta
                .as_ref()
                .and_then(|m| m.modified().ok())
                .is_some_and(|t| t <= hour_ago);
            if !old {
                report.young += 1;
                continue;
            }
            let size = meta.map(|m| m.len()).unwrap_or(0);
            if !dry_run {
                fs::remove_file(ent.path()).map_err(|e| OciError::io("removing", ent.path(), e))?;
            }
            report.blobs.push(name.to_string());
            report.freed_bytes += size;
        }
        let rootfs = self.root.join("rootfs");
        for ent in fs::read_dir(&rootfs).map_err(|e| OciError::io("listing", &rootfs, e))? {
            let ent = ent.map_err(|e| OciError::io("listing", &rootfs, e))?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            let hex = name.split('.').next().unwrap_or("");
            if records.iter().any(|r| r.digest.hex() == hex) {
                continue;
            }
            let p = ent.path();
            if keep_rootfs(&p) {
                report.kept.push(p);
                continue;
            }
            let size = ent.metadata().map(|m| m.len()).unwrap_or(0);
            if !dry_run {
                fs::remove_file(&p).map_err(|e| OciError::io("removing", &p, e))?;
            }
            report.rootfs.push(p);
            report.freed_bytes += size;
        }
        let tmp = self.root.join("tmp");
        for ent in fs::read_dir(&tmp).map_err(|e| OciError::io("listing", &tmp, e))? {
            let ent = ent.map_err(|e| OciError::io("listing", &tmp, e))?;
            let old = ent
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t < hour_ago);
            if !old {
                continue;
            }
            let p = ent.path();
            if !dry_run {
                let r = if p.is_dir() {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
                if let Err(e) = r {
                    tracing::warn!(path = %p.display(), "cannot remove leftover: {e}");
                    continue;
                }
            }
            report.tmp.push(p);
        }
        Ok(report)
    }

    /// Opens a stored blob for reading, hashing it as it is read (see [`VerifiedBlob`]).
    pub fn open_blob(&self, d: &Descriptor) -> Result<VerifiedBlob, OciError> {
        let p = self.blob_path(&d.digest);
        let f = File::open(&p).map_err(|e| OciError::io("opening blob", &p, e))?;
        Ok(VerifiedBlob {
            inner: HashingReader::new(f.take(d.size.saturating_add(1))),
            expected: d.clone(),
        })
    }

    pub(crate) fn read_json_blob<T: serde::de::DeserializeOwned>(
        &self,
        d: &Descriptor,
        what: &'static str,
    ) -> Result<T, OciError> {
        if d.size > MAX_JSON {
            return Err(OciError::LimitExceeded {
                what,
                limit: MAX_JSON,
                field: "(fixed)",
                context: d.digest.to_string(),
            });
        }
        let mut b = self.open_blob(d)?;
        let mut buf = Vec::new();
        b.read_to_end(&mut buf)
            .map_err(|e| OciError::io("reading blob", self.blob_path(&d.digest), e))?;
        b.verify()?;
        serde_json::from_slice(&buf).map_err(|e| OciError::BadJson {
            what,
            path: self.blob_path(&d.digest),
            reason: e.to_string(),
        })
    }

    /// Every image in the store, sorted by first name then digest.
    pub fn list(&self) -> Result<Vec<ImageRecord>, OciError> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        for ent in fs::read_dir(&dir).map_err(|e| OciError::io("listing", &dir, e))? {
            let ent = ent.map_err(|e| OciError::io("listing", &dir, e))?;
            let p = ent.path();
            if p.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<ImageRecord>(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::warn!(path = %p.display(), "ignoring unreadable image record: {e}")
                }
            }
        }
        out.sort_by(|a, b| (a.names.first(), &a.digest).cmp(&(b.names.first(), &b.digest)));
        Ok(out)
    }

    /// Finds an image by name (`repo:tag`, `repo` meaning `repo:latest`), digest, or digest prefix.
    pub fn find(&self, what: &str) -> Result<ImageRecord, OciError> {
        let all = self.list()?;
        let with_latest = format!("{what}:latest");
        if let Some(r) = all
            .iter()
            .find(|r| r.names.iter().any(|n| n == what || *n == with_latest))
        {
            return Ok(r.clone());
        }
        let hex = what.strip_prefix("sha256:").unwrap_or(what);
        if let Ok(d) = Digest::parse(&format!("sha256:{hex}")) {
            if let Some(r) = all.iter().find(|r| r.answers_to(&d)) {
                return Ok(r.clone());
            }
        }
        if hex.len() >= 4 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let hits: Vec<_> = all
                .iter()
                .filter(|r| r.digest.hex().starts_with(hex))
                .collect();
            match hits.len() {
                1 => return Ok(hits[0].clone()),
                0 => {}
                _ => {
                    let ids: Vec<_> = hits.iter().map(|r| r.short_id().to_string()).collect();
                    return Err(OciError::Ambiguous(what.into(), ids.join(", ")));
                }
            }
        }
        Err(OciError::UnknownImage(what.into()))
    }

    /// Removes an image record and its converted filesystem images; blobs no other image uses go too.
    pub fn remove(&self, what: &str) -> Result<ImageRecord, OciError> {
        let rec = self.find(what)?;
        let p = self.record_path(&rec.digest);
        fs::remove_file(&p).map_err(|e| OciError::io("removing", &p, e))?;
        for fmt in [FsFormat::Ext4, FsFormat::Erofs, FsFormat::ErofsLz4hc] {
            let _ = fs::remove_file(self.rootfs_path(&rec, fmt));
        }
        let keep: std::collections::HashSet<Digest> = self
            .list()?
            .iter()
            .flat_map(|r| r.blob_digests().cloned().collect::<Vec<_>>())
            .collect();
        for d in rec.blob_digests() {
            if !keep.contains(d) {
                let _ = fs::remove_file(self.blob_path(d));
            }
        }
        Ok(rec)
    }

    /// Applies an image's layers, in order, into `dest` (an empty directory), re-verifying every
    /// layer blob's digest as it streams.
    pub fn stage(
        &self,
        rec: &ImageRecord,
        dest: &Path,
        limits: Limits,
    ) -> Result<StageReport, OciError> {
        self.stage_with(rec, dest, limits, &mut |_| {})
    }

    /// [`Store::stage`], reporting each layer as it starts.
    pub fn stage_with(
        &self,
        rec: &ImageRecord,
        dest: &Path,
        limits: Limits,
        progress: &mut dyn FnMut(ConvertStep),
    ) -> Result<StageReport, OciError> {
        let mut stager = Stager::new(dest, limits)?;
        for (i, layer) in rec.layers.iter().enumerate() {
            progress(ConvertStep::Layer {
                index: i,
                count: rec.layers.len(),
                size: layer.size,
            });
            let compression = Compression::from_media_type(&layer.media_type)?;
            tracing::debug!(layer = %layer.digest, i, "applying layer");
            let mut blob = io::BufReader::with_capacity(1 << 16, self.open_blob(layer)?);
            let applied = stager.apply_layer(&mut blob, compression, layer.digest.as_str());
            // A corrupt blob usually breaks the tar too: report the corruption, not its symptom.
            let verified = blob.into_inner().verify();
            verified?;
            applied?;
        }
        stager.finish()
    }

    /// Where the converted filesystem image of `rec` in `format` lives (whether or not it exists).
    pub fn rootfs_path(&self, rec: &ImageRecord, format: FsFormat) -> PathBuf {
        self.root
            .join("rootfs")
            .join(format!("{}.{}", rec.digest.hex(), format.ext()))
    }

    /// The read-only filesystem image of `rec`, converted on first use and cached per digest and
    /// format. The staging tree lives under the store's `tmp/` and is removed afterwards.
    pub fn rootfs(
        &self,
        rec: &ImageRecord,
        format: FsFormat,
        limits: Limits,
    ) -> Result<Rootfs, OciError> {
        self.rootfs_with(rec, format, limits, &mut |_| {})
    }

    /// [`Store::rootfs`], reporting progress.
    pub fn rootfs_with(
        &self,
        rec: &ImageRecord,
        format: FsFormat,
        limits: Limits,
        progress: &mut dyn FnMut(ConvertStep),
    ) -> Result<Rootfs, OciError> {
        let path = self.rootfs_path(rec, format);
        if let Ok(m) = fs::metadata(&path) {
            use std::os::unix::fs::MetadataExt;
            return Ok(Rootfs {
                image: FsImage {
                    path,
                    format,
                    size: m.len(),
                    allocated: m.blocks() * 512,
                },
                report: None,
            });
        }
        let work = self.tempdir("stage-")?;
        // Staging ~10k inodes on the host's disk filesystem is most of a
        // conversion's time (inode allocation); a private directory on tmpfs
        // is several times faster, and only the finished image is kept.
        let shm = staging_on_tmpfs(rec);
        let tree = match &shm {
            Some(d) => d.path().join("root"),
            None => work.path().join("root"),
        };
        fs::create_dir(&tree).map_err(|e| OciError::io("creating", &tree, e))?;
        let t0 = std::time::Instant::now();
        let report = self.stage_with(rec, &tree, limits, progress)?;
        progress(ConvertStep::Mkfs { format });
        let staged = t0.elapsed();
        let tmp_img = work.path().join(format!("image.{}", format.ext()));
        let digest_bytes: Vec<u8> = (0..16)
            .map(|i| u8::from_str_radix(&rec.digest.hex()[2 * i..2 * i + 2], 16).unwrap_or(0))
            .collect();
        let opts = MkfsOptions {
            format,
            uuid: crate::mkfs::uuid_from(&digest_bytes),
            timestamp: REPRODUCIBLE_TIME,
            ownership_preserved: report.ownership_preserved,
        };
        let mut image = crate::mkfs::build(&tree, &tmp_img, &opts)?;
        tracing::info!(
            digest = %rec.digest,
            format = format.ext(),
            entries = report.entries,
            unpack_ms = staged.as_millis() as u64,
            mkfs_ms = (t0.elapsed() - staged).as_millis() as u64,
            size = image.size,
            "root filesystem converted"
        );
        fs::rename(&tmp_img, &path).map_err(|e| OciError::io("storing", &path, e))?;
        image.path = path;
        Ok(Rootfs {
            image,
            report: Some(report),
        })
    }

    fn record_path(&self, d: &Digest) -> PathBuf {
        self.root.join("images").join(format!("{}.json", d.hex()))
    }

    pub(crate) fn save_record(&self, rec: &ImageRecord) -> Result<(), OciError> {
        // A name points at one image: loading it again elsewhere moves it.
        for mut other in self.list()? {
            if other.digest != rec.digest && other.names.iter().any(|n| rec.names.contains(n)) {
                other.names.retain(|n| !rec.names.contains(n));
                self.write_record(&other)?;
            }
        }
        let mut rec = rec.clone();
        if let Ok(old) = fs::read(self.record_path(&rec.digest)) {
            if let Ok(old) = serde_json::from_slice::<ImageRecord>(&old) {
                for n in old.names {
                    if !rec.names.contains(&n) {
                        rec.names.push(n);
                    }
                }
                for d in old.index_digests {
                    if !rec.index_digests.contains(&d) {
                        rec.index_digests.push(d);
                    }
                }
            }
        }
        self.write_record(&rec)
    }

    fn write_record(&self, rec: &ImageRecord) -> Result<(), OciError> {
        let p = self.record_path(&rec.digest);
        let tmp_dir = self.root.join("tmp");
        let mut tmp = tempfile::NamedTempFile::new_in(&tmp_dir)
            .map_err(|e| OciError::io("creating a temporary file in", &tmp_dir, e))?;
        let json = serde_json::to_vec_pretty(rec)
            .map_err(|e| OciError::io("encoding", &p, io::Error::other(e)))?;
        tmp.write_all(&json)
            .map_err(|e| OciError::io("writing", tmp.path(), e))?;
        tmp.persist(&p)
            .map_err(|e| OciError::io("writing image record", &p, e.error))?;
        Ok(())
    }

    /// Imports every linux/amd64 image from an OCI image layout directory, an OCI archive
    /// (`oci-archive:` tar) or a `docker save` tar. Every blob is verified before it is stored.
    pub fn load(&self, path: &Path) -> Result<Vec<ImageRecord>, OciError> {
        let meta = fs::metadata(path).map_err(|e| OciError::io("reading", path, e))?;
        if meta.is_dir() {
            let src = DirSource {
                root: path.to_path_buf(),
            };
            return self.load_from(&src, path);
        }
        let spool = self.tempdir("load-")?;
        let src = spool_archive(path, spool.path())?;
        self.load_from(&src, path)
    }

    fn load_from(&self, src: &dyn Source, path: &Path) -> Result<Vec<ImageRecord>, OciError> {
        if src.has("index.json") {
            self.load_oci(src, path)
        } else if src.has("manifest.json") {
            self.load_docker_save(src, path)
        } else {
            Err(OciError::NotAnImage {
                path: path.to_path_buf(),
                reason: "neither index.json nor manifest.json found".into(),
            })
        }
    }

    fn load_oci(&self, src: &dyn Source, path: &Path) -> Result<Vec<ImageRecord>, OciError> {
        let index: Index = src_json(src, "index.json", path)?;
        let mut found_platforms = Vec::new();
        let mut out = Vec::new();
        for top in index.manifests.iter().take(MAX_IMAGES) {
            let names: Vec<String> = top.annotations.get(REF_NAME).into_iter().cloned().collect();
            let Some(mdesc) = self.resolve_platform(src, path, top, &mut found_platforms, 0)?
            else {
                continue;
            };
            out.push(self.import_manifest(src, path, &mdesc, names)?);
        }
        if out.is_empty() {
            return Err(OciError::NoPlatform {
                path: path.to_path_buf(),
                found: if found_platforms.is_empty() {
                    "no images".into()
                } else {
                    found_platforms.join(", ")
                },
            });
        }
        Ok(out)
    }

    /// Follows (nested) indexes to the linux/amd64 manifest, if any.
    fn resolve_platform(
        &self,
        src: &dyn Source,
        path: &Path,
        desc: &Descriptor,
        found: &mut Vec<String>,
        depth: usize,
    ) -> Result<Option<Descriptor>, OciError> {
        if let Some(p) = &desc.platform {
            if p.os != "linux" || p.architecture != "amd64" {
                found.push(format!("{}/{}", p.os, p.architecture));
                return Ok(None);
            }
        }
        match desc.media_type.as_str() {
            MT_OCI_MANIFEST | MT_DOCKER_MANIFEST => Ok(Some(desc.clone())),
            MT_OCI_INDEX | MT_DOCKER_LIST if depth < 4 => {
                self.import_blob(src, path, desc, "index")?;
                let idx: Index = self.read_json_blob(desc, "image index")?;
                for d in idx.manifests.iter().take(MAX_IMAGES) {
                    if let Some(m) = self.resolve_platform(src, path, d, found, depth + 1)? {
                        return Ok(Some(m));
                    }
                }
                Ok(None)
            }
            other => {
                found.push(format!("unsupported {other}"));
                Ok(None)
            }
        }
    }

    fn import_blob(
        &self,
        src: &dyn Source,
        path: &Path,
        d: &Descriptor,
        what: &'static str,
    ) -> Result<(), OciError> {
        let rel = format!("blobs/sha256/{}", d.digest.hex());
        let r = src.open(&rel).map_err(|_| OciError::MissingBlob {
            digest: d.digest.to_string(),
            what,
            path: path.to_path_buf(),
        })?;
        self.add_blob(r, Some(d))?;
        Ok(())
    }

    fn import_manifest(
        &self,
        src: &dyn Source,
        path: &Path,
        mdesc: &Descriptor,
        names: Vec<String>,
    ) -> Result<ImageRecord, OciError> {
        self.import_blob(src, path, mdesc, "index")?;
        let manifest: Manifest = self.read_json_blob(mdesc, "image manifest")?;
        self.import_blob(src, path, &manifest.config, "manifest")?;
        let config: ConfigFile = self.read_json_blob(&manifest.config, "image config")?;
        check_platform(&config, path)?;
        for l in &manifest.layers {
            Compression::from_media_type(&l.media_type)?;
        }
        for l in &manifest.layers {
            self.import_blob(src, path, l, "manifest")?;
        }
        let rec = ImageRecord {
            digest: mdesc.digest.clone(),
            names,
            config_digest: manifest.config.digest.clone(),
            size: mdesc.size
                + manifest.config.size
                + manifest.layers.iter().map(|l| l.size).sum::<u64>(),
            layers: manifest.layers.clone(),
            config: config.config.unwrap_or_default(),
            index_digests: Vec::new(),
        };
        self.save_record(&rec)?;
        tracing::info!(digest = %rec.digest, names = ?rec.names, "image loaded");
        Ok(rec)
    }

    fn load_docker_save(
        &self,
        src: &dyn Source,
        path: &Path,
    ) -> Result<Vec<ImageRecord>, OciError> {
        let entries: Vec<DockerSaveEntry> = src_json(src, "manifest.json", path)?;
        let mut out = Vec::new();
        for e in entries.iter().take(MAX_IMAGES) {
            let missing = |what: &str| OciError::NotAnImage {
                path: path.to_path_buf(),
                reason: format!("manifest.json names {what}, which is not in the archive"),
            };
            let cfg_reader = src.open(&e.config).map_err(|_| missing(&e.config))?;
            let (config_digest, config_size) = self.add_blob(cfg_reader.take(MAX_JSON), None)?;
            // Docker names the config after its digest: check it when it does.
            let stem = e
                .config
                .trim_start_matches("blobs/sha256/")
                .trim_end_matches(".json");
            if stem.len() == 64 && stem != config_digest.hex() {
                return Err(OciError::DigestMismatch {
                    expected: format!("sha256:{stem}"),
                    expected_size: config_size,
                    actual_digest: config_digest.to_string(),
                    actual_size: config_size,
                });
            }
            let cdesc = Descriptor {
                media_type: MT_OCI_CONFIG.into(),
                digest: config_digest.clone(),
                size: config_size,
                platform: None,
                annotations: BTreeMap::new(),
            };
            let config: ConfigFile = self.read_json_blob(&cdesc, "image config")?;
            check_platform(&config, path)?;
            let diff_ids = config
                .rootfs
                .as_ref()
                .map(|r| r.diff_ids.clone())
                .unwrap_or_default();
            if diff_ids.len() != e.layers.len() {
                return Err(OciError::NotAnImage {
                    path: path.to_path_buf(),
                    reason: format!(
                        "config lists {} layers (rootfs.diff_ids), manifest.json {}",
                        diff_ids.len(),
                        e.layers.len()
                    ),
                });
            }
            let mut layers = Vec::new();
            for (lpath, diff_id) in e.layers.iter().zip(&diff_ids) {
                let mut r = src.open(lpath).map_err(|_| missing(lpath))?;
                let mut magic = [0u8; 4];
                let n =
                    read_up_to(&mut r, &mut magic).map_err(|e| OciError::io("reading", path, e))?;
                let compression = match &magic[..n] {
                    [0x1f, 0x8b, ..] => Compression::Gzip,
                    [0x28, 0xb5, 0x2f, 0xfd] => Compression::Zstd,
                    _ => Compression::None,
                };
                let (digest, size) =
                    self.add_blob(io::Cursor::new(magic[..n].to_vec()).chain(r), None)?;
                // An uncompressed layer's digest is its diff_id: verify it against the config.
                if compression == Compression::None && &digest != diff_id {
                    let _ = fs::remove_file(self.blob_path(&digest));
                    return Err(OciError::DigestMismatch {
                        expected: diff_id.to_string(),
                        expected_size: size,
                        actual_digest: digest.to_string(),
                        actual_size: size,
                    });
                }
                layers.push(Descriptor {
                    media_type: match compression {
                        Compression::None => MT_LAYER_TAR.into(),
                        Compression::Gzip => format!("{MT_LAYER_TAR}+gzip"),
                        Compression::Zstd => format!("{MT_LAYER_TAR}+zstd"),
                    },
                    digest,
                    size,
                    platform: None,
                    annotations: BTreeMap::new(),
                });
            }
            // The image's identity is the OCI manifest docker would have pushed.
            let manifest = Manifest {
                schema_version: 2,
                media_type: Some(MT_OCI_MANIFEST.into()),
                config: cdesc,
                layers,
            };
            let mbytes = serde_json::to_vec(&manifest)
                .map_err(|e| OciError::io("encoding manifest for", path, io::Error::other(e)))?;
            let (mdigest, msize) = self.add_blob(&mbytes[..], None)?;
            let mdesc = Descriptor {
                media_type: MT_OCI_MANIFEST.into(),
                digest: mdigest,
                size: msize,
                platform: None,
                annotations: BTreeMap::new(),
            };
            let names = e.repo_tags.clone().unwrap_or_default();
            let rec = ImageRecord {
                digest: mdesc.digest.clone(),
                names,
                config_digest,
                size: msize + config_size + manifest.layers.iter().map(|l| l.size).sum::<u64>(),
                layers: manifest.layers,
                config: config.config.unwrap_or_default(),
                index_digests: Vec::new(),
            };
            self.save_record(&rec)?;
            tracing::info!(digest = %rec.digest, names = ?rec.names, "image loaded (docker save)");
            out.push(rec);
        }
        if out.is_empty() {
            return Err(OciError::NotAnImage {
                path: path.to_path_buf(),
                reason: "manifest.json lists no images".into(),
            });
        }
        Ok(out)
    }
}

fn read_up_to(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

pub(crate) fn check_platform(config: &ConfigFile, path: &Path) -> Result<(), OciError> {
    let os_ok = config.os.is_empty() || config.os == "linux";
    let arch_ok = config.architecture.is_empty() || config.architecture == "amd64";
    if os_ok && arch_ok {
        return Ok(());
    }
    Err(OciError::NoPlatform {
        path: path.to_path_buf(),
        found: format!("{}/{}", config.os, config.architecture),
    })
}

/// What [`Store::prune`] removed (or would remove).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    /// Blob digests (hex) no image owns.
    pub blobs: Vec<String>,
    /// Converted filesystem images of removed images.
    pub rootfs: Vec<PathBuf>,
    /// Orphaned filesystem images kept because something may still use them.
    pub kept: Vec<PathBuf>,
    /// Stale entries of `tmp/`.
    pub tmp: Vec<PathBuf>,
    /// Unowned blobs younger than an hour, kept (a pull or load may be storing them).
    pub young: usize,
    /// Bytes freed (blobs and filesystem images).
    pub freed_bytes: u64,
}

/// A blob arriving in pieces (e.g. from a registry), hashed as it is written and refused as soon
/// as it grows past its descriptor's size; [`BlobWriter::commit`] stores it only if the digest
/// matches. Dropped uncommitted, nothing is kept.
pub struct BlobWriter {
    out: io::BufWriter<tempfile::NamedTempFile>,
    hasher: sha2::Sha256,
    count: u64,
    expected: Descriptor,
    dest: PathBuf,
}

impl BlobWriter {
    /// Appends a piece.
    pub fn write(&mut self, buf: &[u8]) -> Result<(), OciError> {
        let n = buf.len() as u64;
        if self.count.saturating_add(n) > self.expected.size {
            return Err(OciError::DigestMismatch {
                expected: self.expected.digest.to_string(),
                expected_size: self.expected.size,
                actual_digest: "(not hashed: longer than promised)".into(),
                actual_size: self.count.saturating_add(n),
            });
        }
        sha2::Digest::update(&mut self.hasher, buf);
        self.count += n;
        self.out
            .write_all(buf)
            .map_err(|e| OciError::io("writing blob", self.out.get_ref().path(), e))
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.count
    }

    /// Checks digest and size, then moves the blob into place.
    pub fn commit(self) -> Result<(Digest, u64), OciError> {
        let digest = Digest::from_sha256(&sha2::Digest::finalize(self.hasher));
        if digest != self.expected.digest || self.count != self.expected.size {
            return Err(OciError::DigestMismatch {
                expected: self.expected.digest.to_string(),
                expected_size: self.expected.size,
                actual_digest: digest.to_string(),
                actual_size: self.count,
            });
        }
        let tmp = self.out.into_inner().map_err(|e| {
            OciError::io("writing blob", PathBuf::from("(temporary)"), e.into_error())
        })?;
        if !self.dest.exists() {
            tmp.as_file()
                .sync_all()
                .map_err(|e| OciError::io("syncing", tmp.path(), e))?;
            tmp.persist(&self.dest)
                .map_err(|e| OciError::io("storing blob", &self.dest, e.error))?;
        }
        Ok((digest, self.count))
    }
}

/// A stored blob being read; [`VerifiedBlob::verify`] after reading to the end checks its digest.
pub struct VerifiedBlob {
    inner: HashingReader<io::Take<File>>,
    expected: Descriptor,
}

impl VerifiedBlob {
    /// Reads what is left and checks digest and size: a store tampered with after load is refused.
    pub fn verify(mut self) -> Result<(), OciError> {
        io::copy(&mut self.inner, &mut io::sink())
            .map_err(|e| OciError::io("reading blob", self.expected.digest.to_string(), e))?;
        let (digest, size) = self.inner.finish();
        if digest != self.expected.digest || size != self.expected.size {
            return Err(OciError::DigestMismatch {
                expected: self.expected.digest.to_string(),
                expected_size: self.expected.size,
                actual_digest: digest.to_string(),
                actual_size: size,
            });
        }
        Ok(())
    }
}

impl Read for VerifiedBlob {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

/// Where an image's files come from: a layout directory or a spooled archive.
trait Source {
    fn has(&self, rel: &str) -> bool;
    fn open(&self, rel: &str) -> io::Result<Box<dyn Read>>;
}

fn parse_json<T: serde::de::DeserializeOwned>(
    mut r: Box<dyn Read>,
    rel: &str,
    path: &Path,
) -> Result<T, OciError> {
    let mut buf = Vec::new();
    r.by_ref()
        .take(MAX_JSON + 1)
        .read_to_end(&mut buf)
        .map_err(|e| OciError::io("reading", path.join(rel), e))?;
    if buf.len() as u64 > MAX_JSON {
        return Err(OciError::LimitExceeded {
            what: "a JSON document",
            limit: MAX_JSON,
            field: "(fixed)",
            context: rel.to_string(),
        });
    }
    serde_json::from_slice(&buf).map_err(|e| OciError::BadJson {
        what: "document",
        path: path.join(rel),
        reason: e.to_string(),
    })
}

fn src_json<T: serde::de::DeserializeOwned>(
    src: &dyn Source,
    rel: &str,
    path: &Path,
) -> Result<T, OciError> {
    let r = src
        .open(rel)
        .map_err(|e| OciError::io("opening", path.join(rel), e))?;
    parse_json(r, rel, path)
}

struct DirSource {
    root: PathBuf,
}

/// Relative paths inside a layout must be plain (no `..`, not absolute).
fn plain_rel(rel: &str) -> Option<PathBuf> {
    let comps = crate::unpack::sanitize_path(rel.as_bytes(), 4096).ok()?;
    if comps.is_empty() {
        return None;
    }
    Some(comps.iter().collect())
}

impl Source for DirSource {
    fn has(&self, rel: &str) -> bool {
        plain_rel(rel).is_some_and(|p| self.root.join(p).is_file())
    }
    fn open(&self, rel: &str) -> io::Result<Box<dyn Read>> {
        let p = plain_rel(rel).ok_or_else(|| io::Error::other("bad path"))?;
        Ok(Box::new(File::open(self.root.join(p))?))
    }
}

/// An archive's regular files, copied to numbered files in a spool directory.
struct SpoolSource {
    files: BTreeMap<String, PathBuf>,
}

impl Source for SpoolSource {
    fn has(&self, rel: &str) -> bool {
        self.files.contains_key(rel)
    }
    fn open(&self, rel: &str) -> io::Result<Box<dyn Read>> {
        let p = self
            .files
            .get(rel)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(Box::new(File::open(p)?))
    }
}

/// Copies the regular files of an (untrusted) image archive into `spool` under numbered names,
/// so no archive path is ever used on the host.
fn spool_archive(path: &Path, spool: &Path) -> Result<SpoolSource, OciError> {
    let f = File::open(path).map_err(|e| OciError::io("opening", path, e))?;
    let mut ar = tar::Archive::new(io::BufReader::new(f));
    let not_tar = |e: io::Error| OciError::NotAnImage {
        path: path.to_path_buf(),
        reason: format!("not a readable tar: {e}"),
    };
    let mut files = BTreeMap::new();
    for (i, ent) in ar.entries().map_err(not_tar)?.enumerate() {
        let mut ent = ent.map_err(not_tar)?;
        if !matches!(
            ent.header().entry_type(),
            tar::EntryType::Regular | tar::EntryType::Continuous
        ) {
            continue;
        }
        if files.len() >= MAX_ARCHIVE_FILES {
            return Err(OciError::NotAnImage {
                path: path.to_path_buf(),
                reason: format!("more than {MAX_ARCHIVE_FILES} files"),
            });
        }
        let raw = ent.path_bytes().into_owned();
        let Some(rel) = std::str::from_utf8(&raw).ok().and_then(plain_rel) else {
            continue;
        };
        let Some(key) = rel.to_str().map(str::to_owned) else {
            continue;
        };
        let dest = spool.join(format!("{i}"));
        let mut out = File::create(&dest).map_err(|e| OciError::io("spooling to", &dest, e))?;
        io::copy(&mut ent, &mut out).map_err(not_tar)?;
        files.insert(key, dest);
    }
    Ok(SpoolSource { files })
}

/// Where a staging tree fits in memory: `/dev/shm` when it is a tmpfs and
/// the tree's estimate (4x the layers' compressed size: uncompressed sizes
/// are unknown until unpacked, and gzip rarely exceeds 4x) is at most a
/// quarter of its free space.
/// `CAPSA_STAGING=disk` keeps staging in the store (to compare, or on hosts
/// whose `/dev/shm` is small).
fn staging_on_tmpfs(rec: &ImageRecord) -> Option<tempfile::TempDir> {
    if std::env::var_os("CAPSA_STAGING").is_some_and(|v| v == "disk") {
        return None;
    }
    let shm = Path::new("/dev/shm");
    let st = rustix::fs::statfs(shm).ok()?;
    // TMPFS_MAGIC from linux/magic.h.
    if st.f_type as i64 != 0x0102_1994 {
        return None;
    }
    let free = (st.f_bavail as u64).saturating_mul(st.f_bsize as u64);
    let compressed: u64 = rec.layers.iter().map(|l| l.size).sum();
    let estimate = compressed.saturating_mul(4);
    if estimate.saturating_mul(4) > free {
        tracing::debug!(free, estimate, "staging on disk: /dev/shm is too small");
        return None;
    }
    // A random name and mode 0700 (tempfile's) in the sticky, shared /dev/shm.
    tempfile::Builder::new()
        .prefix("capsa-stage-")
        .tempdir_in(shm)
        .ok()
}
