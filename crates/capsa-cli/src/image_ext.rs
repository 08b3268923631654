//! `capsa image pull|build NAME --debian|inspect|prune`: the image store's sources and management.
//! Thin faces over `capsa_oci` (pull, debian, prune, refs).

use std::process::ExitCode;

use std::time::Instant;

use anyhow::Context;
use capsa_image::Progress;
use capsa_oci::{FsFormat, ImageRecord, Store};

/// Converts `rec` to `format` (cached per digest), with a spinner; returns the image path.
fn convert(
    store: &Store,
    rec: &ImageRecord,
    format: Option<FsFormat>,
    progress: &Progress,
) -> anyhow::Result<Option<(std::path::PathBuf, bool)>> {
    let Some(format) = format else {
        return Ok(None);
    };
    let step = progress.spinner(format!("converting {} to {}", rec.short_id(), format.ext()));
    let t = Instant::now();
    let root = store.rootfs_with(
        rec,
        format,
        capsa_oci::Limits::default(),
        &mut |s| match s {
            capsa_oci::ConvertStep::Layer { index, count, size } => step.set_message(format!(
                "unpacking layer {}/{count} ({:.1} MB)",
                index + 1,
                size as f64 / 1e6
            )),
            capsa_oci::ConvertStep::Mkfs { format } => {
                step.set_message(format!("building the {} image", format.ext()))
            }
        },
    )?;
    let fresh = root.report.is_some();
    step.finish(if fresh {
        format!("converted in {:.2?}", t.elapsed())
    } else {
        "root filesystem cached".to_string()
    });
    if let Some(rep) = &root.report {
        for s in rep.skipped.iter().take(20) {
            eprintln!("note: left out {}: {}", s.path, s.reason);
        }
        if rep.skipped.len() > 20 {
            eprintln!("note: left out {} more entries", rep.skipped.len() - 20);
        }
    }
    Ok(Some((root.image.path, fresh)))
}

/// `capsa image pull`: the service's pull (the same one capsad serves),
/// with its progress events on bars.
pub async fn pull(req: capsa_api::types::PullRequest, json: bool) -> anyhow::Result<ExitCode> {
    use capsa_api::types::PullEvent as E;
    use capsa_api::Service as _;
    let start = Instant::now();
    let reference = req.reference.clone();
    let svc = capsa_api::local::LocalService::new(None, None);
    let mut events = svc.image_pull(req).await?;
    let progress = if json {
        Progress::hidden()
    } else {
        Progress::new()
    };
    let mut bar: Option<capsa_image::Step> = None;
    // Download + verify ends where the conversion starts (scripts compare them).
    let mut pulled_at: Option<std::time::Duration> = None;
    let done = loop {
        let Some(ev) = events.recv().await else {
            anyhow::bail!("pulling {reference}: the pull ended without a result");
        };
        match ev {
            E::Resolved {
                digest,
                layers,
                cached_layers,
                download_bytes,
            } => {
                let short = digest
                    .strip_prefix("sha256:")
                    .and_then(|h| h.get(..12))
                    .unwrap_or_default()
                    .to_string();
                bar = Some(progress.bytes(
                    format!(
                        "pulling {short}: {} of {layers} layers ({cached_layers} cached)",
                        layers.saturating_sub(cached_layers)
                    ),
                    download_bytes,
                ));
            }
            E::Bytes { bytes } => {
                if let Some(b) = &bar {
                    b.inc(bytes)
                }
            }
            E::Unpacking { index, count } => {
                pulled_at.get_or_insert_with(|| start.elapsed());
                let b = bar.get_or_insert_with(|| progress.spinner("converting"));
                b.set_message(format!("unpacking layer {}/{count}", index + 1));
            }
            E::Mkfs { format } => {
                let b = bar.get_or_insert_with(|| progress.spinner("converting"));
                b.set_message(format!("building the {format} image"));
            }
            E::Done(d) => break d,
            E::Error { message, fix, .. } => {
                if let Some(b) = bar.take() {
                    b.finish("failed".to_string());
                }
                return Err(capsa_api::ApiError::bad_request(message)
                    .fix(fix.unwrap_or_default())
                    .into());
            }
        }
    };
    if let Some(b) = bar.take() {
        b.finish(format!(
            "downloaded {:.1} MB, every blob verified",
            done.downloaded_bytes as f64 / 1e6
        ));
    }
    if json {
        let mut v = serde_json::to_value(&done)?;
        // The image's identity at the top, as scripts read it.
        v["digest"] = done.image.digest.clone().into();
        v["names"] = serde_json::to_value(&done.image.names)?;
        v["size_bytes"] = done.image.size_bytes.into();
        let pulled = pulled_at.unwrap_or_else(|| start.elapsed());
        v["pull_ms"] = (pulled.as_secs_f64() * 1e3).into();
        v["total_ms"] = (start.elapsed().as_secs_f64() * 1e3).into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        eprintln!(
            "{} in {:.2?}{}",
            if done.cached { "up to date" } else { "pulled" },
            start.elapsed(),
            if done.asked_registry {
                ""
            } else {
                " (registry not contacted)"
            }
        );
        match &done.rootfs {
            Some(p) => println!("{} {p}", done.image.digest),
            None => println!("{}", done.image.digest),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `capsa image build NAME --debian SUITE`.
pub async fn build_debian(
    name: String,
    opts: capsa_oci::debian::DebianOptions,
    format: Option<FsFormat>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    let v = tokio::task::spawn_blocking(move || -> anyhow::Result<serde_json::Value> {
        let store = Store::open_default()?;
        let progress = if json {
            Progress::hidden()
        } else {
            Progress::new()
        };
        let step = progress.spinner(format!(
            "mmdebstrap {} ({})",
            opts.suite,
            if opts.packages.is_empty() {
                "no extra packages".to_string()
            } else {
                opts.packages.join(",")
            }
        ));
        let built = capsa_oci::debian::build(&store, &name, &opts, &mut |line| {
            step.set_message(line.to_string());
            tracing::debug!(target: "mmdebstrap", "{line}");
        })
        .with_context(|| format!("building {name} from Debian {}", opts.suite))?;
        step.finish(format!(
            "built in {:.2?} ({} package lists, {} .debs downloaded)",
            built.mmdebstrap_time,
            if built.cached_lists {
                "cached"
            } else {
                "fresh"
            },
            built.debs_after.saturating_sub(built.debs_before)
        ));
        let rootfs = convert(&store, &built.record, format, &progress)?;
        Ok(serde_json::json!({
            "digest": built.record.digest.as_str(),
            "names": built.record.names,
            "size_bytes": built.record.size,
            "cached_lists": built.cached_lists,
            "cached_image": built.cached_image,
            "debs_downloaded": built.debs_after.saturating_sub(built.debs_before),
            "mmdebstrap_ms": built.mmdebstrap_time.as_secs_f64() * 1e3,
            "rootfs": rootfs.map(|r| r.0),
        }))
    })
    .await
    .context("debian build task")??;
    if json {
        let mut v = v;
        v["total_ms"] = (start.elapsed().as_secs_f64() * 1e3).into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        eprintln!("image ready in {:.2?}", start.elapsed());
        println!(
            "{} {}",
            v["digest"].as_str().unwrap_or_default(),
            v["rootfs"].as_str().unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `capsa image inspect`.
pub async fn inspect(what: String) -> anyhow::Result<ExitCode> {
    let v = tokio::task::spawn_blocking(move || -> anyhow::Result<serde_json::Value> {
        let store = Store::open_default()?;
        match store.find(&what) {
            Ok(r) => {
                let rootfs: Vec<serde_json::Value> = [FsFormat::Erofs, FsFormat::Ext4, FsFormat::ErofsLz4hc]
                    .into_iter()
                    .filter_map(|f| {
                        let p = store.rootfs_path(&r, f);
                        let m = std::fs::metadata(&p).ok()?;
                        Some(serde_json::json!({"format": f.ext(), "path": p, "size_bytes": m.len()}))
                    })
                    .collect();
                Ok(serde_json::json!({
                    "kind": "image",
                    "id": r.short_id(),
                    "digest": r.digest.as_str(),
                    "names": r.names,
                    "index_digests": r.index_digests,
                    "config_digest": r.config_digest.as_str(),
                    "config": r.config,
                    "layers": r.layers,
                    "size_bytes": r.size,
                    "rootfs": rootfs,
                }))
            }
            Err(capsa_oci::OciError::UnknownImage(_)) => {
                let bundles = capsa_image::list(None).map_err(capsa::Error::from)?;
                let hits: Vec<_> = bundles.iter().filter(|b| b.id.starts_with(&what)).collect();
                match hits.as_slice() {
                    [b] => Ok(serde_json::json!({
                        "kind": "bundle",
                        "id": b.id,
                        "dir": b.dir,
                        "kernel": b.kernel,
                        "initrd": b.initrd,
                        "kernel_version": b.kernel_version,
                        "kernel_format": format!("{:?}", b.kernel_format),
                        "modules": b.modules,
                        "size_bytes": b.size_bytes,
                    })),
                    [] => anyhow::bail!(
                        "no image or bundle {what:?}; fix: check `capsa image ls`, or `capsa image pull {what}`"
                    ),
                    _ => anyhow::bail!("{what:?} matches several bundles; fix: give more of the id"),
                }
            }
            Err(e) => Err(e.into()),
        }
    })
    .await
    .context("inspect task")??;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(ExitCode::SUCCESS)
}

/// Where sandboxes and snapshots record what they use.
fn state_roots() -> Vec<std::path::PathBuf> {
    vec![
        capsa::StateRoot::default_root().path().to_path_buf(),
        capsa::Snapshots::default_root(),
        capsa::base_snapshot::cache_dir(),
    ]
}

/// `capsa image prune`.
pub async fn prune(dry_run: bool, json: bool) -> anyhow::Result<ExitCode> {
    let v = tokio::task::spawn_blocking(move || -> anyhow::Result<serde_json::Value> {
        let roots = state_roots();
        let store = Store::open_default()?;
        let report = store.prune(dry_run, &mut |p| {
            let needles = vec![
                p.to_string_lossy().into_owned(),
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ];
            capsa_oci::refs::in_use(&needles, &roots).iter().any(|x| *x)
        })?;
        // Bundles: keep the newest (what `capsa run` uses) and any a sandbox or snapshot names.
        let mut bundles = capsa_image::list(None).map_err(capsa::Error::from)?;
        bundles.sort_by_key(|b| std::cmp::Reverse(b.created));
        let mut removed_bundles = Vec::new();
        let mut kept_bundles = Vec::new();
        let mut freed = report.freed_bytes;
        let candidates: Vec<_> = bundles.iter().skip(1).collect();
        let needles: Vec<String> = candidates
            .iter()
            .flat_map(|b| [b.dir.to_string_lossy().into_owned(), b.id.clone()])
            .collect();
        let used = capsa_oci::refs::in_use(&needles, &roots);
        for (i, b) in candidates.iter().enumerate() {
            if used[2 * i] || used[2 * i + 1] {
                kept_bundles.push(b.id.clone());
                continue;
            }
            if !dry_run {
                if let Err(e) = capsa_image::remove(None, &b.id) {
                    eprintln!("warning: cannot remove bundle {}: {e}", b.id);
                    continue;
                }
            }
            freed += b.size_bytes;
            removed_bundles.push(b.id.clone());
        }
        if let Some(b) = bundles.first() {
            kept_bundles.insert(0, b.id.clone());
        }
        Ok(serde_json::json!({
            "dry_run": dry_run,
            "blobs": report.blobs,
            "rootfs": report.rootfs,
            "kept_rootfs": report.kept,
            "tmp": report.tmp,
            "young_blobs_kept": report.young,
            "bundles": removed_bundles,
            "kept_bundles": kept_bundles,
            "freed_bytes": freed,
        }))
    })
    .await
    .context("prune task")??;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let n = |k: &str| v[k].as_array().map_or(0, |a| a.len());
        let verb = if dry_run { "would remove" } else { "removed" };
        println!(
            "{verb} {} blobs, {} root filesystems, {} bundles, {} leftovers: {:.1} MB",
            n("blobs"),
            n("rootfs"),
            n("bundles"),
            n("tmp"),
            v["freed_bytes"].as_u64().unwrap_or(0) as f64 / 1e6
        );
        for p in v["kept_rootfs"].as_array().into_iter().flatten() {
            println!(
                "kept {} (a sandbox or snapshot may use it)",
                p.as_str().unwrap_or_default()
            );
        }
        for b in v["kept_bundles"].as_array().into_iter().flatten().skip(1) {
            println!(
                "kept bundle {} (a sandbox or snapshot may use it)",
                b.as_str().unwrap_or_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
