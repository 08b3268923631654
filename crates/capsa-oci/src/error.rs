//! Errors of the OCI image store, layer unpacking and filesystem conversion.

use std::path::PathBuf;

/// Everything that can go wrong loading, unpacking or converting an image.
/// Every message names the problem and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// Filesystem I/O on a named path failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What capsa was doing.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Neither `XDG_CACHE_HOME` nor `HOME` is set.
    #[error(
        "cannot choose an image store directory: neither XDG_CACHE_HOME nor HOME is set; fix: set one \
         or pass an explicit store directory"
    )]
    NoCacheDir,
    /// The input is not an OCI image layout, an OCI archive or a `docker save` archive.
    #[error(
        "{path} is not an OCI image layout or a docker-save archive ({reason}); fix: pass a directory \
         with oci-layout and index.json, or a tar made by `docker save`, `podman save`, \
         `skopeo copy ... oci-archive:` or `buildah push ... oci-archive:`"
    )]
    NotAnImage {
        /// The path given by the user.
        path: PathBuf,
        /// What was missing or wrong.
        reason: String,
    },
    /// A JSON document (index, manifest, config) is malformed.
    #[error("malformed {what} in {path}: {reason}; fix: re-export the image with a current tool")]
    BadJson {
        /// Which document.
        what: &'static str,
        /// Where it came from.
        path: PathBuf,
        /// The parser's complaint.
        reason: String,
    },
    /// A descriptor digest is not `sha256:<64 hex>`.
    #[error("unsupported or malformed digest {0:?}; only sha256:<64 lowercase hex> is accepted")]
    BadDigest(String),
    /// A blob's content does not hash to its descriptor's digest, or its size differs.
    #[error(
        "blob {expected} is corrupt or tampered with: content has {actual_digest} and {actual_size} bytes, \
         the descriptor says {expected} and {expected_size} bytes; fix: re-export or re-pull the image"
    )]
    DigestMismatch {
        /// The digest the descriptor promised.
        expected: String,
        /// The size the descriptor promised.
        expected_size: u64,
        /// What the content hashes to.
        actual_digest: String,
        /// How many bytes the content has.
        actual_size: u64,
    },
    /// A blob a descriptor references is absent.
    #[error("blob {digest} referenced by the {what} is missing from {path}; fix: export the image again, with all its layers")]
    MissingBlob {
        /// The digest.
        digest: String,
        /// What referenced it.
        what: &'static str,
        /// The layout or archive.
        path: PathBuf,
    },
    /// No `linux/amd64` image in an index.
    #[error(
        "no linux/amd64 image in {path} (found: {found}); fix: export or pull the image for \
         linux/amd64 (e.g. `docker save` of an image pulled with --platform linux/amd64)"
    )]
    NoPlatform {
        /// The layout or archive.
        path: PathBuf,
        /// The platforms that were there.
        found: String,
    },
    /// A media type capsa does not handle.
    #[error("unsupported {what} media type {media_type:?}; {fix}")]
    UnsupportedMediaType {
        /// Manifest, layer, ...
        what: &'static str,
        /// The media type.
        media_type: String,
        /// How to get a supported form.
        fix: &'static str,
    },
    /// A configured bound was exceeded while reading hostile input.
    #[error(
        "{what} exceeds the limit of {limit} ({context}); fix: if the image is trusted and really this \
         large, raise Limits::{field}"
    )]
    LimitExceeded {
        /// What grew too large.
        what: &'static str,
        /// The limit.
        limit: u64,
        /// The `Limits` field to raise.
        field: &'static str,
        /// Which layer or file.
        context: String,
    },
    /// A layer tar is malformed (truncated, bad header, bad compression).
    #[error("layer {layer} is not a valid {compression} tar: {source}; fix: re-export the image")]
    BadLayer {
        /// Layer digest.
        layer: String,
        /// none, gzip or zstd.
        compression: &'static str,
        /// The decoder's error.
        #[source]
        source: std::io::Error,
    },
    /// No image in the store matches a name or digest.
    #[error("no image {0:?} in the store; fix: `capsa image load PATH` first, or check `capsa image ls`")]
    UnknownImage(String),
    /// A name or digest prefix matches several images.
    #[error("{0:?} matches several images ({1}); fix: give more of the digest")]
    Ambiguous(String, String),
    /// An external tool (mkfs.ext4, mkfs.erofs, debugfs) is missing.
    #[error("{tool} not found; fix: install {package} (`apt-get install {package}`, or run scripts/setup.sh)")]
    ToolMissing {
        /// The program.
        tool: &'static str,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// An external tool failed.
    #[error("{tool} failed ({status}): {stderr}")]
    ToolFailed {
        /// The program.
        tool: &'static str,
        /// Its exit status.
        status: String,
        /// The tail of its stderr.
        stderr: String,
    },
    /// An image reference does not parse.
    #[error(
        "{reference:?} is not an image reference ({reason}); fix: use [REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST], \
         e.g. 127.0.0.1:5000/app:1 or docker.io/library/debian:bookworm"
    )]
    BadReference {
        /// What the user gave.
        reference: String,
        /// The parser's complaint.
        reason: String,
    },
    /// Talking to a registry failed.
    #[error("pulling {reference} from {registry}: {reason}; fix: {fix}")]
    Registry {
        /// The reference being pulled.
        reference: String,
        /// The registry host.
        registry: String,
        /// What went wrong.
        reason: String,
        /// What to do about it.
        fix: String,
    },
    /// A Docker credential helper (`credsStore`/`credHelpers`) failed.
    #[error("credential helper docker-credential-{helper} for {registry}: {reason}; fix: {fix}")]
    CredentialHelper {
        /// The helper's name (after `docker-credential-`).
        helper: String,
        /// The registry asked about.
        registry: String,
        /// What went wrong.
        reason: String,
        /// What to do about it.
        fix: &'static str,
    },
    /// `--offline` and the image is not in the store.
    #[error("{0} is not in the image store and offline mode forbids asking the registry; fix: pull it once without --offline")]
    NotCached(String),
    /// An external builder (mmdebstrap) was given a bad request.
    #[error("{what}: {reason}; fix: {fix}")]
    BadRequest {
        /// Which input.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
        /// What to do.
        fix: &'static str,
    },
    /// The kernel lacks openat2 (Linux < 5.6), which safe extraction relies on.
    #[error("this kernel has no openat2(2) (Linux >= 5.6 needed) to unpack layers safely; fix: run capsa on a newer kernel")]
    NoOpenat2,
}

impl OciError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        OciError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}
