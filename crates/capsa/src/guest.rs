//! The default guest: capsa's own bundle of a Debian kernel and initramfs.

use capsa_image::{Bundle, BundleOptions, Progress};

use crate::{LinuxDirectBoot, Result};

/// Builds (or finds in the cache) the default guest bundle.
///
/// Blocking work (kernel download, initramfs build) runs off the async runtime;
/// progress shows on a terminal.
pub async fn default_bundle() -> Result<Bundle> {
    bundle(BundleOptions::default()).await
}

/// Builds (or finds in the cache) a bundle with the given options.
pub async fn bundle(opts: BundleOptions) -> Result<Bundle> {
    let b = tokio::task::spawn_blocking(move || capsa_image::build(&opts, &Progress::new()))
        .await
        .map_err(|e| crate::Error::io("bundle build task", std::io::Error::other(e)))??;
    Ok(b)
}

impl LinuxDirectBoot {
    /// Boots the kernel and initramfs of a capsa bundle.
    pub fn from_bundle(b: &Bundle) -> Self {
        Self::new(&b.kernel, Some(&b.initrd))
    }

    /// Boots capsa's default guest (built on first use, then cached).
    pub async fn default_guest() -> Result<Self> {
        Ok(Self::from_bundle(&default_bundle().await?))
    }
}
