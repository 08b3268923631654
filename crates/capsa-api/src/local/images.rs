//! The image store behind the image verbs: capsa-oci's [`Store`], its
//! records as [`ImageInfo`], its errors as [`ApiError`]s.

use capsa_oci::{ImageRecord, OciError, Store};

use crate::error::{ApiError, ErrorCode, StatusCode};
use crate::types::ImageInfo;

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
    match e {
        OciError::UnknownImage(_) => {
            ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
                .fix("`capsa image ls` (GET /v1/images) lists the images")
        }
        OciError::Ambiguous(..) | OciError::BadDigest(_) => ApiError::bad_request(message),
        OciError::LimitExceeded { .. } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            message,
        ),
        _ => ApiError::internal(message),
    }
}
