//! Snapshots and restores under QEMU 7.2.
//!
//! # Why it looks like this
//!
//! - QEMU 7.2 refuses to migrate a VM with `vhost-user-vsock` ("State blocked
//!   by non-migratable device"). capsa therefore hot-unplugs the vsock device
//!   (it sits on its own PCIe root port; q35 unplugs through ACPI in ~50 ms)
//!   before saving and plugs it back afterwards. The saved state never
//!   contains the device; a restored VM starts without it and gets it plugged
//!   once the state is loaded. The guest sees a device go away and come back,
//!   which its vsock driver and capsa's agent handle (open streams reset).
//! - Guest RAM is a memfd capsa owns (see [`crate::ram`]). QEMU's migration
//!   stream skips it (`x-ignore-shared`) and carries device state only
//!   (~200 KiB); capsa copies RAM pages itself into a sparse file. A restore
//!   fills a fresh memfd from it while QEMU starts. This makes a restore of a
//!   256 MiB guest ~3x faster than loading a full migration stream.
//! - The migration stream itself goes over a Unix socket in QEMU's own
//!   directory, copied to and from `state.bin` by capsa: QEMU runs with
//!   `-sandbox ...,spawn=deny` (an `exec:` URI would need a shell) and, when
//!   confined to its own uid, cannot open the snapshot directory.
//! - Disks are frozen by copying each writable image while the VM is stopped
//!   (QEMU flushes on stop, so the file is consistent with the saved RAM): a
//!   reflink where the file system has them, a sparse copy otherwise. The
//!   source keeps writing to its own image; every restore writes to its own
//!   qcow2 overlay on top of the frozen copy.

use std::path::{Path, PathBuf};
use std::time::Duration;

use capsa_core::{
    Accel, DiskFormat, DiskSpec, Error, FileIdentity, Hypervisor, RestoredVm, Result, SnapshotDisk,
    SnapshotMeta, StartOptions,
};
use qapi::qmp;
use serde::Serialize;

use crate::args::{self, Launch, VSOCK_BUS, VSOCK_CHARDEV_ID, VSOCK_DEVICE_ID};
use crate::instance::{InstanceInfo, QemuInstance, RAM_FD};
use crate::{ram, QemuBackend, QemuError};

/// The saved device state (QEMU's migration stream, RAM excluded).
pub const STATE_FILE: &str = "state.bin";
/// The saved guest RAM: a sparse file as large as the guest's memory.
pub const RAM_FILE: &str = "ram.bin";
/// How long the guest gets to release the vsock device on unplug.
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(10);
/// How long saving or loading the device state may take.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);

/// `query-migrate` with an untyped answer: QEMU versions differ in which
/// statistics they report, and only `status` and `error-desc` matter here.
#[derive(Serialize)]
struct QueryMigrate {}

impl qapi::Command for QueryMigrate {
    const NAME: &'static str = "query-migrate";
    const ALLOW_OOB: bool = false;
    type Ok = serde_json::Value;
}
impl qmp::QmpCommand for QueryMigrate {}

fn backend_error(message: String, fix: Option<&str>) -> Error {
    Error::Backend {
        backend: "qemu",
        message,
        fix: fix.map(str::to_string),
        source: None,
    }
}

/// "QEMU 7.2.22 (Debian ...)" from `query-version`.
async fn qemu_version(inst: &QemuInstance) -> Result<String> {
    let v = inst.exec("query-version", qmp::query_version {}).await?;
    let q = v.qemu;
    Ok(format!(
        "QEMU {}.{}.{}{}",
        q.major,
        q.minor,
        q.micro,
        if v.package.trim().is_empty() {
            String::new()
        } else {
            format!(" {}", v.package.trim())
        }
    ))
}

async fn set_ignore_shared(inst: &QemuInstance) -> Result<()> {
    inst.exec(
        "migrate-set-capabilities",
        qmp::migrate_set_capabilities {
            capabilities: vec![qmp::MigrationCapabilityStatus {
                capability: qmp::MigrationCapability::x_ignore_shared,
                state: true,
            }],
        },
    )
    .await
    .map(|_| ())
}

/// Polls `query-migrate` until the migration completes (or fails).
async fn wait_migration(inst: &QemuInstance, what: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + MIGRATE_TIMEOUT;
    loop {
        let info = inst.exec("query-migrate", QueryMigrate {}).await?;
        match info.get("status").and_then(|s| s.as_str()) {
            Some("completed") => return Ok(()),
            Some(s @ ("failed" | "cancelled")) => {
                let desc = info
                    .get("error-desc")
                    .and_then(|d| d.as_str())
                    .unwrap_or("no details");
                return Err(backend_error(format!("{what} {s}: {desc}"), None));
            }
            _ => {}
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Error::Timeout {
                what: what.to_string(),
                after: MIGRATE_TIMEOUT,
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Whether the vsock device is still in QEMU's device tree.
async fn vsock_present(inst: &QemuInstance) -> Result<bool> {
    let props = inst
        .exec(
            "qom-list",
            qmp::qom_list {
                path: "/machine/peripheral".into(),
            },
        )
        .await?;
    Ok(props.iter().any(|p| p.name == VSOCK_DEVICE_ID))
}

/// Hot-unplugs the vsock device and drops its chardev (the guest must be running).
async fn unplug_vsock(inst: &QemuInstance) -> Result<()> {
    inst.exec(
        "device_del",
        qmp::device_del {
            id: VSOCK_DEVICE_ID.into(),
        },
    )
    .await?;
    let deadline = tokio::time::Instant::now() + UNPLUG_TIMEOUT;
    while vsock_present(inst).await? {
        if tokio::time::Instant::now() > deadline {
            return Err(backend_error(
                format!("the guest did not release its vsock device within {UNPLUG_TIMEOUT:?}"),
                Some("the guest kernel must handle ACPI PCI hot-unplug; is the guest hung?"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // The device leaves the QOM tree before it is finalized and lets go of
    // its chardev ("busy" until then).
    loop {
        match inst
            .exec(
                "chardev-remove",
                qmp::chardev_remove {
                    id: VSOCK_CHARDEV_ID.into(),
                },
            )
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

/// Plugs the vsock device back, connected to capsa's device at `vhost`.
async fn plug_vsock(inst: &QemuInstance, vhost: &Path) -> Result<()> {
    crate::share::add_chardev(inst, VSOCK_CHARDEV_ID, vhost).await?;
    let mut arguments = qapi::Dictionary::new();
    arguments.insert("chardev".into(), VSOCK_CHARDEV_ID.into());
    inst.exec(
        "device_add",
        qmp::device_add {
            driver: "vhost-user-vsock-pci".into(),
            bus: Some(VSOCK_BUS.into()),
            id: Some(VSOCK_DEVICE_ID.into()),
            arguments,
        },
    )
    .await
    .map(|_| ())
}

async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::io(what, std::io::Error::other(e)))?
        .map_err(|e| Error::io(what, e))
}

/// Whether a qcow2 image names a backing file (header field at byte 8).
pub(crate) fn qcow2_has_backing(path: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut h = [0u8; 16];
    std::fs::File::open(path)?.read_exact(&mut h)?;
    Ok(h[8..16].iter().any(|&b| b != 0))
}

/// `qemu-img` next to the QEMU binary, else on `PATH`.
fn qemu_img(qemu: &Path) -> PathBuf {
    qemu.parent()
        .map(|d| d.join("qemu-img"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("qemu-img"))
}

async fn run_qemu_img(qemu: &Path, args: &[&std::ffi::OsStr]) -> Result<()> {
    let bin = qemu_img(qemu);
    let out = tokio::process::Command::new(&bin)
        .args(args)
        .output()
        .await
        .map_err(|e| {
            backend_error(
                format!("cannot run {}: {e}", bin.display()),
                Some("install qemu-img (apt-get install qemu-utils)"),
            )
        })?;
    if !out.status.success() {
        return Err(backend_error(
            format!(
                "qemu-img {:?} failed: {}",
                args,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            None,
        ));
    }
    Ok(())
}

/// Saves `inst` into the empty directory `dir`.
pub(crate) async fn take(inst: &QemuInstance, dir: &Path) -> Result<SnapshotMeta> {
    let _one_at_a_time = inst.snapshot_lock.lock().await;
    let shares = inst.share_specs().await;
    if !shares.is_empty() {
        return Err(crate::share::snapshot_refusal(&shares));
    }
    let ram = match &inst.info.ram {
        Some(r) => r
            .try_clone()
            .map_err(|e| Error::io("duplicating the guest RAM fd", e))?,
        None => {
            return Err(Error::Unsupported {
                backend: "qemu".into(),
                what: "snapshots of VMs whose RAM capsa does not own".into(),
                fix: "start the VM with capsa's QEMU backend".into(),
            })
        }
    };
    match std::fs::read_dir(dir).map(|mut e| e.next().is_none()) {
        Ok(true) => {}
        Ok(false) => {
            return Err(Error::invalid(
                "snapshot",
                format!("{} is not empty", dir.display()),
                "pass a new or empty directory",
            ))
        }
        Err(e) => return Err(Error::io(format!("reading {}", dir.display()), e)),
    }
    let was_running = matches!(
        inst.exec("query-status", qmp::query_status {})
            .await?
            .status,
        qmp::RunState::running
    );
    let version = qemu_version(inst).await?;
    let mut spec = inst.info.spec.clone();
    // Shares it started with have been detached (or the snapshot was refused
    // above); restores start without them and attach their own.
    spec.shares.clear();
    let accel = inst.info.accel;
    let mut meta = blocking("fingerprinting the kernel", move || {
        SnapshotMeta::new("qemu", &version, accel, &spec).map_err(std::io::Error::other)
    })
    .await?;

    let vhost = inst.vhost_socket();
    let mut unplugged = false;
    let saved = async {
        if vhost.is_some() && vsock_present(inst).await? {
            // The guest has to acknowledge the unplug, so it must run.
            if !was_running {
                inst.exec("cont", qmp::cont {}).await?;
            }
            let t = std::time::Instant::now();
            unplug_vsock(inst).await?;
            unplugged = true;
            tracing::debug!(took = ?t.elapsed(), "vsock device unplugged");
        }
        inst.exec("stop", qmp::stop {}).await?;
        save_stopped(inst, dir, ram, &mut meta).await
    }
    .await;
    // Whatever happened, give the source back its device and run state.
    let replugged = match (&vhost, unplugged) {
        (Some(v), true) => plug_vsock(inst, v).await,
        _ => Ok(()),
    };
    let resumed = if was_running {
        inst.exec("cont", qmp::cont {}).await.map(|_| ())
    } else {
        inst.exec("stop", qmp::stop {}).await.map(|_| ())
    };
    saved?;
    replugged?;
    resumed?;
    // Durable before the metadata exists: a snapshot with metadata is whole.
    // Done with the VM running again, so the guest does not wait for the disk.
    let t = std::time::Instant::now();
    let d = dir.to_path_buf();
    blocking("syncing the snapshot", move || ram::sync_dir(&d)).await?;
    meta.write(dir)?;
    tracing::debug!(took = ?t.elapsed(), "snapshot synced");
    Ok(meta)
}

/// With the VM stopped: device state, RAM, disks, metadata.
async fn save_stopped(
    inst: &QemuInstance,
    dir: &Path,
    ram: std::fs::File,
    meta: &mut SnapshotMeta,
) -> Result<()> {
    let t = std::time::Instant::now();
    set_ignore_shared(inst).await?;
    migrate_out(inst, &dir.join(STATE_FILE)).await?;
    let state_took = t.elapsed();
    let len = inst.info.spec.memory_mib << 20;
    let ram_path = dir.join(RAM_FILE);
    let ram_bytes = blocking("saving guest RAM", move || ram::save(&ram, len, &ram_path)).await?;
    tracing::debug!(?state_took, ram_bytes, took = ?t.elapsed(), "state and RAM saved");

    let mut disks = Vec::new();
    for (i, (d, actual)) in inst
        .info
        .spec
        .disks
        .iter()
        .zip(&inst.info.disk_paths)
        .enumerate()
    {
        let format = d.format.unwrap_or(DiskFormat::Raw);
        if d.read_only {
            let p = actual.clone();
            let id = blocking("fingerprinting a read-only disk", move || {
                FileIdentity::of(&p)
            })
            .await?;
            disks.push(SnapshotDisk {
                original: d.path.clone(),
                format,
                read_only: true,
                base: None,
                identity: Some(id),
            });
            continue;
        }
        let name = format!("disk{i}.{}", format.as_str());
        let dst = dir.join(&name);
        let chained = format == DiskFormat::Qcow2 && qcow2_has_backing(actual).unwrap_or(true);
        if chained {
            // An overlay (e.g. of a restored VM): flatten it, so the snapshot
            // does not depend on another snapshot's files. `-U`: QEMU holds
            // the image's lock, and the VM is stopped and flushed.
            run_qemu_img(
                &inst.info.qemu,
                &[
                    "convert".as_ref(),
                    "-U".as_ref(),
                    "-f".as_ref(),
                    "qcow2".as_ref(),
                    "-O".as_ref(),
                    "qcow2".as_ref(),
                    actual.as_os_str(),
                    dst.as_os_str(),
                ],
            )
            .await?;
        } else {
            let src = actual.clone();
            blocking("freezing a disk", move || ram::copy_image(&src, &dst)).await?;
        }
        disks.push(SnapshotDisk {
            original: d.path.clone(),
            format,
            read_only: false,
            base: Some(name),
            identity: None,
        });
    }
    meta.disks = disks;
    meta.files = vec![STATE_FILE.into(), RAM_FILE.into()];
    tracing::debug!(took = ?t.elapsed(), "snapshot saved");
    Ok(())
}

/// The migration stream goes over a Unix socket in QEMU's directory, copied
/// to and from the state file by capsa: QEMU runs with `spawn=deny` (no
/// `exec:` URIs) and, when confined, cannot open the snapshot directory.
const MIGRATE_SOCK: &str = "migrate.sock";

/// Saves the device state of the stopped VM to `file`.
async fn migrate_out(inst: &QemuInstance, file: &Path) -> Result<()> {
    let sock = inst.qemu_dir.join(MIGRATE_SOCK);
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock)
        .map_err(|e| Error::io(format!("binding {}", sock.display()), e))?;
    if let Some(c) = inst.creds {
        std::os::unix::fs::chown(&sock, Some(c.uid), Some(c.gid))
            .map_err(|e| Error::io(format!("handing {} to QEMU's user", sock.display()), e))?;
    }
    let mut out = tokio::fs::File::create(file)
        .await
        .map_err(|e| Error::io(format!("creating {}", file.display()), e))?;
    let path = file.to_path_buf();
    let copy = tokio::spawn(async move {
        let (mut stream, _) = tokio::time::timeout(MIGRATE_TIMEOUT, listener.accept())
            .await
            .map_err(|_| std::io::Error::other("QEMU did not connect"))??;
        tokio::time::timeout(MIGRATE_TIMEOUT, tokio::io::copy(&mut stream, &mut out))
            .await
            .map_err(|_| std::io::Error::other("the stream did not end"))??;
        tokio::io::AsyncWriteExt::flush(&mut out).await?;
        Ok::<_, std::io::Error>(())
    });
    let started = inst
        .exec(
            "migrate",
            qmp::migrate {
                uri: Some(format!("unix:{}", sock.display())),
                channels: None,
                detach: None,
                resume: None,
            },
        )
        .await;
    let waited = match started {
        Ok(_) => wait_migration(inst, "saving the device state").await,
        Err(e) => Err(e),
    };
    if waited.is_err() {
        copy.abort();
    }
    let copied = copy.await;
    let _ = std::fs::remove_file(&sock);
    waited?;
    copied
        .map_err(|e| Error::io("saving the device state", std::io::Error::other(e)))?
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// Loads the device state in `file` into a VM waiting for it (`-incoming defer`).
async fn migrate_in(inst: &QemuInstance, file: &Path) -> Result<()> {
    let sock = inst.qemu_dir.join(MIGRATE_SOCK);
    let _ = std::fs::remove_file(&sock);
    let mut input = tokio::fs::File::open(file)
        .await
        .map_err(|e| Error::io(format!("opening {}", file.display()), e))?;
    // QEMU listens (as its own user, in its own directory) once this returns.
    inst.exec(
        "migrate-incoming",
        qmp::migrate_incoming {
            uri: Some(format!("unix:{}", sock.display())),
            channels: None,
            exit_on_error: None,
        },
    )
    .await?;
    let mut stream = tokio::net::UnixStream::connect(&sock)
        .await
        .map_err(|e| Error::io(format!("connecting {}", sock.display()), e))?;
    let _ = std::fs::remove_file(&sock);
    let copy = tokio::spawn(async move {
        tokio::io::copy(&mut input, &mut stream).await?;
        tokio::io::AsyncWriteExt::shutdown(&mut stream).await
    });
    let waited = wait_migration(inst, "loading the device state").await;
    if waited.is_err() {
        copy.abort();
    }
    let copied = copy.await;
    waited?;
    // QEMU may close its end as soon as it has read the last section.
    match copied {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Ok(Err(e)) => Err(Error::io(format!("sending {}", file.display()), e)),
        Err(e) => Err(Error::io(
            "loading the device state",
            std::io::Error::other(e),
        )),
    }
}

/// Starts a VM from the snapshot in `dir`.
pub(crate) async fn restore(
    backend: &QemuBackend,
    dir: &Path,
    meta: &SnapshotMeta,
    opts: StartOptions,
) -> Result<RestoredVm> {
    let mismatch =
        |what: &str, snapshot: String, here: String, fix: &str| Error::SnapshotMismatch {
            path: dir.to_path_buf(),
            what: what.into(),
            snapshot,
            here,
            fix: fix.into(),
        };
    if meta.backend != "qemu" {
        return Err(mismatch(
            "backend",
            meta.backend.clone(),
            "qemu".into(),
            "restore it with the backend that took it",
        ));
    }
    backend.capabilities().check(&meta.spec)?;
    if meta.accel == Accel::Kvm && crate::accel::kvm_device_usable().is_err() {
        return Err(mismatch(
            "accelerator",
            "kvm".into(),
            "tcg only (no usable /dev/kvm)".into(),
            "restore on a host with KVM, or take the snapshot under TCG (--accel tcg)",
        ));
    }
    let dir = dir
        .canonicalize()
        .map_err(|e| Error::io(format!("resolving {}", dir.display()), e))?;
    let t = std::time::Instant::now();

    // Guest RAM first: filling it overlaps with QEMU's start-up.
    let len = meta.memory_mib << 20;
    let ram = ram::create_memfd(len).map_err(|e| Error::io("creating guest RAM", e))?;
    let fill = {
        let ram = ram
            .try_clone()
            .map_err(|e| Error::io("duplicating the guest RAM fd", e))?;
        let src = dir.join(RAM_FILE);
        tokio::task::spawn_blocking(move || ram::load(&src, &ram))
    };

    // Each clone writes to its own overlay on the frozen base.
    let mut spec = meta.spec.clone();
    spec.shares.clear();
    spec.console.log = None;
    let mut disk_paths = Vec::new();
    let mut backing = Vec::new();
    for (i, (d, sd)) in spec.disks.iter_mut().zip(&meta.disks).enumerate() {
        backing.push(sd.base.as_ref().map(|b| (dir.join(b), sd.format)));
        match &sd.base {
            Some(base) => {
                let overlay = opts.run_dir.join(format!("disk{i}.qcow2"));
                let base = dir.join(base);
                run_qemu_img(
                    backend.binary(),
                    &[
                        "create".as_ref(),
                        "-q".as_ref(),
                        "-f".as_ref(),
                        "qcow2".as_ref(),
                        "-F".as_ref(),
                        sd.format.as_str().as_ref(),
                        "-b".as_ref(),
                        base.as_os_str(),
                        overlay.as_os_str(),
                    ],
                )
                .await?;
                *d = DiskSpec {
                    format: Some(DiskFormat::Qcow2),
                    // The guest found its disks by serial at boot.
                    serial: d.serial.clone(),
                    ..DiskSpec::new(overlay)
                };
            }
            None => d.format = Some(sd.format),
        }
        disk_paths.push(d.path.clone());
    }

    let (mut jail, files) = crate::jail::Jail::prepare(
        backend.confinement()?,
        &opts.run_dir,
        &spec,
        meta.accel,
        &backing,
    )?;
    let vsock = crate::spawn_vsock(&spec, &opts, &jail)?;
    let (net, net_fd) = crate::spawn_net(&spec, &mut jail)?.unzip();
    let paths = args::RunPaths {
        qmp: jail.dir.join("qmp.sock"),
        vhost_vsock: vsock.as_ref().map(|d| d.config().vhost_socket.clone()),
    };
    let _ = std::fs::remove_file(&paths.qmp);
    let launch = Launch {
        ram_fd: Some(RAM_FD),
        vsock_unplugged: true,
        incoming: true,
        seccomp: jail.seccomp,
        tb_size_mib: jail.tb_size_mib(),
        files,
        share_sockets: Vec::new(),
        net_fd,
    };
    let argv = args::build_args_with(&spec, meta.accel, &paths, &opts.name, &launch)?;
    let vhost = paths.vhost_vsock.clone();
    let info = InstanceInfo {
        spec: meta.spec.clone(),
        accel: meta.accel,
        ram: Some(ram),
        disk_paths,
        qemu: backend.binary().to_path_buf(),
    };
    let mut inst = QemuInstance::spawn(
        backend.binary(),
        &argv,
        paths.qmp,
        spec.console.enabled,
        vsock,
        info,
        jail,
    )
    .await?;
    inst.net = net;
    let qemu_up = t.elapsed();
    let loaded = fill
        .await
        .map_err(|e| Error::io("loading guest RAM", std::io::Error::other(e)))?
        .map_err(|e| Error::io(format!("loading {}", dir.join(RAM_FILE).display()), e))?;
    let ram_done = t.elapsed();

    let version = qemu_version(&inst).await?;
    if version != meta.backend_version {
        return Err(mismatch(
            "QEMU version",
            meta.backend_version.clone(),
            version,
            "a saved device state loads only into the QEMU it came from: recreate the snapshot",
        ));
    }
    set_ignore_shared(&inst).await?;
    migrate_in(&inst, &dir.join(STATE_FILE))
        .await
        .map_err(|e| early_exit(&inst, e))?;
    let state_done = t.elapsed();
    if let Some(v) = &vhost {
        plug_vsock(&inst, v).await?;
    }
    inst.exec("cont", qmp::cont {}).await?;
    tracing::debug!(
        ?qemu_up,
        ?ram_done,
        ram_bytes = loaded,
        ?state_done,
        total = ?t.elapsed(),
        "restored"
    );
    Ok(RestoredVm {
        instance: Box::new(inst),
        spec,
    })
}

/// Prefers QEMU's own last words when it died while loading.
fn early_exit(inst: &QemuInstance, e: Error) -> Error {
    match inst.exit_reason() {
        Some(capsa_core::ExitReason::Failed { code, message }) => QemuError::EarlyExit {
            status: format!("exit code {code}"),
            stderr: message,
        }
        .into(),
        _ => e,
    }
}
