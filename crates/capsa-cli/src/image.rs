//! `capsa image`: guest bundles in the cache.

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
    /// Build (or find) a bundle and print its id.
    Build {
        /// Kernel image to use instead of the default resolution.
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Extra kernel modules to include. Repeatable.
        #[arg(long = "module")]
        modules: Vec<String>,
    },
    /// Remove a cached bundle.
    Rm {
        /// Bundle id (or a unique prefix) as shown by `capsa image ls`.
        id: String,
    },
}

pub async fn run(cmd: ImageCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCmd::Ls { json } => {
            let list = tokio::task::spawn_blocking(|| capsa_image::list(None))
                .await?
                .map_err(capsa::Error::from)?;
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
            }
        }
        ImageCmd::Build { kernel, modules } => {
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
            tokio::task::spawn_blocking(move || capsa_image::remove(None, &id))
                .await?
                .map_err(capsa::Error::from)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
