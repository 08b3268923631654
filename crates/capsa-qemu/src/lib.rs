//! capsa-qemu: the external-VMM backend. capsa describes the VM, QEMU runs it.
//!
//! QEMU runs as a child process with the guest's serial console on its stdio
//! and a QMP socket for control (status, pause/resume, graceful power-off).
//! This crate knows QEMU's command line and QMP; it knows nothing about guest
//! images or the guest agent.
#![deny(missing_docs)]

pub mod accel;
pub mod args;
pub mod cgroup;
mod error;
mod instance;
pub mod jail;
pub mod ram;
pub mod share;
pub mod snapshot;
mod vm;
pub mod vnc;

use std::path::{Path, PathBuf};

use capsa_core::{
    Accel, BootSource, Capabilities, Confinement, DiskFormat, Error, Hypervisor, RestoredVm,
    Result, SnapshotMeta, StartOptions, VmInstance, VmSpec, MAX_CPUS,
};
use tokio::sync::Mutex;

pub use error::QemuError;
pub use instance::QemuInstance;

/// The QEMU backend.
#[derive(Debug)]
pub struct QemuBackend {
    binary: PathBuf,
    probe_cache: PathBuf,
    /// The accelerator `auto` resolved to, once probed in this process.
    auto: Mutex<Option<(Accel, String)>>,
    /// How QEMU is confined (from `CAPSA_CONFINE`...), or why the setting is invalid.
    confinement: std::result::Result<Confinement, String>,
}

impl QemuBackend {
    /// Finds QEMU: `$CAPSA_QEMU`, else `qemu-system-x86_64` on `PATH`.
    pub fn new() -> std::result::Result<Self, QemuError> {
        Ok(Self::with_binary(find_qemu()?))
    }

    /// Uses the given QEMU binary.
    pub fn with_binary(binary: PathBuf) -> Self {
        Self {
            binary,
            probe_cache: accel::default_cache_file(),
            auto: Mutex::new(None),
            confinement: Confinement::from_env(),
        }
    }

    /// Confines QEMU as `c` says instead of as the environment says.
    pub fn with_confinement(mut self, c: Confinement) -> Self {
        self.confinement = Ok(c);
        self
    }

    /// How QEMU is confined; an invalid `CAPSA_CONFINE`... setting is an error
    /// naming the fix, never silently ignored.
    pub fn confinement(&self) -> Result<&Confinement> {
        self.confinement.as_ref().map_err(|message| {
            // The parser's message ends with its own fix.
            let (problem, fix) = message
                .split_once(". Fix: ")
                .unwrap_or((message.as_str(), "correct or unset the variable"));
            Error::InvalidSpec {
                field: "confinement setting",
                problem: problem.to_string(),
                fix: fix.to_string(),
            }
        })
    }

    /// Keeps the accelerator probe verdict at `path` instead of the user cache.
    pub fn with_probe_cache(mut self, path: PathBuf) -> Self {
        self.probe_cache = path;
        self
    }

    /// The QEMU binary in use.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// QEMU's version line, e.g. `QEMU emulator version 7.2.22`.
    pub async fn version(&self) -> std::result::Result<String, QemuError> {
        let out = tokio::process::Command::new(&self.binary)
            .arg("--version")
            .output()
            .await
            .map_err(|source| QemuError::Spawn {
                binary: self.binary.clone(),
                source,
            })?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string())
    }

    /// The KVM probe's verdict for this host and QEMU binary: cached, or made
    /// now by booting `kernel` under KVM (once per host kernel and binary).
    async fn probe_record(&self, kernel: &Path, initrd: Option<&Path>) -> accel::ProbeRecord {
        let key = accel::probe_key(&self.binary);
        if let Some(rec) = accel::read_cached(&self.probe_cache, &key) {
            return rec;
        }
        tracing::info!("probing whether a guest really runs under KVM (once per host)");
        let (kvm_works, detail) =
            accel::boot_probe(&self.binary, kernel, initrd, accel::PROBE_TIMEOUT).await;
        let rec = accel::ProbeRecord {
            key,
            kvm_works,
            detail,
        };
        accel::write_cached(&self.probe_cache, &rec);
        rec
    }

    /// Resolves `requested` to a concrete accelerator and says why.
    ///
    /// `auto` uses KVM only if a guest kernel (the given one) really reaches
    /// init under it; the verdict is cached per host kernel and QEMU binary.
    pub async fn resolve_accel(
        &self,
        requested: Accel,
        kernel: &Path,
        initrd: Option<&Path>,
    ) -> Result<(Accel, String)> {
        match requested {
            Accel::Tcg => return Ok((Accel::Tcg, "TCG requested".into())),
            Accel::Kvm => {
                accel::kvm_device_usable().map_err(|why| Error::Unsupported {
                    backend: "qemu".into(),
                    what: format!("KVM on this host ({why})"),
                    fix: "use --accel tcg, or give this user access to /dev/kvm".into(),
                })?;
                // Forcing KVM skips the choice, not the check: where a guest
                // cannot run under it, QEMU would only crash after start.
                let rec = self.probe_record(kernel, initrd).await;
                if !rec.kvm_works {
                    return Err(Error::Unsupported {
                        backend: "qemu".into(),
                        what: format!(
                            "KVM on this host: a probe boot found guests do not run under it ({})",
                            rec.detail
                        ),
                        fix: format!(
                            "use --accel auto or tcg (delete {} to probe again)",
                            self.probe_cache.display()
                        ),
                    });
                }
                return Ok((Accel::Kvm, "KVM requested".into()));
            }
            Accel::Auto => {}
        }
        let mut cached = self.auto.lock().await;
        if let Some(v) = cached.as_ref() {
            return Ok(v.clone());
        }
        let verdict = if let Err(why) = accel::kvm_device_usable() {
            (Accel::Tcg, format!("TCG: {why}"))
        } else {
            let rec = self.probe_record(kernel, initrd).await;
            if rec.kvm_works {
                (Accel::Kvm, format!("KVM: {}", rec.detail))
            } else {
                (Accel::Tcg, format!("TCG: {}", rec.detail))
            }
        };
        tracing::debug!(accel = %verdict.0, why = %verdict.1, "accelerator chosen");
        *cached = Some(verdict.clone());
        Ok(verdict)
    }
}

/// One line of [`QemuBackend::confinement_report`].
#[derive(Debug, Clone)]
pub struct Finding {
    /// False when something the user asked for cannot be done.
    pub ok: bool,
    /// What was found.
    pub what: String,
    /// What to do about it.
    pub fix: Option<String>,
}

impl QemuBackend {
    /// What confinement VMs get on this host, for `capsa doctor`: the
    /// setting, whether QEMU accepts `-sandbox`, the privilege drop, the cgroup.
    pub async fn confinement_report(&self) -> Vec<Finding> {
        let c = match self.confinement() {
            Ok(c) => c.clone(),
            Err(e) => {
                return vec![Finding {
                    ok: false,
                    what: format!("confinement: {e}"),
                    fix: e.fix().map(str::to_string),
                }]
            }
        };
        let mut out = vec![Finding {
            ok: true,
            what: format!(
                "confinement layers: {} ({})",
                c.layers(),
                capsa_core::CONFINE_ENV
            ),
            fix: None,
        }];
        if c.seccomp {
            let ok = tokio::process::Command::new(&self.binary)
                .args(["-sandbox", args::SANDBOX, "-version"])
                .output()
                .await
                .map(|o| o.status.success())
                .unwrap_or(false);
            out.push(Finding {
                ok,
                what: if ok {
                    "QEMU runs under its seccomp filter (-sandbox)".into()
                } else {
                    "QEMU does not accept -sandbox (built without seccomp)".into()
                },
                fix: (!ok).then(|| {
                    QemuError::NoSeccomp {
                        binary: self.binary.clone(),
                        stderr: String::new(),
                    }
                    .fix()
                    .unwrap_or_default()
                }),
            });
        }
        if c.user {
            // SAFETY: geteuid has no preconditions.
            let root = unsafe { libc::geteuid() } == 0;
            out.push(Finding {
                ok: true,
                what: if root {
                    format!(
                        "QEMU runs as per-sandbox uids {}..{} with jail directories in {}",
                        c.uid_base,
                        u64::from(c.uid_base) + u64::from(c.uid_count) - 1,
                        c.jail_dir.display()
                    )
                } else {
                    "not root: QEMU runs as this user (no privilege drop, no file separation)"
                        .into()
                },
                fix: None,
            });
        }
        if c.cgroup {
            let st = tokio::task::spawn_blocking(cgroup::status)
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
            out.push(match st {
                Ok(kind) => Finding {
                    ok: true,
                    what: format!("VM cgroups capping memory and CPU: {kind}"),
                    fix: None,
                },
                // Reported, not failed: capsa works without, just uncapped.
                Err(why) => Finding {
                    ok: true,
                    what: format!("no VM cgroups, QEMU's memory and CPU are not capped ({why})"),
                    fix: Some(
                        "run as root on a host with the memory and cpu controllers, or delegate \
                         a cgroup to this user"
                            .into(),
                    ),
                },
            });
        }
        out
    }
}

/// Starts capsa's vsock device for `spec`, if it has one. It is served in
/// this process (vhost-user), so it must listen before QEMU connects to it.
/// Its vhost-user socket goes in QEMU's directory (owned by QEMU's user).
pub(crate) fn spawn_vsock(
    spec: &VmSpec,
    opts: &StartOptions,
    jail: &jail::Jail,
) -> Result<Option<capsa_vsock::VsockDevice>> {
    let Some(v) = &spec.vsock else {
        return Ok(None);
    };
    let mut cfg = capsa_vsock::VsockConfig::new(
        jail.dir.join("vhost-vsock.sock"),
        opts.run_dir.join("vsock.sock"),
    );
    cfg.guest_cid = u64::from(v.guest_cid);
    cfg.seccomp = jail.seccomp;
    let device = capsa_vsock::VsockDevice::spawn(cfg).map_err(|e| Error::Backend {
        backend: "qemu",
        message: format!("cannot start the vsock device: {e}"),
        fix: None,
        source: Some(Box::new(e)),
    })?;
    jail.give(&device.config().vhost_socket)?;
    Ok(Some(device))
}

/// Starts capsa's network stack for `spec`, if it has a network: QEMU gets
/// one end of a socket pair (`-netdev stream,addr.type=fd`), the stack in
/// this process the other. Returns the stack and QEMU's fd number.
pub(crate) fn spawn_net(
    spec: &VmSpec,
    jail: &mut jail::Jail,
) -> Result<Option<(capsa_net::NetHandle, i32)>> {
    let Some(n) = &spec.network else {
        return Ok(None);
    };
    let net_err = |e: capsa_net::NetError| Error::Backend {
        backend: "qemu",
        message: format!("cannot start the network: {e}"),
        fix: None,
        source: Some(Box::new(e)),
    };
    let cfg = capsa_net::NetConfig::from_env(n).map_err(net_err)?;
    let (ours, theirs) = capsa_net::socketpair().map_err(net_err)?;
    let fd = jail.pass_fd(theirs);
    let handle = capsa_net::spawn(ours, cfg).map_err(net_err)?;
    Ok(Some((handle, fd)))
}

fn find_qemu() -> std::result::Result<PathBuf, QemuError> {
    if let Some(p) = std::env::var_os("CAPSA_QEMU") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(QemuError::NotFound {
                looked: format!("CAPSA_QEMU={}", p.display()),
            })
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let c = dir.join("qemu-system-x86_64");
        if c.is_file() {
            return Ok(c);
        }
    }
    Err(QemuError::NotFound {
        looked: "$CAPSA_QEMU and qemu-system-x86_64 on PATH".into(),
    })
}

#[async_trait::async_trait]
impl Hypervisor for QemuBackend {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn capabilities(&self) -> Capabilities {
        let mut accels = vec![Accel::Tcg];
        if accel::kvm_device_usable().is_ok() {
            accels.push(Accel::Kvm);
        }
        Capabilities {
            backend: "qemu".into(),
            accels,
            disk_formats: vec![DiskFormat::Raw, DiskFormat::Qcow2],
            read_only_disks: true,
            max_cpus: MAX_CPUS,
            console: true,
            pause: true,
            graceful_shutdown: true,
            vsock: true,
            snapshot: true,
            shares: share::running_as_root(),
            network: true,
            display: true,
        }
    }

    async fn start(&self, spec: VmSpec, opts: StartOptions) -> Result<Box<dyn VmInstance>> {
        self.capabilities().check(&spec)?;
        let BootSource::LinuxDirect { kernel, initrd, .. } = &spec.boot;
        let (accel, why) = self
            .resolve_accel(spec.accel, kernel, initrd.as_deref())
            .await?;
        tracing::debug!(%accel, %why, name = %opts.name, "starting QEMU");
        let (mut jail, files) =
            jail::Jail::prepare(self.confinement()?, &opts.run_dir, &spec, accel, &[])?;
        let vsock = spawn_vsock(&spec, &opts, &jail)?;
        let (net, net_fd) = spawn_net(&spec, &mut jail)?.unzip();
        let paths = args::RunPaths {
            qmp: jail.dir.join("qmp.sock"),
            vhost_vsock: vsock.as_ref().map(|d| d.config().vhost_socket.clone()),
        };
        let _ = std::fs::remove_file(&paths.qmp);
        // capsa owns guest RAM (a memfd QEMU inherits), so snapshots can copy it directly.
        let ram = ram::create_memfd(spec.memory_mib << 20)
            .map_err(|e| Error::io("creating guest RAM (memfd)", e))?;
        // Each share's virtiofsd listens before QEMU starts and connects to it.
        let boot_procs = match jail.cgroup.as_ref() {
            Some(c) if !spec.shares.is_empty() => c
                .join_handles()
                .map_err(|e| Error::io("keeping the VM cgroup's handles", e))?,
            _ => Vec::new(),
        };
        let mut started = Vec::new();
        for (i, s) in spec.shares.iter().enumerate() {
            let socket = jail.dir.join(format!("virtiofs{i}.sock"));
            match share::spawn(s, &socket, jail.creds, &boot_procs) {
                Ok(daemon) => started.push(share::ActiveShare {
                    spec: s.clone(),
                    daemon,
                }),
                Err(e) => {
                    for d in started {
                        d.daemon.stop().await;
                    }
                    return Err(e);
                }
            }
        }
        let launch = args::Launch {
            ram_fd: Some(instance::RAM_FD),
            seccomp: jail.seccomp,
            tb_size_mib: jail.tb_size_mib(),
            files,
            share_sockets: (0..spec.shares.len())
                .map(|i| jail.dir.join(format!("virtiofs{i}.sock")))
                .collect(),
            net_fd,
            ..Default::default()
        };
        let argv = args::build_args_with(&spec, accel, &paths, &opts.name, &launch)?;
        let info = instance::InstanceInfo {
            disk_paths: spec.disks.iter().map(|d| d.path.clone()).collect(),
            spec: spec.clone(),
            accel,
            ram: Some(ram),
            qemu: self.binary.clone(),
        };
        let mut inst = QemuInstance::spawn(
            &self.binary,
            &argv,
            paths.qmp,
            spec.console.enabled,
            vsock,
            info,
            jail,
        )
        .await?;
        inst.set_boot_shares(started);
        inst.net = net;
        Ok(Box::new(inst))
    }

    async fn restore(
        &self,
        dir: &Path,
        meta: &SnapshotMeta,
        opts: StartOptions,
    ) -> Result<RestoredVm> {
        snapshot::restore(self, dir, meta, opts).await
    }
}
