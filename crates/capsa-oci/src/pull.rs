//! Pulling images from an OCI distribution registry into the [`Store`].
//!
//! The registry is untrusted: every document and blob is stored only after its sha256 and size
//! match what the reference (or the manifest that named it) promised, and a blob is refused the
//! moment it grows past its promised size. Blobs already in the store are never downloaded
//! again; a pull by digest of an image already present asks no registry at all, and a pull by
//! tag costs one `HEAD` of the manifest (as Docker does) unless `offline` is set.

use std::io::Read;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;

use crate::error::OciError;
use crate::spec::{
    Compression, ConfigFile, Descriptor, Digest, Index, Manifest, MT_DOCKER_LIST,
    MT_DOCKER_MANIFEST, MT_OCI_INDEX, MT_OCI_MANIFEST,
};
use crate::store::{check_platform, ImageRecord, Store};

/// Largest manifest or index accepted from a registry.
const MAX_MANIFEST: usize = 4 << 20;
/// Largest `~/.docker/config.json` read.
const MAX_DOCKER_CONFIG: u64 = 1 << 20;
/// Longest image reference accepted.
const MAX_REFERENCE: usize = 1024;

const ACCEPT: &[&str] = &[
    MT_OCI_MANIFEST,
    MT_OCI_INDEX,
    MT_DOCKER_MANIFEST,
    MT_DOCKER_LIST,
];

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Registries (`host` or `host:port`) spoken to over plain HTTP although not on loopback.
    /// Loopback registries (127.0.0.0/8, ::1, localhost) always may use plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Never contact a registry: the reference must already be in the store (by digest, or by a
    /// name it was pulled under).
    pub offline: bool,
    /// Docker's client config with credentials; default `$DOCKER_CONFIG/config.json`, else
    /// `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    /// Largest single blob (compressed layer) accepted.
    pub max_blob_bytes: u64,
    /// Largest image (sum of its blobs) accepted.
    pub max_image_bytes: u64,
    /// Layers downloaded at once.
    pub concurrency: usize,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            insecure_registries: Vec::new(),
            offline: false,
            docker_config: None,
            max_blob_bytes: 16 << 30,
            max_image_bytes: 64 << 30,
            concurrency: 3,
        }
    }
}

/// What a pull is doing, for progress displays.
#[derive(Debug, Clone)]
pub enum PullEvent {
    /// The manifest is known; `download_bytes` of `layers` layers still have to come.
    Resolved {
        /// Manifest digest.
        digest: Digest,
        /// Layers in the image.
        layers: usize,
        /// Layers already in the store.
        cached_layers: usize,
        /// Bytes still to download.
        download_bytes: u64,
    },
    /// Bytes of a blob arrived.
    Bytes(u64),
    /// A blob is verified and stored.
    BlobDone {
        /// Its digest.
        digest: Digest,
    },
}

/// The result of a pull.
#[derive(Debug, Clone)]
pub struct PullOutcome {
    /// The image in the store.
    pub record: ImageRecord,
    /// Nothing was downloaded but (at most) the manifest's digest.
    pub cached: bool,
    /// Whether a registry was contacted.
    pub asked_registry: bool,
    /// Blob bytes downloaded.
    pub downloaded_bytes: u64,
}

/// A parsed image reference and the names it is stored under.
#[derive(Debug, Clone)]
pub struct ImageRef {
    inner: Reference,
    /// Names the image is recorded under (as typed, with `:latest` added, and the canonical form).
    pub names: Vec<String>,
}

impl ImageRef {
    /// Parses `[REGISTRY/]REPOSITORY[:TAG][@DIGEST]` (Docker's rules: no registry means docker.io).
    pub fn parse(s: &str) -> Result<Self, OciError> {
        let bad = |reason: String| OciError::BadReference {
            reference: s.chars().take(200).collect(),
            reason,
        };
        if s.len() > MAX_REFERENCE {
            return Err(bad(format!("longer than {MAX_REFERENCE} bytes")));
        }
        // Parsed by hand: oci-spec's parser compiles a large regex first (~100 ms), which
        // would dominate a cached pull.
        let (registry, repository, tag, digest) = split_reference(s).map_err(bad)?;
        let inner = match (tag, digest) {
            (Some(t), Some(d)) => Reference::with_tag_and_digest(registry, repository, t, d),
            (None, Some(d)) => Reference::with_digest(registry, repository, d),
            (t, None) => {
                Reference::with_tag(registry, repository, t.unwrap_or_else(|| "latest".into()))
            }
        };
        // Names come from what was typed: oci-spec fills in "latest" on its own.
        let base = s.split('@').next().unwrap_or(s);
        let typed_tag = base
            .rsplit('/')
            .next()
            .is_some_and(|last| last.contains(':'));
        let mut names = Vec::new();
        if typed_tag || !s.contains('@') {
            let typed = if typed_tag {
                base.to_string()
            } else {
                format!("{base}:latest")
            };
            let tag = inner.tag().unwrap_or("latest");
            let canonical = format!("{}/{}:{}", inner.registry(), inner.repository(), tag);
            names.push(typed);
            if !names.contains(&canonical) {
                names.push(canonical);
            }
        }
        Ok(ImageRef { inner, names })
    }

    /// The registry host (`host[:port]`) spoken to.
    pub fn registry(&self) -> &str {
        self.inner.resolve_registry()
    }

    /// The digest in the reference, if any.
    pub fn digest(&self) -> Option<Digest> {
        self.inner.digest().and_then(|d| Digest::parse(d).ok())
    }

    fn pinned(&self, d: &Digest) -> Reference {
        Reference::with_digest(
            self.inner.registry().to_string(),
            self.inner.repository().to_string(),
            d.to_string(),
        )
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.inner.whole())
    }
}

/// Splits `[REGISTRY/]PATH[:TAG][@DIGEST]` with Docker's rules: the first component is a registry
/// only if it has a `.` or `:` or is `localhost`; otherwise the registry is docker.io, where a
/// one-component path gets `library/`.
fn split_reference(s: &str) -> Result<(String, String, Option<String>, Option<String>), String> {
    let (name_tag, digest) = match s.split_once('@') {
        Some((n, d)) => {
            Digest::parse(d).map_err(|_| format!("{d:?} is not a sha256 digest"))?;
            (n, Some(d.to_string()))
        }
        None => (s, None),
    };
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => (
            &name_tag[..last_slash + i],
            Some(name_tag[last_slash + i + 1..].to_string()),
        ),
        None => (name_tag, None),
    };
    if let Some(t) = &tag {
        let ok = !t.is_empty()
            && t.len() <= 128
            && t.as_bytes()[0] != b'.'
            && t.as_bytes()[0] != b'-'
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !ok {
            return Err(format!("bad tag {t:?}"));
        }
    }
    let (registry, path) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first.to_string(), rest.to_string())
        }
        _ => ("docker.io".to_string(), name.to_string()),
    };
    let reg_ok = !registry.is_empty()
        && registry
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    if !reg_ok {
        return Err(format!("bad registry {registry:?}"));
    }
    let comp_ok = |c: &str| {
        !c.is_empty()
            && c.as_bytes()[0].is_ascii_alphanumeric()
            && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
            && c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    };
    if path.is_empty() || path.len() > 255 || !path.split('/').all(comp_ok) {
        return Err(format!(
            "bad repository {path:?} (lowercase letters, digits and . _ - between them)"
        ));
    }
    let path = if registry == "docker.io" && !path.contains('/') {
        format!("library/{path}")
    } else {
        path
    };
    Ok((registry, path, tag, digest))
}

/// The host part of `host[:port]` (IPv6 in brackets).
fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match registry.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => registry,
    }
}

/// Whether plain HTTP may be used with `registry`: only on loopback, or when the user named it.
pub fn plain_http_allowed(registry: &str, insecure: &[String]) -> bool {
    let host = host_of(registry);
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    loopback
        || insecure
            .iter()
            .any(|i| i.eq_ignore_ascii_case(registry) || i.eq_ignore_ascii_case(host))
}

#[derive(Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, DockerAuth>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

impl DockerAuth {
    fn has_credentials(&self) -> bool {
        let set = |v: &Option<String>| v.as_deref().is_some_and(|s| !s.is_empty());
        set(&self.auth) || set(&self.registrytoken) || (set(&self.username) && set(&self.password))
    }
}

const DOCKER_HUB: &[&str] = &["docker.io", "index.docker.io", "registry-1.docker.io"];

/// Largest answer read from a credential helper.
const MAX_HELPER_OUTPUT: u64 = 64 * 1024;
/// How long a credential helper may take (it may prompt a keychain).
const HELPER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What a credential helper's `get` prints.
#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// Asks `docker-credential-<name> get` for `registry`'s credentials (Docker's
/// credential helper protocol: the server on stdin, JSON on stdout). A
/// helper that knows no credentials for it means an anonymous pull.
fn credential_helper(
    name: &str,
    registry: &str,
    search_path: Option<std::ffi::OsString>,
) -> Result<RegistryAuth, OciError> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let fail = |reason: String, fix: &'static str| OciError::CredentialHelper {
        helper: name.chars().take(64).collect(),
        registry: registry.to_string(),
        reason,
        fix,
    };
    // The name comes from a config file: it must not smuggle a path.
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        || name.starts_with('.')
    {
        return Err(fail(
            "the helper name is not a plain program name".into(),
            "name a helper of letters, digits, '-', '_' or '.' in ~/.docker/config.json",
        ));
    }
    let program = format!("docker-credential-{name}");
    let found = search_path
        .as_deref()
        .map(std::env::split_paths)
        .into_iter()
        .flatten()
        .take(256)
        .map(|d| d.join(&program))
        .find(|p| p.is_file());
    let Some(path) = found else {
        return Err(fail(
            format!("{program} is not on PATH"),
            "install the helper, or remove credsStore/credHelpers from ~/.docker/config.json",
        ));
    };
    // Docker Hub's helpers store under Docker's legacy server URL.
    let server = if DOCKER_HUB.contains(&registry) {
        "https://index.docker.io/v1/".to_string()
    } else {
        registry.to_string()
    };
    let mut child = Command::new(&path)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            fail(
                format!("starting {}: {e}", path.display()),
                "check the helper is executable",
            )
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading is judged by its answer below.
        let _ = stdin.write_all(server.as_bytes());
    }
    let read = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(r) = r {
                let _ = r.take(MAX_HELPER_OUTPUT).read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = read(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = read(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = std::time::Instant::now() + HELPER_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(
                    format!("no answer within {} s", HELPER_TIMEOUT.as_secs()),
                    "unlock the credential store, or check the helper by hand: echo REGISTRY | docker-credential-NAME get",
                ));
            }
            Err(e) => return Err(fail(format!("waiting: {e}"), "check the helper by hand")),
        }
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    if !status.success() {
        let msg = String::from_utf8_lossy(&err)
            .trim()
            .chars()
            .take(300)
            .collect::<String>();
        let stdout = String::from_utf8_lossy(&out);
        // The helpers' own wording for "no credentials for this server".
        if msg.contains("credentials not found") || stdout.contains("credentials not found") {
            return Ok(RegistryAuth::Anonymous);
        }
        return Err(fail(
            format!("exited with {status}: {msg}"),
            "check the helper by hand: echo REGISTRY | docker-credential-NAME get",
        ));
    }
    let a: HelperAnswer = serde_json::from_slice(&out).map_err(|e| {
        fail(
            format!("its answer is not the helper protocol's JSON ({e})"),
            "check the helper by hand: echo REGISTRY | docker-credential-NAME get",
        )
    })?;
    Ok(match (a.username.as_str(), a.secret) {
        (_, s) if s.is_empty() => RegistryAuth::Anonymous,
        // Docker's marker for an identity token rather than a password.
        ("<token>", s) => RegistryAuth::Bearer(s),
        (u, s) => RegistryAuth::Basic(u.to_string(), s),
    })
}

/// Normalizes an `auths` key (`https://index.docker.io/v1/`, `host:port`) to `host[:port]`.
fn auth_key_host(k: &str) -> &str {
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    k.split('/').next().unwrap_or(k)
}

/// Credentials for `registry` from Docker's config file; anonymous when there are none.
///
/// As Docker does: `credHelpers[registry]` first, then an `auths` entry that
/// holds credentials, then `credsStore`; a helper is the program
/// `docker-credential-<name>` on `PATH`, asked with `get`.
pub fn docker_credentials(
    registry: &str,
    config: Option<&std::path::Path>,
) -> Result<RegistryAuth, OciError> {
    docker_credentials_in(registry, config, std::env::var_os("PATH"))
}

/// [`docker_credentials`] with the helpers looked up in `search_path`.
fn docker_credentials_in(
    registry: &str,
    config: Option<&std::path::Path>,
    search_path: Option<std::ffi::OsString>,
) -> Result<RegistryAuth, OciError> {
    let path = match config {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
            Some(d) => PathBuf::from(d).join("config.json"),
            None => match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
                Some(h) => PathBuf::from(h).join(".docker/config.json"),
                None => return Ok(RegistryAuth::Anonymous),
            },
        },
    };
    let f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RegistryAuth::Anonymous),
        Err(e) => return Err(OciError::io("reading credentials", &path, e)),
    };
    let mut buf = Vec::new();
    f.take(MAX_DOCKER_CONFIG + 1)
        .read_to_end(&mut buf)
        .map_err(|e| OciError::io("reading credentials", &path, e))?;
    if buf.len() as u64 > MAX_DOCKER_CONFIG {
        return Err(OciError::LimitExceeded {
            what: "the Docker config file",
            limit: MAX_DOCKER_CONFIG,
            field: "(fixed)",
            context: path.display().to_string(),
        });
    }
    let cfg: DockerConfig = serde_json::from_slice(&buf).map_err(|e| OciError::BadJson {
        what: "Docker config (credentials)",
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let is_hub = DOCKER_HUB.contains(&registry);
    let helper_for = cfg.cred_helpers.iter().find(|(k, _)| {
        let h = auth_key_host(k);
        h.eq_ignore_ascii_case(registry) || (is_hub && DOCKER_HUB.contains(&h))
    });
    if let Some((_, helper)) = helper_for {
        return credential_helper(helper, registry, search_path);
    }
    let entry = cfg.auths.iter().find(|(k, a)| {
        let h = auth_key_host(k);
        let named = h.eq_ignore_ascii_case(registry) || (is_hub && DOCKER_HUB.contains(&h));
        // With a credsStore, `auths` entries are often empty placeholders.
        named && (cfg.creds_store.is_none() || a.has_credentials())
    });
    let Some((_, a)) = entry else {
        return match cfg.creds_store.as_deref().filter(|s| !s.is_empty()) {
            Some(store) => credential_helper(store, registry, search_path),
            None => Ok(RegistryAuth::Anonymous),
        };
    };
    if let Some(t) = a.registrytoken.as_ref().filter(|t| !t.is_empty()) {
        return Ok(RegistryAuth::Bearer(t.clone()));
    }
    if let (Some(u), Some(p)) = (&a.username, &a.password) {
        return Ok(RegistryAuth::Basic(u.clone(), p.clone()));
    }
    if let Some(enc) = a.auth.as_ref().filter(|x| !x.is_empty()) {
        use base64::Engine as _;
        let bad = |reason: &str| OciError::BadJson {
            what: "Docker config (credentials)",
            path: path.clone(),
            reason: format!("auths[{registry}].auth {reason}"),
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(enc.trim())
            .map_err(|_| bad("is not base64"))?;
        let s = String::from_utf8(raw).map_err(|_| bad("is not UTF-8"))?;
        let (u, p) = s
            .split_once(':')
            .ok_or_else(|| bad("is not base64 of user:password"))?;
        return Ok(RegistryAuth::Basic(u.to_string(), p.to_string()));
    }
    Ok(RegistryAuth::Anonymous)
}

struct Remote<'a> {
    client: Client,
    auth: RegistryAuth,
    image: &'a ImageRef,
}

impl Remote<'_> {
    fn err(&self, e: OciDistributionError) -> OciError {
        let registry = self.image.registry().to_string();
        let fix = match &e {
            OciDistributionError::AuthenticationFailure(_)
            | OciDistributionError::UnauthorizedError { .. } => format!(
                "log in: put credentials for {registry} in ~/.docker/config.json (`docker login {registry}`, \
                 or an \"auths\" entry with \"auth\": base64 of user:password)"
            ),
            OciDistributionError::ImageManifestNotFoundError(_) => {
                "check the repository and tag exist (`skopeo list-tags docker://REPO`)".into()
            }
            OciDistributionError::DigestError(_) => {
                "the registry served content that does not match its digest; nothing was kept; \
                 try again, and report it to the registry's operator if it persists"
                    .into()
            }
            OciDistributionError::RequestError(_) => format!(
                "check the registry address and network; capsa speaks HTTPS except to loopback \
                 registries: for a plain-HTTP registry elsewhere pass --insecure-registry {}",
                host_of(&registry)
            ),
            _ => "check the reference and the registry".into(),
        };
        let mut reason = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            reason.push_str(&format!(": {s}"));
            src = s.source();
        }
        OciError::Registry {
            reference: self.image.to_string(),
            registry,
            reason,
            fix,
        }
    }

    /// Fetches a manifest or index by reference, bounded, hashed by us.
    async fn document(&self, r: &Reference) -> Result<(Vec<u8>, Digest), OciError> {
        let (body, _) = self
            .client
            .pull_manifest_raw(r, &self.auth, ACCEPT)
            .await
            .map_err(|e| self.err(e))?;
        if body.len() > MAX_MANIFEST {
            return Err(OciError::LimitExceeded {
                what: "a manifest",
                limit: MAX_MANIFEST as u64,
                field: "(fixed)",
                context: r.whole(),
            });
        }
        let d = Digest::of(&body);
        if let Some(want) = r.digest() {
            if want != d.as_str() {
                return Err(OciError::DigestMismatch {
                    expected: want.to_string(),
                    expected_size: body.len() as u64,
                    actual_digest: d.to_string(),
                    actual_size: body.len() as u64,
                });
            }
        }
        Ok((body.to_vec(), d))
    }

    /// Streams one blob into the store, verified; returns the bytes downloaded.
    async fn blob(
        &self,
        store: &Store,
        desc: &Descriptor,
        progress: &(dyn Fn(PullEvent) + Send + Sync),
    ) -> Result<u64, OciError> {
        let od = OciDescriptor {
            media_type: desc.media_type.clone(),
            digest: desc.digest.to_string(),
            size: i64::try_from(desc.size).unwrap_or(i64::MAX),
            ..Default::default()
        };
        let mut stream = self
            .client
            .pull_blob_stream(&self.image.inner, &od)
            .await
            .map_err(|e| self.err(e))?;
        if let Some(len) = stream.content_length {
            if len > desc.size {
                return Err(OciError::DigestMismatch {
                    expected: desc.digest.to_string(),
                    expected_size: desc.size,
                    actual_digest: "(not downloaded: the registry announced more bytes)".into(),
                    actual_size: len,
                });
            }
        }
        let mut w = store.blob_writer(desc)?;
        loop {
            match stream.try_next().await {
                Ok(Some(chunk)) => {
                    w.write(&chunk)?;
                    progress(PullEvent::Bytes(chunk.len() as u64));
                }
                Ok(None) => break,
                Err(e) => {
                    // oci-client checks the digest too; report the mismatch in our words.
                    if w.written() == desc.size {
                        w.commit()?;
                    }
                    return Err(OciError::Registry {
                        reference: self.image.to_string(),
                        registry: self.image.registry().to_string(),
                        reason: format!("downloading blob {}: {e}", desc.digest),
                        fix: "try again; nothing was kept".into(),
                    });
                }
            }
        }
        let (_, n) = w.commit()?;
        progress(PullEvent::BlobDone {
            digest: desc.digest.clone(),
        });
        Ok(n)
    }
}

/// An image is usable from the store when its record and every blob are there.
fn complete(store: &Store, rec: &ImageRecord) -> bool {
    store.has_blob(&rec.digest)
        && store.has_blob(&rec.config_digest)
        && rec.layers.iter().all(|l| store.has_blob(&l.digest))
}

fn cached_by_digest(store: &Store, d: &Digest) -> Result<Option<ImageRecord>, OciError> {
    Ok(store.find_digest(d)?.filter(|r| complete(store, r)))
}

/// Pulls `reference` into `store`. See the module documentation for what is verified and cached.
pub async fn pull(
    store: &Store,
    reference: &str,
    opts: &PullOptions,
    progress: &(dyn Fn(PullEvent) + Send + Sync),
) -> Result<PullOutcome, OciError> {
    let image = ImageRef::parse(reference)?;
    let cached = |rec: ImageRecord, asked_registry: bool| -> Result<PullOutcome, OciError> {
        let record = store.add_name(&rec, &image.names)?;
        Ok(PullOutcome {
            record,
            cached: true,
            asked_registry,
            downloaded_bytes: 0,
        })
    };
    if let Some(d) = image.digest() {
        if let Some(rec) = cached_by_digest(store, &d)? {
            return cached(rec, false);
        }
    }
    if opts.offline {
        if image.digest().is_none() {
            for n in &image.names {
                if let Ok(rec) = store.find(n) {
                    if complete(store, &rec) {
                        return cached(rec, false);
                    }
                }
            }
        }
        return Err(OciError::NotCached(reference.to_string()));
    }

    let _ = rustls::crypto::ring::default_provider().install_default();
    let registry = image.registry().to_string();
    let protocol = if plain_http_allowed(&registry, &opts.insecure_registries) {
        ClientProtocol::HttpsExcept(vec![registry.clone()])
    } else {
        ClientProtocol::Https
    };
    let config = ClientConfig {
        protocol,
        connect_timeout: Some(Duration::from_secs(15)),
        read_timeout: Some(Duration::from_secs(120)),
        ..Default::default()
    };
    let remote = Remote {
        client: Client::new(config),
        auth: docker_credentials(&registry, opts.docker_config.as_deref())?,
        image: &image,
    };
    tracing::debug!(%image, auth = ?remote.auth, "pulling");
    remote
        .client
        .auth(
            &image.inner,
            &remote.auth,
            oci_client::RegistryOperation::Pull,
        )
        .await
        .map_err(|e| remote.err(e))?;

    // Resolve a tag to a digest with one HEAD, and pin everything after it to that digest.
    let top = match image.digest() {
        Some(d) => d,
        None => {
            let d = remote
                .client
                .fetch_manifest_digest(&image.inner, &remote.auth)
                .await
                .map_err(|e| remote.err(e))?;
            let d = Digest::parse(&d)?;
            if let Some(rec) = cached_by_digest(store, &d)? {
                return cached(rec, true);
            }
            d
        }
    };

    let (mut body, mut mdigest) = remote.document(&image.pinned(&top)).await?;
    let mut index_digests = Vec::new();
    let mut depth = 0;
    loop {
        let head: MediaTypeOnly = serde_json::from_slice(&body).map_err(|e| OciError::BadJson {
            what: "manifest from the registry",
            path: PathBuf::from(image.to_string()),
            reason: e.to_string(),
        })?;
        let is_index = matches!(
            head.media_type.as_deref(),
            Some(MT_OCI_INDEX | MT_DOCKER_LIST)
        ) || (head.media_type.is_none() && head.manifests.is_some());
        if !is_index {
            break;
        }
        if depth >= 4 {
            return Err(OciError::BadRequest {
                what: "image index",
                reason: "indexes nested more than 4 deep".into(),
                fix: "use a reference to a single-platform manifest",
            });
        }
        depth += 1;
        store.add_blob(
            &body[..],
            Some(&desc_of(MT_OCI_INDEX, &mdigest, body.len())),
        )?;
        index_digests.push(mdigest.clone());
        let index: Index = serde_json::from_slice(&body).map_err(|e| OciError::BadJson {
            what: "image index from the registry",
            path: PathBuf::from(image.to_string()),
            reason: e.to_string(),
        })?;
        let pick = index.manifests.iter().take(256).find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        });
        let Some(pick) = pick else {
            let found: Vec<String> = index
                .manifests
                .iter()
                .take(32)
                .filter_map(|m| m.platform.as_ref())
                .map(|p| format!("{}/{}", p.os, p.architecture))
                .collect();
            return Err(OciError::NoPlatform {
                path: PathBuf::from(image.to_string()),
                found: if found.is_empty() {
                    "no platforms listed".into()
                } else {
                    found.join(", ")
                },
            });
        };
        if let Some(rec) = cached_by_digest(store, &pick.digest)? {
            let mut rec = rec;
            rec.index_digests.extend(index_digests);
            store.save_record(&rec)?;
            return cached(rec, true);
        }
        let (b, d) = remote.document(&image.pinned(&pick.digest)).await?;
        if b.len() as u64 != pick.size {
            return Err(OciError::DigestMismatch {
                expected: pick.digest.to_string(),
                expected_size: pick.size,
                actual_digest: d.to_string(),
                actual_size: b.len() as u64,
            });
        }
        body = b;
        mdigest = d;
    }

    let manifest: Manifest = serde_json::from_slice(&body).map_err(|e| OciError::BadJson {
        what: "image manifest from the registry",
        path: PathBuf::from(image.to_string()),
        reason: e.to_string(),
    })?;
    for l in &manifest.layers {
        Compression::from_media_type(&l.media_type)?;
    }
    let mut total = body.len() as u64;
    for d in manifest
        .layers
        .iter()
        .chain(std::iter::once(&manifest.config))
    {
        if d.size > opts.max_blob_bytes {
            return Err(OciError::LimitExceeded {
                what: "a blob",
                limit: opts.max_blob_bytes,
                field: "max_blob_bytes",
                context: format!("{} in {image}", d.digest),
            });
        }
        total = total.saturating_add(d.size);
    }
    if total > opts.max_image_bytes {
        return Err(OciError::LimitExceeded {
            what: "the image",
            limit: opts.max_image_bytes,
            field: "max_image_bytes",
            context: image.to_string(),
        });
    }
    if manifest.config.size > MAX_MANIFEST as u64 {
        return Err(OciError::LimitExceeded {
            what: "an image config",
            limit: MAX_MANIFEST as u64,
            field: "(fixed)",
            context: manifest.config.digest.to_string(),
        });
    }

    let mut downloaded = 0;
    if !store.has_blob(&manifest.config.digest) {
        downloaded += remote.blob(store, &manifest.config, &|_| {}).await?;
    }
    let config: ConfigFile = store.read_json_blob(&manifest.config, "image config")?;
    check_platform(&config, &PathBuf::from(image.to_string()))?;

    let missing: Vec<&Descriptor> = {
        let mut seen = std::collections::HashSet::new();
        manifest
            .layers
            .iter()
            .filter(|l| !store.has_blob(&l.digest) && seen.insert(&l.digest))
            .collect()
    };
    progress(PullEvent::Resolved {
        digest: mdigest.clone(),
        layers: manifest.layers.len(),
        cached_layers: manifest.layers.len() - missing.len(),
        download_bytes: missing.iter().map(|l| l.size).sum(),
    });
    let sizes: Vec<u64> = futures::stream::iter(missing)
        .map(|l| remote.blob(store, l, progress))
        .buffer_unordered(opts.concurrency.max(1))
        .try_collect()
        .await?;
    downloaded += sizes.iter().sum::<u64>();

    // The manifest goes in last: a record only ever points at complete content.
    store.add_blob(
        &body[..],
        Some(&desc_of(MT_OCI_MANIFEST, &mdigest, body.len())),
    )?;
    let record = ImageRecord {
        digest: mdigest,
        names: image.names.clone(),
        config_digest: manifest.config.digest.clone(),
        size: body.len() as u64
            + manifest.config.size
            + manifest.layers.iter().map(|l| l.size).sum::<u64>(),
        layers: manifest.layers,
        config: config.config.unwrap_or_default(),
        index_digests,
    };
    store.save_record(&record)?;
    tracing::info!(digest = %record.digest, names = ?record.names, downloaded, "image pulled");
    Ok(PullOutcome {
        record,
        cached: false,
        asked_registry: true,
        downloaded_bytes: downloaded,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MediaTypeOnly {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde_json::Value>,
}

fn desc_of(mt: &str, d: &Digest, len: usize) -> Descriptor {
    Descriptor {
        media_type: mt.into(),
        digest: d.clone(),
        size: len as u64,
        platform: None,
        annotations: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_for_loopback_or_named() {
        assert!(plain_http_allowed("127.0.0.1:5000", &[]));
        assert!(plain_http_allowed("127.8.9.1", &[]));
        assert!(plain_http_allowed("localhost:5000", &[]));
        assert!(plain_http_allowed("[::1]:5000", &[]));
        assert!(!plain_http_allowed("registry.example:5000", &[]));
        assert!(!plain_http_allowed("10.0.0.1:5000", &[]));
        assert!(!plain_http_allowed("127.0.0.1.example.com", &[]));
        assert!(plain_http_allowed(
            "registry.example:5000",
            &["registry.example".into()]
        ));
        assert!(plain_http_allowed(
            "registry.example:5000",
            &["registry.example:5000".into()]
        ));
        assert!(!plain_http_allowed(
            "registry.example:5000",
            &["other.example".into()]
        ));
    }

    #[test]
    fn reference_names() {
        let r = ImageRef::parse("127.0.0.1:5000/x:tag").unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.names, vec!["127.0.0.1:5000/x:tag".to_string()]);
        let r = ImageRef::parse("127.0.0.1:5000/x").unwrap();
        assert_eq!(r.names, vec!["127.0.0.1:5000/x:latest".to_string()]);
        let r = ImageRef::parse("alpine").unwrap();
        assert_eq!(
            r.names,
            vec![
                "alpine:latest".to_string(),
                "docker.io/library/alpine:latest".to_string()
            ]
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("127.0.0.1:5000/x@{d}")).unwrap();
        assert!(r.names.is_empty());
        assert_eq!(r.digest().unwrap().as_str(), d);
        assert!(ImageRef::parse("has space:1").is_err());
        assert!(ImageRef::parse("x@sha256:abc").is_err());
        assert!(ImageRef::parse("x:bad/tag!").is_err());
        assert!(ImageRef::parse("UPPER/case").is_err());
        assert!(ImageRef::parse("").is_err());
        assert!(ImageRef::parse("x:").is_err());
        let r = ImageRef::parse("localhost/a/b:1").unwrap();
        assert_eq!(r.registry(), "localhost");
        assert_eq!(r.to_string(), "localhost/a/b:1");
        let r = ImageRef::parse("me/app").unwrap();
        assert_eq!(r.to_string(), "docker.io/me/app:latest");
        let r = ImageRef::parse(&format!("reg.example:5000/a@{d}")).unwrap();
        assert_eq!(r.registry(), "reg.example:5000");
        assert!(r.names.is_empty());
        assert!(ImageRef::parse(&"a".repeat(2000)).is_err());
    }

    #[test]
    fn docker_config_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(
            &p,
            r#"{"auths":{"http://127.0.0.1:5000/v2/":{"auth":"dXNlcjpwYTpzcw=="},
                "https://index.docker.io/v1/":{"auth":"aHViOmh1Yg=="},
                "tok.example":{"registrytoken":"T"}}}"#,
        )
        .unwrap();
        let a = docker_credentials("127.0.0.1:5000", Some(&p)).unwrap();
        assert!(matches!(a, RegistryAuth::Basic(u, pw) if u == "user" && pw == "pa:ss"));
        let a = docker_credentials("index.docker.io", Some(&p)).unwrap();
        assert!(matches!(a, RegistryAuth::Basic(u, _) if u == "hub"));
        let a = docker_credentials("tok.example", Some(&p)).unwrap();
        assert!(matches!(a, RegistryAuth::Bearer(t) if t == "T"));
        let a = docker_credentials("other:1", Some(&p)).unwrap();
        assert!(matches!(a, RegistryAuth::Anonymous));
        let a = docker_credentials("x", Some(&dir.path().join("absent.json"))).unwrap();
        assert!(matches!(a, RegistryAuth::Anonymous));
        std::fs::write(&p, vec![b' '; (MAX_DOCKER_CONFIG + 10) as usize]).unwrap();
        assert!(matches!(
            docker_credentials("x", Some(&p)),
            Err(OciError::LimitExceeded { .. })
        ));
        std::fs::write(&p, r#"{"auths":{"h":{"auth":"!!"}}}"#).unwrap();
        assert!(docker_credentials("h", Some(&p)).is_err());
    }

    #[test]
    fn credential_helpers_are_asked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let helper = |name: &str, script: &str| {
            let p = bin.join(format!("docker-credential-{name}"));
            std::fs::write(&p, format!("#!/bin/sh\n{script}\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        // A helper that records what it was asked.
        let asked = dir.path().join("asked");
        helper(
            "store",
            &format!(
                "[ \"$1\" = get ] || exit 9; read -r s; echo \"$s\" >> {}; \
                 case \"$s\" in reg.test:5000) echo '{{\"ServerURL\":\"reg\",\"Username\":\"u\",\"Secret\":\"p\"}}';; \
                 https://index.docker.io/v1/) echo '{{\"Username\":\"<token>\",\"Secret\":\"idt\"}}';; \
                 *) echo 'credentials not found in native keychain'; exit 1;; esac",
                asked.display()
            ),
        );
        helper("broken", "echo nonsense");
        helper("slowfail", "echo boom >&2; exit 3");
        let p = dir.path().join("config.json");
        std::fs::write(
            &p,
            r#"{"auths":{"reg.test:5000":{}, "plain.test":{"auth":"dXNlcjpwYTpzcw=="}},
                "credsStore":"store",
                "credHelpers":{"b.test":"broken","f.test":"slowfail","evil.test":"../../bin/sh"}}"#,
        )
        .unwrap();
        let path = Some(bin.clone().into_os_string());
        let get = |r: &str| docker_credentials_in(r, Some(&p), path.clone());
        assert!(
            matches!(get("reg.test:5000").unwrap(), RegistryAuth::Basic(u, s) if u == "u" && s == "p")
        );
        assert!(matches!(get("docker.io").unwrap(), RegistryAuth::Bearer(t) if t == "idt"));
        assert!(matches!(
            get("other.test").unwrap(),
            RegistryAuth::Anonymous
        ));
        // An auths entry with credentials wins over the store.
        assert!(matches!(get("plain.test").unwrap(), RegistryAuth::Basic(u, _) if u == "user"));
        assert_eq!(
            std::fs::read_to_string(&asked).unwrap(),
            "reg.test:5000\nhttps://index.docker.io/v1/\nother.test\n"
        );
        let e = get("b.test").unwrap_err().to_string();
        assert!(
            e.contains("docker-credential-broken") && e.contains("fix:"),
            "{e}"
        );
        let e = get("f.test").unwrap_err().to_string();
        assert!(e.contains("boom"), "{e}");
        let e = get("evil.test").unwrap_err().to_string();
        assert!(e.contains("not a plain program name"), "{e}");
        // A helper that is not installed is named, with the fix.
        let e = docker_credentials_in("reg.test:5000", Some(&p), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not on PATH") && e.contains("fix:"), "{e}");
    }
}
