//! OCI images to read-only root filesystem images.
//!
//! - [`Store`]: a content-addressed, digest-verified image store under capsa's cache directory.
//! - [`Store::load`]: imports an OCI image layout directory, an OCI archive or a `docker save` tar.
//! - [`Stager`]: applies hostile layer tars in order (whiteouts, opaque directories, hardlinks,
//!   symlinks kept verbatim) into a staging directory, never writing outside it.
//! - [`mkfs`]: converts a staged tree into a byte-reproducible ext4 or EROFS image.

mod error;
pub mod spec;
pub mod unpack;

pub use error::OciError;
pub use spec::{Compression, Digest, ImageConfig};
pub use unpack::{sanitize_path, Limits, PathRefusal, Skipped, StageReport, Stager};
mod store;
pub use store::{
    BlobWriter, ConvertStep, ImageRecord, PruneReport, Rootfs, Store, VerifiedBlob,
    REPRODUCIBLE_TIME,
};
pub mod debian;
pub mod pull;
pub mod refs;
pub use pull::{PullEvent, PullOptions, PullOutcome};
pub mod mkfs;
pub use mkfs::{FsFormat, FsImage, MkfsOptions};
