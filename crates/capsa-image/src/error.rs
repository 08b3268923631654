//! The one error type of this crate.

use std::path::PathBuf;

/// Why a bundle could not be built, listed or removed.
///
/// Every message says what went wrong and ends with `fix: ...`, because the
/// person reading it usually has to change their machine, not the code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// No kernel anywhere along the resolution order.
    #[error(
        "no kernel found (tried: {}); fix: install one with `apt-get install linux-image-amd64`, \
         or pass --kernel PATH, or set CAPSA_KERNEL",
        tried.join("; ")
    )]
    KernelNotFound {
        /// One entry per place looked at, with why it did not work.
        tried: Vec<String>,
    },
    /// An explicitly named kernel (argument or `CAPSA_KERNEL`) is unusable.
    #[error(
        "{} is not a usable x86_64 Linux kernel ({reason}); fix: pass a bzImage such as \
         /boot/vmlinuz-<version> or an uncompressed vmlinux with a Xen PVH note",
        path.display()
    )]
    BadKernel {
        /// The kernel file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Downloading or unpacking the Debian kernel package failed.
    #[error(
        "fetching the Debian kernel failed: {step}: {detail}; fix: run `apt-get update` (as root), \
         check access to the Debian mirror, or pass --kernel PATH / set CAPSA_KERNEL"
    )]
    Apt {
        /// The command or step that failed.
        step: String,
        /// Its error output or the I/O error.
        detail: String,
    },
    /// The module tree of the kernel cannot be read.
    #[error(
        "cannot read the kernel module tree {}: {reason}; fix: point CAPSA_MODULES at the \
         /lib/modules/<version> directory of this kernel",
        path.display()
    )]
    ModuleTree {
        /// The module directory.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A kernel module file is unreadable or malformed.
    #[error(
        "cannot use kernel module {}: {reason}; fix: reinstall the kernel's modules (or delete \
         the capsa cache to fetch them again)",
        path.display()
    )]
    BadModule {
        /// The module file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A module asked for in `extra_modules` exists neither as a file nor built in.
    #[error(
        "kernel module {name:?} is not available for kernel {kernel_version} (no module file, \
         not built in){}; fix: check the name (`modinfo NAME` where this kernel runs) or drop \
         it from extra_modules",
        if *no_tree { ", and this kernel has no module tree (set CAPSA_MODULES)" } else { "" }
    )]
    ModuleNotFound {
        /// The requested module name.
        name: String,
        /// Release of the kernel it was looked up for.
        kernel_version: String,
        /// Whether there was no module tree at all.
        no_tree: bool,
    },
    /// No usable static busybox on the host.
    #[error(
        "no static busybox ({reason}); fix: install it with `apt-get install busybox-static`, \
         or set CAPSA_BUSYBOX to a statically linked busybox"
    )]
    Busybox {
        /// Where it was looked for, or what is wrong with the one found.
        reason: String,
    },
    /// The `capsa-init` binary (from `CAPSA_GUEST_INIT`) is unusable.
    #[error(
        "cannot use {} as the guest init: {reason}; fix: point CAPSA_GUEST_INIT at a static \
         capsa-init (see capsa-guest-bin) or unset it to use the embedded one",
        path.display()
    )]
    InitBinary {
        /// The binary.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An entry of `extra_files` is unusable.
    #[error(
        "cannot add extra file {} as {guest:?}: {reason}; fix: give a readable regular host file \
         and an absolute guest path without `..` (not /init)",
        host.display()
    )]
    ExtraFile {
        /// Host path.
        host: PathBuf,
        /// Guest path.
        guest: String,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing the cache failed.
    #[error(
        "cache I/O failed at {}: {source}; fix: check free space and permissions there, or use \
         another cache directory (XDG_CACHE_HOME or BundleOptions::cache_dir)",
        path.display()
    )]
    Cache {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Neither `XDG_CACHE_HOME` nor `HOME` is set.
    #[error(
        "cannot choose a cache directory: neither XDG_CACHE_HOME nor HOME is set; fix: set one \
         of them or pass a cache directory explicitly"
    )]
    NoCacheDir,
    /// A bundle's `bundle.json` cannot be read.
    #[error(
        "bundle manifest {} is unreadable: {reason}; fix: delete that bundle directory, it is \
         rebuilt on the next build",
        path.display()
    )]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No bundle with that id (or id prefix).
    #[error(
        "no bundle {id:?} in {}; fix: use an id from the bundle list (capsa_image::list)",
        cache.display()
    )]
    BundleNotFound {
        /// The id asked for.
        id: String,
        /// The cache directory searched.
        cache: PathBuf,
    },
    /// An id prefix matches more than one bundle.
    #[error("bundle id prefix {id:?} matches {} bundles ({}); fix: give more characters of the id", matches.len(), matches.join(", "))]
    AmbiguousId {
        /// The prefix asked for.
        id: String,
        /// The bundles it matches.
        matches: Vec<String>,
    },
    /// An id that cannot be a bundle id (path separators, non-hex ...).
    #[error(
        "{id:?} is not a bundle id (expected lowercase hex); fix: copy the id from the bundle list"
    )]
    InvalidId {
        /// The id asked for.
        id: String,
    },
}

impl ImageError {
    pub(crate) fn cache(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Cache {
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_says_what_and_the_fix() {
        let io = || std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied");
        let all = [
            ImageError::KernelNotFound {
                tried: vec!["a".into(), "b".into()],
            },
            ImageError::BadKernel {
                path: "/k".into(),
                reason: "r".into(),
            },
            ImageError::Apt {
                step: "s".into(),
                detail: "d".into(),
            },
            ImageError::ModuleTree {
                path: "/m".into(),
                reason: "r".into(),
            },
            ImageError::BadModule {
                path: "/m.ko".into(),
                reason: "r".into(),
            },
            ImageError::ModuleNotFound {
                name: "n".into(),
                kernel_version: "v".into(),
                no_tree: true,
            },
            ImageError::Busybox { reason: "r".into() },
            ImageError::InitBinary {
                path: "/i".into(),
                reason: "r".into(),
            },
            ImageError::ExtraFile {
                host: "/h".into(),
                guest: "/g".into(),
                reason: "r".into(),
            },
            ImageError::Cache {
                path: "/c".into(),
                source: io(),
            },
            ImageError::NoCacheDir,
            ImageError::Manifest {
                path: "/b.json".into(),
                reason: "r".into(),
            },
            ImageError::BundleNotFound {
                id: "i".into(),
                cache: "/c".into(),
            },
            ImageError::AmbiguousId {
                id: "i".into(),
                matches: vec!["i1".into(), "i2".into()],
            },
            ImageError::InvalidId { id: "x".into() },
        ];
        for e in all {
            let msg = e.to_string();
            let (what, fix) = msg
                .split_once("; fix: ")
                .unwrap_or_else(|| panic!("no fix in {msg:?}"));
            assert!(what.len() > 10 && fix.len() > 5, "{msg:?}");
        }
        let msg = ImageError::KernelNotFound {
            tried: vec!["cache empty".into(), "no /boot".into()],
        }
        .to_string();
        assert!(
            msg.contains("cache empty; no /boot")
                && msg.contains("apt-get install linux-image-amd64"),
            "{msg}"
        );
        let msg = ImageError::Busybox { reason: "x".into() }.to_string();
        assert!(msg.contains("apt-get install busybox-static"), "{msg}");
    }
}
