//! Guest bundles for capsa: a kernel plus an initramfs, built once and cached.
//!
//! A bundle holds
//! - the kernel: the uncompressed ELF `vmlinux` extracted from the bzImage
//!   when it has a Xen PVH note (QEMU then boots it directly, ~2.5x faster
//!   to init under TCG), else the bzImage ([`KernelFormat`]);
//! - `initrd.img`: a gzip-compressed newc cpio with `/init` = `capsa-init`
//!   (from `capsa-guest-bin`), a static busybox with its applet links, the
//!   kernel modules capsa needs in load order (`/etc/capsa/modules.load`),
//!   a minimal `/etc` and any extra files.
//!
//! Bundles live in `<cache>/bundles/<id>/`, where the id is a hash over every
//! input, so [`build`] returns the cached bundle whenever nothing changed.
//! Kernels come from the resolution order of [`resolve_kernel`]; on a Debian
//! or Ubuntu machine without a usable kernel the current Debian kernel package
//! is fetched with `apt-get download`.
//!
//! ```no_run
//! let bundle = capsa_image::build(&capsa_image::BundleOptions::default(), &capsa_image::Progress::new())?;
//! println!("qemu-system-x86_64 -kernel {} -initrd {} ...", bundle.kernel.display(), bundle.initrd.display());
//! # Ok::<(), capsa_image::ImageError>(())
//! ```
#![deny(missing_docs)]

mod bundle;
mod cache;
mod cpio;
mod elf;
mod error;
mod initramfs;
mod kernel;
mod modules;
mod progress;
mod vmlinux;

pub use bundle::{
    build, list, remove, Bundle, BundleOptions, ExtraFile, ID_LEN, INITRD_FILE, MANIFEST_FILE,
};
pub use cache::{default_cache_dir, FileLock};
pub use error::ImageError;
pub use initramfs::{InitrdCompression, BUSYBOX_ENV};
pub use kernel::{
    resolve_kernel, resolve_kernel_in, KernelSource, ResolvedKernel, DEBIAN_KERNEL_METAPACKAGE,
    KERNEL_ENV, MODULES_ENV,
};
pub use modules::{DEFAULT_MODULES, DISPLAY_MODULES};
pub use progress::{Progress, Step};
pub use vmlinux::KernelFormat;
