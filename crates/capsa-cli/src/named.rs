//! Named sandboxes that outlive the CLI: `create`, `ps`, `exec`, `cp`, `logs`,
//! `attach`, `start`, `stop`, `kill`, `rm`, `inspect`.
//!
//! Each command turns its flags into the service's request types and calls
//! the [`Service`](capsa_api::Service) that `--host` picks: the monitors in
//! the state directory, or a `capsad` daemon. No command has a second path.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use capsa::Accel;
use capsa_api::types::{AccelChoice, CreateSandboxRequest, DiskRequest};

use crate::exec_io::{self, Finished, Stdio};
use crate::service::{connect, each_name, Conn, View};

/// Flags of `capsa create`.
#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// The sandbox's name: 1-63 of a-z, 0-9, '-', '_', '.', starting with a letter or digit.
    #[arg(long)]
    pub name: String,
    /// Restore the named snapshot (see `capsa snapshot ls`) instead of booting:
    /// the VM is the snapshot's (no --cpus/--memory/--accel/--disk), with a fresh identity.
    #[arg(long, value_name = "SNAPSHOT", conflicts_with_all = ["cpus", "memory", "accel", "disks", "network", "allow", "deny"])]
    pub from_snapshot: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Guest memory, e.g. 512M or 2G.
    #[arg(long, default_value = "512M", value_parser = crate::parse_mib)]
    pub memory: u64,
    /// Environment variable for every exec (KEY=VALUE). Repeatable.
    #[arg(long = "env", short = 'e', value_parser = crate::run::parse_env)]
    pub env: Vec<(String, String)>,
    /// Default working directory for execs.
    #[arg(long, short = 'w')]
    pub workdir: Option<String>,
    /// Accelerator: auto (probe), kvm or tcg.
    #[arg(long, default_value = "auto", value_parser = crate::boot::parse_accel)]
    pub accel: Accel,
    /// Attach a disk image (raw or qcow2); append :ro for read-only, :dev to allow a host block device. Repeatable.
    #[arg(long = "disk", value_name = "PATH[:ro][:dev]")]
    pub disks: Vec<String>,
    /// Mount a host directory in the guest (virtio-fs): HOST:GUEST, or HOST:GUEST:ro for
    /// read-only (enforced by the host). Repeatable. Also works with --from-snapshot (hot-plugged).
    #[arg(short = 'v', long = "volume", value_name = "HOST:GUEST[:ro]")]
    pub volumes: Vec<String>,
    /// Print the new sandbox's record as JSON.
    #[arg(long)]
    pub json: bool,
    /// Run execs inside this OCI image (name or digest from `capsa image ls`).
    #[arg(long, value_name = "REF", conflicts_with = "from_snapshot")]
    pub image: Option<String>,
    /// With --image: cap of the tmpfs upper layer, e.g. 256M (default half the memory).
    #[arg(long, value_name = "SIZE", value_parser = crate::parse_mib, requires = "image")]
    pub tmpfs_upper: Option<u64>,
    /// With --image: a persistent upper layer on an ext4 disk image at PATH,
    /// created with SIZE (default 1G) if missing.
    #[arg(
        long,
        value_name = "PATH[:SIZE]",
        requires = "image",
        conflicts_with = "tmpfs_upper"
    )]
    pub disk_upper: Option<String>,
    #[command(flatten)]
    pub net: crate::network::NetArgs,
    /// A framebuffer display of this size, with a tablet and a keyboard
    /// (see `capsa screen`), e.g. 1280x800.
    #[arg(long, value_name = "WxH", value_parser = crate::screen::parse_display, conflicts_with = "from_snapshot")]
    pub display: Option<capsa_core::DisplaySpec>,
}

/// Flags of `capsa exec`.
#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// The sandbox.
    pub name: String,
    /// Stream this terminal's stdin to the command.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Run the command on a pseudo-terminal (use with -i for a shell).
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Use a pseudo-terminal even though stdin is not a terminal (implies -t).
    #[arg(long)]
    pub force_tty: bool,
    /// Environment variable (KEY=VALUE). Repeatable.
    #[arg(long = "env", short = 'e', value_parser = crate::run::parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory in the guest.
    #[arg(long, short = 'w')]
    pub workdir: Option<String>,
    /// Kill the command after this many seconds (exit code 124).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Flags of `capsa cp`.
#[derive(clap::Args, Debug)]
pub struct CpArgs {
    /// Source: a host path, or NAME:/guest/path.
    pub src: String,
    /// Destination: a host path, or NAME:/guest/path.
    pub dst: String,
}

/// Flags of `capsa logs`.
#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    /// The sandbox.
    pub name: String,
    /// Keep printing new console output until the sandbox ends or Ctrl-C.
    #[arg(short = 'f', long)]
    pub follow: bool,
}

/// Flags of `capsa ps`.
#[derive(clap::Args, Debug)]
pub struct PsArgs {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Flags of commands that take one sandbox name.
#[derive(clap::Args, Debug)]
pub struct NameArgs {
    /// The sandbox.
    pub name: String,
}

/// Flags of `capsa stop`.
#[derive(clap::Args, Debug)]
pub struct StopArgs {
    /// The sandbox.
    pub name: String,
    /// Seconds the guest gets to shut down before it is killed.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
}

/// Flags of `capsa rm`.
#[derive(clap::Args, Debug)]
pub struct RmArgs {
    /// The sandboxes.
    #[arg(required = true)]
    pub names: Vec<String>,
    /// Kill running sandboxes first.
    #[arg(short = 'f', long)]
    pub force: bool,
}

/// Flags of `capsa inspect`.
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// The sandbox.
    pub name: String,
}

pub async fn create(conn: &Conn, a: CreateArgs) -> anyhow::Result<ExitCode> {
    let svc = connect(conn)?;
    let info = svc.create(create_request(&a)?).await?;
    print_created(&a, &View::from(info))?;
    Ok(ExitCode::SUCCESS)
}

/// The service request for `capsa create`'s flags.
fn create_request(a: &CreateArgs) -> anyhow::Result<CreateSandboxRequest> {
    let env = a.env.iter().cloned().collect::<BTreeMap<_, _>>();
    // Parsed before anything starts; the service checks the host side.
    let shares = crate::share::share_requests(&a.volumes)?;
    let (image, tmpfs_upper_mib, disk_upper) =
        crate::run::image_request(a.image.as_deref(), a.tmpfs_upper, a.disk_upper.as_deref())?;
    if let Some(snap) = &a.from_snapshot {
        return Ok(CreateSandboxRequest {
            name: Some(a.name.clone()),
            env,
            workdir: a.workdir.clone(),
            from_snapshot: Some(snap.clone()),
            shares,
            start: true,
            ..Default::default()
        });
    }
    let disks = a
        .disks
        .iter()
        .map(|d| {
            let spec = capsa::DiskSpec::parse_cli(d);
            DiskRequest {
                path: spec.path.display().to_string(),
                read_only: spec.read_only,
                allow_device: spec.allow_device,
            }
        })
        .collect();
    Ok(CreateSandboxRequest {
        name: Some(a.name.clone()),
        cpus: Some(a.cpus),
        memory_mib: Some(a.memory),
        env,
        workdir: a.workdir.clone(),
        accel: Some(match a.accel {
            Accel::Auto => AccelChoice::Auto,
            Accel::Kvm => AccelChoice::Kvm,
            Accel::Tcg => AccelChoice::Tcg,
        }),
        disks,
        shares,
        image,
        tmpfs_upper_mib,
        disk_upper,
        network: a.net.spec()?,
        display: crate::screen::display_request(a.display),
        start: true,
        from_snapshot: None,
    })
}

fn print_created(a: &CreateArgs, rec: &View) -> anyhow::Result<()> {
    if a.json {
        println!("{}", serde_json::to_string_pretty(rec)?);
    } else {
        println!("{}", a.name);
    }
    Ok(())
}

pub async fn ps(conn: &Conn, a: PsArgs) -> anyhow::Result<ExitCode> {
    let svc = connect(conn)?;
    let mut list: Vec<View> = svc.list().await?.into_iter().map(View::from).collect();
    list.sort_by(|x, y| x.name.cmp(&y.name));
    if a.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<9} {:>4} {:>8} {:>8} {:<16} CREATED",
        "NAME", "STATE", "CPUS", "MEMORY", "PID", "POOL"
    );
    for r in list {
        println!(
            "{:<24} {:<9} {:>4} {:>8} {:>8} {:<16} {}",
            r.name,
            r.state,
            r.cpus.map_or("-".into(), |c| c.to_string()),
            r.memory_mib.map_or("-".into(), |m| format!("{m}M")),
            r.monitor_pid.map_or("-".into(), |p| p.to_string()),
            match (&r.pool, &r.pool_state, &r.owner) {
                (Some(p), Some(s), _) => format!("{p} ({s})"),
                (Some(p), None, _) => p.clone(),
                // Not a pool's: say who else manages it (the containerd shim).
                (None, _, Some(o)) => format!("[{o}]"),
                _ => "-".into(),
            },
            ago(r.created_at)
        );
    }
    // Where pools run (capsad), the pools themselves (a pool may have no
    // member yet); elsewhere there are none.
    if let Ok(pools) = svc.pool_list().await {
        for p in pools {
            println!(
                "pool {}: {}/{} ready, {} starting, {} acquired ({})",
                p.name, p.ready, p.size, p.starting, p.acquired_total, p.status
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn exec(conn: &Conn, a: ExecArgs) -> anyhow::Result<ExitCode> {
    let stdio = Stdio::from_flags(a.interactive, a.tty, a.force_tty)?;
    let svc = connect(conn)?;
    let mut req = exec_io::request(&a.command, stdio, a.timeout)?;
    req.env.extend(a.env.iter().cloned());
    req.cwd = a.workdir.clone();
    let mut session = svc.exec(&a.name, req).await?;
    match exec_io::drive(&mut session, stdio).await? {
        Finished::Exited(s) => Ok(exec_io::exit_code(&s)),
        ended => {
            // The sandbox stays; only the command goes (dropping the session ends it).
            if matches!(ended, Finished::Interrupted) {
                eprintln!("[capsa] interrupted; killing the command (the sandbox keeps running)");
            }
            drop(session);
            Ok(ended.signal_code().unwrap_or(ExitCode::FAILURE))
        }
    }
}

/// One side of `capsa cp`.
#[derive(Debug, PartialEq)]
enum CpEnd {
    Host(PathBuf),
    Guest { name: String, path: String },
}

fn parse_cp_end(s: &str) -> CpEnd {
    // NAME:/abs/path; anything else (./x, /x, x) is a host path.
    if let Some((n, p)) = s.split_once(':') {
        if !n.is_empty() && !n.contains('/') && p.starts_with('/') {
            return CpEnd::Guest {
                name: n.to_string(),
                path: p.to_string(),
            };
        }
    }
    CpEnd::Host(PathBuf::from(s))
}

pub async fn cp(conn: &Conn, a: CpArgs) -> anyhow::Result<ExitCode> {
    let svc = connect(conn)?;
    match (parse_cp_end(&a.src), parse_cp_end(&a.dst)) {
        (CpEnd::Host(h), CpEnd::Guest { name, path }) => {
            let fs = svc.files(&name).await?;
            capsa::copy::copy_in(fs.as_ref(), &h, &path).await?;
        }
        (CpEnd::Guest { name, path }, CpEnd::Host(h)) => {
            let fs = svc.files(&name).await?;
            let opts = capsa::CopyOutOptions::default();
            capsa::copy::copy_out(fs.as_ref(), &path, &h, &opts).await?;
        }
        (CpEnd::Host(_), CpEnd::Host(_)) => anyhow::bail!(
            "neither side of `capsa cp` names a sandbox: write one side as NAME:/absolute/guest/path"
        ),
        (CpEnd::Guest { .. }, CpEnd::Guest { .. }) => anyhow::bail!(
            "`capsa cp` copies between the host and one sandbox: make one side a host path"
        ),
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn logs(conn: &Conn, a: LogsArgs) -> anyhow::Result<ExitCode> {
    use futures::StreamExt;
    use std::io::Write;
    let svc = connect(conn)?;
    let mut s = svc.console_log(&a.name, a.follow).await?;
    let mut out = std::io::stdout();
    loop {
        tokio::select! {
            item = s.next() => match item {
                Some(chunk) => {
                    out.write_all(&chunk?)?;
                    out.flush()?;
                }
                None => return Ok(ExitCode::SUCCESS),
            },
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        }
    }
}

pub async fn attach(conn: &Conn, a: NameArgs) -> anyhow::Result<ExitCode> {
    let svc = connect(conn)?;
    let console = svc.console_attach(&a.name).await?;
    crate::console_io::attach(&a.name, console).await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn start(conn: &Conn, a: NameArgs) -> anyhow::Result<ExitCode> {
    connect(conn)?.start(&a.name).await?;
    println!("{}", a.name);
    Ok(ExitCode::SUCCESS)
}

pub async fn stop(conn: &Conn, a: StopArgs) -> anyhow::Result<ExitCode> {
    if !(a.timeout.is_finite() && a.timeout >= 0.0) {
        anyhow::bail!("--timeout must be a non-negative number of seconds");
    }
    connect(conn)?
        .stop(&a.name, Some(Duration::from_secs_f64(a.timeout)))
        .await?;
    println!("{}", a.name);
    Ok(ExitCode::SUCCESS)
}

pub async fn kill(conn: &Conn, a: NameArgs) -> anyhow::Result<ExitCode> {
    connect(conn)?.kill(&a.name).await?;
    println!("{}", a.name);
    Ok(ExitCode::SUCCESS)
}

pub async fn rm(conn: &Conn, a: RmArgs) -> anyhow::Result<ExitCode> {
    let svc = connect(conn)?;
    let svc = svc.as_ref();
    Ok(each_name(&a.names, |n| async move { svc.remove(&n, a.force).await }).await)
}

pub async fn inspect(conn: &Conn, a: InspectArgs) -> anyhow::Result<ExitCode> {
    let svc = connect(conn)?;
    let rec = svc.get(&a.name).await?;
    let mut v = serde_json::to_value(&rec)?;
    // The spec holds the network as created; a running sandbox's policy and
    // forwards may have changed since (`capsa network set`, `capsa port`).
    let has_net = rec
        .spec
        .as_ref()
        .is_some_and(|s| s.get("network").is_some_and(|n| !n.is_null()));
    if has_net {
        if let (Ok(p), Ok(ports)) = (
            svc.network_policy(&a.name).await,
            svc.port_list(&a.name).await,
        ) {
            v["network"] = serde_json::json!({ "policy": p.policy, "ports": ports });
        }
    }
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(ExitCode::SUCCESS)
}

/// "12s ago", "5m ago", ... from unix seconds.
pub(crate) fn ago(created: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let s = now.saturating_sub(created);
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cp_ends() {
        assert_eq!(
            parse_cp_end("box:/etc/hosts"),
            CpEnd::Guest {
                name: "box".into(),
                path: "/etc/hosts".into()
            }
        );
        assert_eq!(parse_cp_end("./a:b"), CpEnd::Host("./a:b".into()));
        assert_eq!(parse_cp_end("/tmp/x"), CpEnd::Host("/tmp/x".into()));
        assert_eq!(parse_cp_end("box:rel"), CpEnd::Host("box:rel".into()));
        assert_eq!(parse_cp_end("a/b:/x"), CpEnd::Host("a/b:/x".into()));
    }

    #[test]
    fn ages() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(ago(now - 5), "5s ago");
        assert_eq!(ago(now - 120), "2m ago");
        assert_eq!(ago(now - 7200), "2h ago");
    }
}
