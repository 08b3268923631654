//! `capsa image`: guest bundles and OCI images in the cache.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use capsa_image::{BundleOptions, Progress};

/// Subcommands of `capsa image`.
#[derive(clap::Subcommand, Debug)]
pub enum ImageCmd {
    /// List cached bundles.
    Ls {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Build (or find) the guest bundle and print its id; with NAME --debian SUITE, build a
    /// Debian root filesystem image from apt instead (mmdebstrap; .debs cached for rebuilds).
    Build {
        /// Image name for a Debian build (e.g. py:bookworm); leave out to build the guest bundle.
        name: Option<String>,
        /// Debian suite to build NAME from (bookworm, trixie, ...).
        #[arg(long, requires = "name")]
        debian: Option<String>,
        /// Packages to install, comma-separated (e.g. python3,git).
        #[arg(long, value_delimiter = ',', requires = "debian")]
        packages: Vec<String>,
        /// A preset adding packages and files: `desktop` (Xorg on the display, openbox, xterm,
        /// started by `capsa exec NAME -- capsa-desktop`; add a browser with --packages chromium).
        #[arg(long, requires = "debian")]
        recipe: Option<String>,
        /// mmdebstrap variant: apt (default), minbase, ...
        #[arg(long, default_value = "apt", requires = "debian")]
        variant: String,
        /// Debian mirror (default: the host's, from /etc/apt/sources.list*).
        #[arg(long, requires = "debian")]
        mirror: Option<String>,
        /// Fetch the package lists even if cached ones are fresh.
        #[arg(long, requires = "debian")]
        refresh: bool,
        /// Run mmdebstrap even when an image from the same suite, packages, mirror and package
        /// lists is already in the store (it is reused otherwise).
        #[arg(long, requires = "debian")]
        rebuild: bool,
        /// Filesystem format of the converted root: erofs (default), ext4, erofs-lz4hc, none.
        #[arg(long, default_value = "erofs", requires = "debian")]
        convert: String,
        /// Machine-readable output (Debian builds).
        #[arg(long, requires = "debian")]
        json: bool,
        /// Kernel image to use instead of the default resolution.
        #[arg(long, conflicts_with = "debian")]
        kernel: Option<PathBuf>,
        /// Extra kernel modules to include. Repeatable.
        #[arg(long = "module", conflicts_with = "debian")]
        modules: Vec<String>,
    },
    /// Pull an image from an OCI registry (linux/amd64), verify every blob, store it and convert
    /// it to a read-only root filesystem image. Credentials come from ~/.docker/config.json.
    Pull {
        /// [REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST]
        reference: String,
        /// Speak plain HTTP to this registry (host or host:port). Loopback registries need no flag.
        /// Repeatable.
        #[arg(long = "insecure-registry")]
        insecure_registries: Vec<String>,
        /// Never contact the registry: use the image already in the store (by digest or by the
        /// name it was pulled under), or fail.
        #[arg(long)]
        offline: bool,
        /// Filesystem format of the converted root: erofs (default), ext4, erofs-lz4hc, none.
        #[arg(long, default_value = "erofs")]
        convert: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show an image (config, layers, converted root filesystems) or a bundle, as JSON.
    Inspect {
        /// Image name, digest (prefix), or bundle id.
        what: String,
    },
    /// Remove blobs, converted filesystems and bundles nothing uses. A bundle or filesystem image
    /// that a running sandbox or a saved snapshot may reference is kept (and listed as kept).
    Prune {
        /// Only say what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Remove a cached bundle, or an OCI image (by name or digest prefix).
    Rm {
        /// Bundle id or image name/digest (or a unique prefix) as shown by `capsa image ls`.
        id: String,
    },
    /// Load an OCI image layout directory, an OCI archive or a `docker save` tar into the image
    /// store, and convert it to a read-only root filesystem image.
    Load {
        /// Directory (with index.json) or tar file (`docker save`, `podman save`, `skopeo copy ... oci-archive:`).
        path: PathBuf,
        /// Filesystem format of the converted root: erofs (default), ext4, erofs-lz4hc, or none to
        /// only store the image.
        #[arg(long, default_value = "erofs")]
        convert: String,
    },
}

pub async fn run(cmd: ImageCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCmd::Ls { json } => {
            let list = tokio::task::spawn_blocking(|| capsa_image::list(None))
                .await?
                .map_err(capsa::Error::from)?;
            // The image store must not keep bundles from being listed.
            let (store, images) = match capsa_oci::Store::open_default().and_then(|s| {
                let l = s.list()?;
                Ok((Some(s), l))
            }) {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("warning: cannot list OCI images: {e}");
                    (None, Vec::new())
                }
            };
            if json {
                let items: Vec<_> = list
                    .iter()
                    .map(|b| {
                        serde_json::json!({
                            "id": b.id,
                            "kernel_version": b.kernel_version,
                            "kernel": b.kernel,
                            "initrd": b.initrd,
                            "kernel_format": format!("{:?}", b.kernel_format),
                            "modules": b.modules,
                            "size_bytes": b.size_bytes,
                        })
                    })
                    .collect();
                let mut items: Vec<serde_json::Value> = items
                    .into_iter()
                    .map(|mut v| {
                        v["kind"] = "bundle".into();
                        v
                    })
                    .collect();
                for r in &images {
                    items.push(serde_json::json!({
                        "kind": "image",
                        "id": r.short_id(),
                        "digest": r.digest.as_str(),
                        "names": r.names,
                        "layers": r.layers.len(),
                        "size_bytes": r.size,
                        "rootfs": rootfs_of(store.as_ref(), r),
                    }));
                }
                println!("{}", serde_json::to_string_pretty(&items)?);
            } else {
                println!(
                    "{:<14} {:<22} {:>9}  KERNEL",
                    "ID", "KERNEL VERSION", "SIZE"
                );
                for b in &list {
                    println!(
                        "{:<14} {:<22} {:>8}M  {}",
                        b.id,
                        b.kernel_version,
                        b.size_bytes / (1 << 20),
                        b.kernel.display()
                    );
                }
                if !images.is_empty() {
                    println!();
                    println!(
                        "{:<14} {:>6} {:>9}  {:<12} NAMES",
                        "IMAGE", "LAYERS", "SIZE", "ROOTFS"
                    );
                    for r in &images {
                        println!(
                            "{:<14} {:>6} {:>8}M  {:<12} {}",
                            r.short_id(),
                            r.layers.len(),
                            r.size / (1 << 20),
                            rootfs_of(store.as_ref(), r).join(","),
                            r.names.join(", ")
                        );
                    }
                }
            }
        }
        ImageCmd::Build {
            name: Some(name),
            debian,
            packages,
            recipe,
            variant,
            mirror,
            refresh,
            rebuild,
            convert,
            json,
            ..
        } => {
            let Some(suite) = debian else {
                anyhow::bail!(
                    "`capsa image build {name}` needs a source; fix: add --debian SUITE \
                     (e.g. --debian bookworm --packages python3,git), or leave out the name to \
                     build the guest bundle"
                );
            };
            let format = parse_convert(&convert)?;
            let mut opts = capsa_oci::debian::DebianOptions::new(&suite, packages)?;
            opts.variant = variant;
            opts.mirror = mirror;
            opts.refresh = refresh;
            opts.rebuild = rebuild;
            opts.recipe = recipe
                .as_deref()
                .map(capsa_oci::debian::Recipe::parse)
                .transpose()?;
            return crate::image_ext::build_debian(name, opts, format, json).await;
        }
        ImageCmd::Pull {
            reference,
            insecure_registries,
            offline,
            convert,
            json,
        } => {
            // Checked here too, so a typo fails before any download.
            parse_convert(&convert)?;
            let req = capsa_api::types::PullRequest {
                reference,
                insecure_registries,
                offline,
                convert: Some(convert),
            };
            return crate::image_ext::pull(req, json).await;
        }
        ImageCmd::Inspect { what } => return crate::image_ext::inspect(what).await,
        ImageCmd::Prune { dry_run, json } => return crate::image_ext::prune(dry_run, json).await,
        ImageCmd::Build {
            name: None,
            kernel,
            modules,
            ..
        } => {
            let opts = BundleOptions {
                kernel,
                extra_modules: modules,
                ..BundleOptions::default()
            };
            let start = std::time::Instant::now();
            let b =
                tokio::task::spawn_blocking(move || capsa_image::build(&opts, &Progress::new()))
                    .await
                    .context("bundle build task")?
                    .map_err(capsa::Error::from)?;
            eprintln!("bundle ready in {:.2?}", start.elapsed());
            println!("{}", b.id);
        }
        ImageCmd::Rm { id } => {
            let id2 = id.clone();
            let bundle =
                tokio::task::spawn_blocking(move || capsa_image::remove(None, &id2)).await?;
            if let Err(bundle_err) = bundle {
                // Not a bundle: maybe an OCI image.
                let store = capsa_oci::Store::open_default()?;
                match store.remove(&id) {
                    Ok(rec) => eprintln!("removed image {}", rec.digest),
                    Err(capsa_oci::OciError::UnknownImage(_)) => {
                        return Err(capsa::Error::from(bundle_err).into())
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        ImageCmd::Load { path, convert } => {
            let format = parse_convert(&convert)?;
            let start = std::time::Instant::now();
            let recs = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
                let store = capsa_oci::Store::open_default()?;
                let progress = Progress::new();
                let step = progress.spinner(format!("verifying and storing {}", path.display()));
                let recs = store
                    .load(&path)
                    .with_context(|| format!("loading {}", path.display()))?;
                step.finish("stored");
                let mut lines = Vec::new();
                for r in &recs {
                    let mut line = format!("{} {}", r.digest, r.names.join(","));
                    if let Some(format) = format {
                        let step = progress.spinner(format!(
                            "converting {} to {}",
                            r.short_id(),
                            format.ext()
                        ));
                        let t = std::time::Instant::now();
                        let root = store.rootfs_with(
                            r,
                            format,
                            capsa_oci::Limits::default(),
                            &mut |s| match s {
                                capsa_oci::ConvertStep::Layer { index, count, size } => step
                                    .set_message(format!(
                                        "unpacking layer {}/{count} ({:.1} MB)",
                                        index + 1,
                                        size as f64 / 1e6
                                    )),
                                capsa_oci::ConvertStep::Mkfs { format } => {
                                    step.set_message(format!("building the {} image", format.ext()))
                                }
                            },
                        )?;
                        step.finish(format!("converted in {:.2?}", t.elapsed()));
                        if let Some(rep) = &root.report {
                            for s in &rep.skipped {
                                eprintln!("note: left out {}: {}", s.path, s.reason);
                            }
                        }
                        line.push_str(&format!(" {}", root.image.path.display()));
                    }
                    lines.push(line);
                }
                Ok(lines)
            })
            .await
            .context("image load task")??;
            eprintln!("loaded in {:.2?}", start.elapsed());
            for l in recs {
                println!("{l}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Parses a `--convert` value; `none` means no conversion.
pub(crate) fn parse_convert(convert: &str) -> anyhow::Result<Option<capsa_oci::FsFormat>> {
    Ok(match convert {
        "none" => None,
        f => Some(capsa_oci::FsFormat::parse(f).with_context(|| {
            format!("unknown --convert {f:?}; use erofs, ext4, erofs-lz4hc or none")
        })?),
    })
}

/// Formats already converted for an image.
pub(crate) fn rootfs_of(
    store: Option<&capsa_oci::Store>,
    r: &capsa_oci::ImageRecord,
) -> Vec<&'static str> {
    let Some(store) = store else {
        return Vec::new();
    };
    [
        capsa_oci::FsFormat::Erofs,
        capsa_oci::FsFormat::Ext4,
        capsa_oci::FsFormat::ErofsLz4hc,
    ]
    .into_iter()
    .filter(|f| store.rootfs_path(r, *f).exists())
    .map(|f| f.ext())
    .collect()
}
