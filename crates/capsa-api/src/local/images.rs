//! The image store behind the image verbs: capsa-oci's [`Store`], its
//! records as [`ImageInfo`], its errors as [`ApiError`]s.

use std::sync::Arc;

use capsa_oci::{FsFormat, ImageRecord, OciError, Store};
use tokio::sync::mpsc;

use crate::error::{ApiError, ErrorCode, StatusCode};
use crate::types::{validate_image_ref, ImageInfo, PullEvent, PullRequest, PullResult};

/// The default image store (`~/.cache/capsa/images`).
pub fn store() -> Result<Store, ApiError> {
    Store::open_default().map_err(|e| oci_err("opening the image store", e))
}

/// The wire view of an image record.
pub fn info_of(r: &ImageRecord) -> ImageInfo {
    let c = &r.config;
    ImageInfo {
        digest: r.digest.to_string(),
        id: r.short_id().to_string(),
        names: r.names.clone(),
        size_bytes: r.size,
        layers: r.layers.len(),
        user: c.user.clone(),
        env: c.env.clone().unwrap_or_default(),
        entrypoint: c.entrypoint.clone().unwrap_or_default(),
        cmd: c.cmd.clone().unwrap_or_default(),
        working_dir: c.working_dir.clone(),
    }
}

/// An image-store error as the closest API error (the message keeps the
/// store's own fix).
pub fn oci_err(context: &str, e: OciError) -> ApiError {
    let message = format!("{context}: {e}");
    oci_status(&e, message)
}

/// The API error of an image-store error, with `message` as its text.
pub fn oci_status(e: &OciError, message: String) -> ApiError {
    match e {
        OciError::UnknownImage(_) => {
            ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
                .fix("`capsa image ls` (GET /v1/images) lists the images")
        }
        OciError::Ambiguous(..)
        | OciError::BadDigest(_)
        | OciError::BadReference { .. }
        | OciError::BadRequest { .. } => ApiError::bad_request(message),
        OciError::NotCached(_) => {
            ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
                .fix("pull it once without offline")
        }
        OciError::Registry { .. } | OciError::DigestMismatch { .. } => {
            ApiError::new(StatusCode::BAD_GATEWAY, ErrorCode::Unavailable, message)
        }
        OciError::LimitExceeded { .. } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            message,
        ),
        _ => ApiError::internal(message),
    }
}

/// The root filesystem format a pull converts to (`None`: store only).
fn format_of(convert: Option<&str>) -> Result<Option<FsFormat>, ApiError> {
    match convert.unwrap_or("erofs") {
        "none" => Ok(None),
        f => FsFormat::parse(f).map(Some).ok_or_else(|| {
            ApiError::bad_request(format!("unknown root filesystem format {f:?}"))
                .fix("use erofs, ext4, erofs-lz4hc or none")
        }),
    }
}

/// Starts a pull and its conversion on their own task; events go out on the
/// returned channel, the last one `Done` or `Error`. Dropping the receiver
/// abandons the pull (the store keeps only verified, finished blobs).
pub async fn pull(req: PullRequest) -> Result<mpsc::Receiver<PullEvent>, ApiError> {
    validate_image_ref(&req.reference)?;
    let format = format_of(req.convert.as_deref())?;
    let store = Arc::new(store()?);
    let (tx, rx) = mpsc::channel::<PullEvent>(64);
    // On a thread of its own driving the runtime: the registry client's
    // future is not `Send` for every lifetime `tokio::spawn` asks about.
    let handle = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        let last = handle.block_on(async {
            match run_pull(&store, &req, format, &tx).await {
                Ok(done) => PullEvent::Done(done),
                Err(e) => PullEvent::Error {
                    code: e.detail.code,
                    message: e.detail.message,
                    fix: e.detail.fix,
                },
            }
        });
        let _ = tx.blocking_send(last);
    });
    Ok(rx)
}

async fn run_pull(
    store: &Arc<Store>,
    req: &PullRequest,
    format: Option<FsFormat>,
    tx: &mpsc::Sender<PullEvent>,
) -> Result<PullResult, ApiError> {
    let opts = capsa_oci::PullOptions {
        insecure_registries: req.insecure_registries.clone(),
        offline: req.offline,
        ..Default::default()
    };
    // Progress is best effort: a full channel drops byte counts, never blocks the download.
    let events = tx.clone();
    let on_event: Box<dyn Fn(capsa_oci::PullEvent) + Send + Sync> = Box::new(move |e| {
        let ev = match e {
            capsa_oci::PullEvent::Resolved {
                digest,
                layers,
                cached_layers,
                download_bytes,
            } => PullEvent::Resolved {
                digest: digest.to_string(),
                layers,
                cached_layers,
                download_bytes,
            },
            capsa_oci::PullEvent::Bytes(n) => PullEvent::Bytes { bytes: n },
            capsa_oci::PullEvent::BlobDone { .. } => return,
        };
        let _ = events.try_send(ev);
    });
    let out = capsa_oci::pull::pull(store, &req.reference, &opts, &*on_event)
        .await
        .map_err(|e| oci_err(&format!("pulling {}", req.reference), e))?;
    let (rootfs, converted) = match format {
        None => (None, false),
        Some(format) => {
            let (store, rec, tx) = (store.clone(), out.record.clone(), tx.clone());
            let root = tokio::task::spawn_blocking(move || {
                store.rootfs_with(&rec, format, capsa_oci::Limits::default(), &mut |s| {
                    let ev = match s {
                        capsa_oci::ConvertStep::Layer { index, count, .. } => {
                            PullEvent::Unpacking { index, count }
                        }
                        capsa_oci::ConvertStep::Mkfs { format } => PullEvent::Mkfs {
                            format: format.ext().to_string(),
                        },
                    };
                    let _ = tx.blocking_send(ev);
                })
            })
            .await
            .map_err(|e| ApiError::internal(format!("the conversion task: {e}")))?
            .map_err(|e| oci_err(&format!("converting {}", req.reference), e))?;
            let fresh = root.report.is_some();
            (Some(root.image.path.display().to_string()), fresh)
        }
    };
    Ok(PullResult {
        image: info_of(&out.record),
        cached: out.cached,
        asked_registry: out.asked_registry,
        downloaded_bytes: out.downloaded_bytes,
        rootfs,
        converted,
    })
}
