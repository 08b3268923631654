//! `capsa run`: a fresh sandbox, one command, its output and exit code, teardown.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use capsa::{Accel, Capsa, DiskSpec};

use crate::exec_io::{self, Finished, Stdio};

/// Flags of `capsa run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Guest memory, e.g. 512M or 2G.
    #[arg(long, default_value = "512M", value_parser = crate::parse_mib)]
    memory: u64,
    /// Environment variable for the command (KEY=VALUE). Repeatable.
    #[arg(long = "env", short = 'e', value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory in the guest.
    #[arg(long, short = 'w')]
    workdir: Option<String>,
    /// Stream this terminal's stdin to the command.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Run the command on a pseudo-terminal (use with -i for a shell).
    #[arg(short = 't', long)]
    tty: bool,
    /// Use a pseudo-terminal even though stdin is not a terminal (implies -t).
    #[arg(long)]
    force_tty: bool,
    /// Accelerator: auto (probe), kvm or tcg.
    #[arg(long, default_value = "auto", value_parser = crate::boot::parse_accel)]
    accel: Accel,
    /// Kill the command after this many seconds (exit code 124, like timeout(1)).
    #[arg(long)]
    timeout: Option<f64>,
    /// Attach a disk image (raw or qcow2); append :ro for read-only, :dev to allow a host block device. Repeatable.
    #[arg(long = "disk", value_name = "PATH[:ro][:dev]")]
    disks: Vec<String>,
    /// Mount a host directory in the guest (virtio-fs): HOST:GUEST, or HOST:GUEST:ro for
    /// read-only (enforced by the host). Files the guest writes belong to the directory's owner. Repeatable.
    #[arg(short = 'v', long = "volume", value_name = "HOST:GUEST[:ro]")]
    volumes: Vec<String>,
    /// Copy a host file or directory into the guest before the command: HOST:GUEST. Repeatable.
    #[arg(long = "copy-in", value_name = "HOST:GUEST", value_parser = parse_copy_in)]
    copy_in: Vec<(PathBuf, String)>,
    /// Copy a guest file or directory out after the command: GUEST:HOST. Repeatable.
    #[arg(long = "copy-out", value_name = "GUEST:HOST", value_parser = parse_copy_out)]
    copy_out: Vec<(String, PathBuf)>,
    /// A name for the VM.
    #[arg(long)]
    name: Option<String>,
    /// Boot cold instead of restoring the cached base snapshot of this spec
    /// (by default the first run saves one and later runs restore it).
    #[arg(long)]
    no_snapshot: bool,
    /// Run the command inside this OCI image (name or digest from `capsa
    /// image ls`); without a command, the image's Entrypoint + Cmd run.
    #[arg(long, value_name = "REF")]
    image: Option<String>,
    /// With --image: cap of the tmpfs upper layer, e.g. 256M (default half the memory).
    #[arg(long, value_name = "SIZE", value_parser = crate::parse_mib, requires = "image")]
    tmpfs_upper: Option<u64>,
    /// With --image: an upper layer on an ext4 disk image at PATH, created
    /// with SIZE (default 1G) if missing and kept afterwards.
    #[arg(
        long,
        value_name = "PATH[:SIZE]",
        requires = "image",
        conflicts_with = "tmpfs_upper"
    )]
    disk_upper: Option<String>,
    #[command(flatten)]
    pub net: crate::network::NetArgs,
    /// A framebuffer display of this size with a tablet and a keyboard, e.g. 1280x800.
    #[arg(long, value_name = "WxH", value_parser = crate::screen::parse_display)]
    display: Option<capsa_core::DisplaySpec>,
    /// The command and its arguments (with --image: arguments after the
    /// image's Entrypoint, replacing its Cmd, as in Docker).
    #[arg(last = true, required_unless_present = "image", value_name = "CMD")]
    command: Vec<String>,
}

/// Applies `--image`, `--tmpfs-upper` and `--disk-upper PATH[:SIZE]` to `b`.
pub(crate) fn image_flags(
    mut b: capsa::SandboxBuilder,
    image: Option<&str>,
    tmpfs_upper: Option<u64>,
    disk_upper: Option<&str>,
) -> anyhow::Result<capsa::SandboxBuilder> {
    let Some(image) = image else {
        return Ok(b);
    };
    b = b.image(image);
    if let Some(size_mib) = tmpfs_upper {
        b = b.upper(capsa::rootfs::Upper::Tmpfs { size_mib });
    }
    if let Some(d) = disk_upper {
        let (path, size_mib) = match d.rsplit_once(':') {
            Some((p, size)) if !p.is_empty() => {
                (p, crate::parse_mib(size).map_err(anyhow::Error::msg)?)
            }
            _ => (d, 1024),
        };
        let path = std::path::absolute(path)?;
        b = b.upper(capsa::rootfs::Upper::Disk { path, size_mib });
    }
    Ok(b)
}

/// `--image`, `--tmpfs-upper` and `--disk-upper PATH[:SIZE]` as the service's
/// create fields (image, tmpfs cap, disk upper).
#[allow(clippy::type_complexity)]
pub(crate) fn image_request(
    image: Option<&str>,
    tmpfs_upper: Option<u64>,
    disk_upper: Option<&str>,
) -> anyhow::Result<(
    Option<String>,
    Option<u64>,
    Option<capsa_api::types::DiskUpperRequest>,
)> {
    let Some(image) = image else {
        return Ok((None, None, None));
    };
    let disk = match disk_upper {
        None => None,
        Some(d) => {
            let (path, size_mib) = match d.rsplit_once(':') {
                Some((p, size)) if !p.is_empty() => {
                    (p, crate::parse_mib(size).map_err(anyhow::Error::msg)?)
                }
                _ => (d, 1024),
            };
            Some(capsa_api::types::DiskUpperRequest {
                path: std::path::absolute(path)?.display().to_string(),
                size_mib,
            })
        }
    };
    Ok((Some(image.to_string()), tmpfs_upper, disk))
}

pub(crate) fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

fn parse_copy_in(s: &str) -> Result<(PathBuf, String), String> {
    // The guest side is absolute, so the last ':' separates (host paths may hold ':').
    match s.rsplit_once(':') {
        Some((h, g)) if !h.is_empty() && g.starts_with('/') => {
            Ok((PathBuf::from(h), g.to_string()))
        }
        _ => Err(format!(
            "{s:?} is not HOST:GUEST with an absolute GUEST path"
        )),
    }
}

fn parse_copy_out(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once(':') {
        Some((g, h)) if g.starts_with('/') && !h.is_empty() => {
            Ok((g.to_string(), PathBuf::from(h)))
        }
        _ => Err(format!(
            "{s:?} is not GUEST:HOST with an absolute GUEST path"
        )),
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    // Refused before anything boots.
    let stdio = Stdio::from_flags(args.interactive, args.tty, args.force_tty)?;
    // With an image the command is known once the image is (its Entrypoint/Cmd).
    let early = match &args.image {
        None => Some(exec_io::request(&args.command, stdio, args.timeout)?),
        Some(_) => None,
    };
    let mut b = Capsa::sandbox()
        .cpus(args.cpus)
        .memory_mb(args.memory)
        .accel(args.accel);
    for (k, v) in &args.env {
        b = b.env(k, v);
    }
    if let Some(w) = &args.workdir {
        b = b.workdir(w);
    }
    for d in &args.disks {
        b = b.disk(DiskSpec::parse_cli(d));
    }
    for v in &args.volumes {
        b = b.share_spec(capsa::ShareSpec::parse_cli(v)?);
    }
    if let Some(n) = &args.name {
        b = b.name(n);
    }
    b = image_flags(
        b,
        args.image.as_deref(),
        args.tmpfs_upper,
        args.disk_upper.as_deref(),
    )?;
    b = b.network(args.net.spec()?).display_spec(args.display);
    // Ctrl-C, SIGHUP or SIGTERM while booting tears the VM down too:
    // dropping the future drops the VM.
    let mut signals = crate::term::Hangup::catch()?;
    let sb = tokio::select! {
        r = async {
            if args.no_snapshot {
                b.fast_start(false).build().await
            } else {
                capsa::base_snapshot::build(b).await
            }
        } => r?,
        sig = signals.recv() => return Ok(ExitCode::from((128 + sig) as u8)),
    };
    let copied = tokio::select! {
        r = async {
            for (h, g) in &args.copy_in {
                sb.copy_in(h, g).await?;
            }
            Ok::<_, capsa::Error>(())
        } => Some(r),
        sig = signals.recv() => { sb.kill().await?; return Ok(ExitCode::from((128 + sig) as u8)) }
    };
    if let Some(r) = copied {
        r?;
    }
    // From here `drive` catches the signals itself.
    drop(signals);
    let req = match early {
        Some(r) => r,
        None => {
            let argv = sb.image_command(&args.command);
            match exec_io::request(&argv, stdio, args.timeout) {
                Ok(r) => r,
                Err(e) => {
                    let _ = sb.kill().await;
                    return Err(e.context(
                        "the image has no Entrypoint or Cmd; fix: give a command after `--`",
                    ));
                }
            }
        }
    };
    let cmd = match capsa_api::local::command_of(&req) {
        Ok((c, _)) => c,
        Err(e) => {
            let _ = sb.kill().await;
            return Err(e.into());
        }
    };

    let child = match sb.spawn(&cmd).await {
        Ok(c) => c,
        Err(e) => {
            let _ = sb.kill().await;
            return Err(capsa_api::ApiError::from_spawn(&e).into());
        }
    };
    let mut child = capsa_api::local::exec_session(child, None, req.interactive, Box::new(()));
    let status = match exec_io::drive(&mut child, stdio).await? {
        Finished::Exited(s) => s,
        ended => {
            if matches!(ended, Finished::Interrupted) {
                eprintln!("[capsa] interrupted; tearing the sandbox down");
            }
            drop(child);
            sb.kill().await?;
            return Ok(ended.signal_code().unwrap_or(ExitCode::FAILURE));
        }
    };
    for (g, h) in &args.copy_out {
        sb.copy_out(g, h).await?;
    }
    if args.disks.is_empty() && args.disk_upper.is_none() {
        sb.kill().await?;
    } else {
        // Attached disks may hold unflushed guest writes: shut down properly.
        sb.vm().stop_timeout(Duration::from_secs(10)).await?;
    }
    Ok(exec_io::exit_code(&status))
}
