//! `capsa`: the command-line face of capsa. Every command turns its flags into
//! the same `VmSpec` the library builds, and calls the library.

mod boot;
mod console_io;
mod doctor;
mod exec_io;
mod image;
mod image_ext;
mod named;
mod network;
mod pool;
mod port;
mod run;
mod screen;
mod service;
mod share;
mod snapshot;
mod term;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "capsa",
    version,
    about = "Run untrusted work in lightweight Linux VMs"
)]
struct Cli {
    /// More log output (--verbose info, twice debug); RUST_LOG overrides.
    /// (`-v` is `--volume` of `run` and `create`, as in Docker.)
    #[arg(long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(flatten)]
    conn: service::Conn,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a command in a fresh sandbox VM; exits with the command's exit code.
    Run(run::RunArgs),
    /// Boot a VM and attach this terminal to its serial console.
    Boot(boot::BootArgs),
    /// Check QEMU, the accelerator, the guest kernel and the cache, with a fix for each miss.
    Doctor,
    /// List the VM backends and what they support.
    Backends {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Manage guest bundles (kernel + initramfs).
    #[command(subcommand)]
    Image(image::ImageCmd),
    /// Create a named sandbox that keeps running after this command returns.
    Create(named::CreateArgs),
    /// List named sandboxes.
    Ps(named::PsArgs),
    /// Run a command in a named sandbox; exits with the command's exit code.
    Exec(named::ExecArgs),
    /// Copy files between the host and a sandbox: `cp SRC NAME:/DST` or `cp NAME:/SRC DST`.
    Cp(named::CpArgs),
    /// Print a sandbox's console output.
    Logs(named::LogsArgs),
    /// Attach this terminal to a sandbox's serial console (Ctrl-] detaches).
    Attach(named::NameArgs),
    /// Boot a stopped sandbox again.
    Start(named::NameArgs),
    /// Shut a sandbox down (gracefully, then by force after --timeout).
    Stop(named::StopArgs),
    /// End a sandbox's VM at once.
    Kill(named::NameArgs),
    /// Remove sandboxes and their state.
    Rm(named::RmArgs),
    /// Show everything known about a sandbox, as JSON.
    Inspect(named::InspectArgs),
    /// Save, list and remove named snapshots of sandboxes (`create --from-snapshot` restores one).
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCmd),
    /// capsad's warm pools of ready sandboxes: create, ls, acquire, rm (needs --host).
    #[command(subcommand)]
    Pool(pool::PoolCmd),
    /// Attach or detach shared host directories on a running sandbox: add, rm, ls.
    #[command(subcommand)]
    Share(share::ShareCmd),
    /// A sandbox's network: its decision log, its policy, and policy changes at run time.
    #[command(subcommand)]
    Network(network::NetworkCmd),
    /// Host ports forwarded into a running sandbox: add, rm, ls.
    #[command(subcommand)]
    Port(port::PortCmd),
    /// A sandbox's screen (created with --display): screenshots and input.
    #[command(subcommand)]
    Screen(screen::ScreenCmd),
}

/// `run`, `boot`, `image`, `doctor` and `backends` work on this machine
/// only: a daemon or state directory given to them must not be ignored
/// silently (`CAPSA_HOST` exported would otherwise run locally unnoticed).
fn check_local_only(cli: &Cli, matches: &clap::ArgMatches) -> Result<(), String> {
    use clap::parser::ValueSource;
    let what = match &cli.command {
        Command::Run(_) => "run",
        Command::Boot(_) => "boot",
        Command::Image(_) => "image",
        Command::Doctor => "doctor",
        Command::Backends { .. } => "backends",
        _ => return Ok(()),
    };
    if let Some(h) = &cli.conn.host {
        let from = match matches.value_source("host") {
            Some(ValueSource::EnvVariable) => "CAPSA_HOST",
            _ => "--host",
        };
        return Err(format!(
            "`capsa {what}` works on this machine and does not go through capsad, but {from} \
             is set ({h}). Fix: unset CAPSA_HOST / drop --host to {what} here; with a daemon, \
             use `capsa create`, `capsa exec` and `capsa rm -f` instead"
        ));
    }
    for (id, flag) in [("state_dir", "--state-dir"), ("token_file", "--token-file")] {
        if matches.value_source(id) == Some(ValueSource::CommandLine) {
            return Err(format!(
                "`capsa {what}` does not use {flag} (it is for named sandboxes and capsad). \
                 Fix: drop {flag}"
            ));
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    term::restore_on_panic();
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // --allow/--deny keep their command-line order (first match wins).
    match (&mut cli.command, matches.subcommand()) {
        (Command::Run(a), Some((_, m))) => a.net.take_order(m),
        (Command::Create(a), Some((_, m))) => a.net.take_order(m),
        (Command::Network(c), Some((_, m))) => c.take_order(m),
        _ => {}
    }
    if let Err(msg) = check_local_only(&cli, &matches) {
        eprintln!("capsa: error: {msg}");
        return ExitCode::from(2);
    }
    let default = match cli.verbose {
        0 => "warn",
        1 => "info,capsa=info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("capsa: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Run(args) => run::run(args).await,
            Command::Boot(args) => boot::run(args).await,
            Command::Doctor => doctor::run().await,
            Command::Backends { json } => doctor::backends(json).await,
            Command::Image(cmd) => image::run(cmd).await,
            Command::Create(a) => named::create(&cli.conn, a).await,
            Command::Ps(a) => named::ps(&cli.conn, a).await,
            Command::Exec(a) => named::exec(&cli.conn, a).await,
            Command::Cp(a) => named::cp(&cli.conn, a).await,
            Command::Logs(a) => named::logs(&cli.conn, a).await,
            Command::Attach(a) => named::attach(&cli.conn, a).await,
            Command::Start(a) => named::start(&cli.conn, a).await,
            Command::Stop(a) => named::stop(&cli.conn, a).await,
            Command::Kill(a) => named::kill(&cli.conn, a).await,
            Command::Rm(a) => named::rm(&cli.conn, a).await,
            Command::Inspect(a) => named::inspect(&cli.conn, a).await,
            Command::Snapshot(c) => snapshot::run(&cli.conn, c).await,
            Command::Pool(c) => pool::run(&cli.conn, c).await,
            Command::Share(c) => share::run(&cli.conn, c).await,
            Command::Network(c) => network::run(&cli.conn, c).await,
            Command::Port(c) => port::run(&cli.conn, c).await,
            Command::Screen(c) => screen::run(&cli.conn, c).await,
        }
    });
    let code = match result {
        Ok(code) => code,
        Err(e) => match exec_io::not_started(&e) {
            // The shell's convention: the reason on stderr, 127 or 126.
            Some((code, message)) => {
                eprintln!("capsa: {message}");
                ExitCode::from(code)
            }
            None => {
                report(&e);
                ExitCode::FAILURE
            }
        },
    };
    // stdin may be parked in a blocking read; do not wait for it.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}

/// Prints an error with its causes and, when known, the fix.
pub(crate) fn report(e: &anyhow::Error) {
    eprintln!("capsa: error: {e}");
    let mut fix = None;
    for cause in e.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
    if let Some(ce) = e.downcast_ref::<capsa::Error>() {
        fix = ce.fix();
    }
    if let Some(ae) = e.downcast_ref::<capsa_api::ApiError>() {
        fix = ae.detail.fix.clone();
    }
    if let Some(f) = fix {
        if !e.to_string().contains(&f) {
            eprintln!("  fix: {f}");
        }
    }
}

/// Parses sizes like `512M`, `2G`, `1024` (MiB) into MiB.
pub(crate) fn parse_mib(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let (num, mult) = if let Some(n) = lower
        .strip_suffix("gib")
        .or_else(|| lower.strip_suffix("gb"))
        .or_else(|| lower.strip_suffix('g'))
    {
        (n.to_string(), 1024)
    } else if let Some(n) = lower
        .strip_suffix("mib")
        .or_else(|| lower.strip_suffix("mb"))
        .or_else(|| lower.strip_suffix('m'))
    {
        (n.to_string(), 1)
    } else {
        (lower.clone(), 1)
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid memory size {s:?}: use e.g. 512M or 2G"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::parse_mib("512M"), Ok(512));
        assert_eq!(super::parse_mib("2G"), Ok(2048));
        assert_eq!(super::parse_mib("1024"), Ok(1024));
        assert_eq!(super::parse_mib("0"), Ok(0));
        assert!(super::parse_mib("lots").is_err());
        assert!(super::parse_mib("99999999999999999999G").is_err());
    }
}
