//! `capsad`: the capsa daemon (runs in the foreground; see the crate README).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// The capsa daemon: an HTTP+JSON API on a Unix socket to manage sandboxes.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// State root (sandboxes, socket, token); the library's StateRoot. Default:
    /// $XDG_RUNTIME_DIR/capsa, /run/capsa for root, else $TMPDIR/capsa-<uid>.
    #[arg(long, env = "CAPSA_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Unix socket to serve on. Default: <state dir>/capsad.sock.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Let this group connect (socket mode 0660 instead of 0600).
    #[arg(long)]
    socket_group: Option<String>,
    /// Bearer token file (0600; generated when missing). Default: <state dir>/capsad.token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Also serve on this loopback TCP address (e.g. 127.0.0.1:7070), same auth.
    #[arg(long)]
    listen_tcp: Option<SocketAddr>,
    /// Keep a warm pool of restored sandboxes: NAME=SIZE, optionally
    /// followed by ,memory=MIB ,cpus=N or ,snapshot=SNAPSHOT (repeatable).
    /// Members are named NAME-<hex>; take one with POST /v1/pools/NAME/acquire.
    #[arg(long = "pool", value_name = "NAME=SIZE[,memory=MIB][,cpus=N][,snapshot=S]", value_parser = capsa_api::local::pools::parse_pool_flag)]
    pools: Vec<capsa_api::local::pools::PoolConfig>,
    /// Most ready pool members the daemon holds across all pools (each is a running VM).
    #[arg(long, default_value_t = capsa_api::local::pools::DEFAULT_MAX_POOL_MEMBERS)]
    max_pool_members: usize,
    /// Named snapshot store. Default: the library's (CAPSA_SNAPSHOT_DIR,
    /// else $XDG_DATA_HOME/capsa/snapshots, else ~/.local/share/capsa/snapshots).
    #[arg(long)]
    snapshot_dir: Option<PathBuf>,
    /// Let API clients attach regular files below DIR as disks (repeatable).
    /// capsad's state dir and capsa's cache are always allowed; nothing else
    /// on the host is: no other files, no devices, no symlinks leading out.
    #[arg(long = "allow-disk-dir", value_name = "DIR")]
    allow_disk_dirs: Vec<PathBuf>,
    /// Print the OpenAPI document and exit.
    #[arg(long)]
    print_openapi: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tarpc=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.print_openapi {
        match capsad::server::openapi().to_pretty_json() {
            Ok(s) => {
                use std::io::Write;
                let _ = writeln!(std::io::stdout(), "{s}");
                return std::process::ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("capsad: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    let state_dir = args
        .state_dir
        .unwrap_or_else(|| capsa::StateRoot::default_root().path().to_path_buf());
    let cfg = capsad::daemon::Config {
        state_dir: state_dir.clone(),
        socket: args.socket,
        socket_group: args.socket_group,
        token_file: args.token_file,
        listen_tcp: args.listen_tcp,
        pools: args.pools,
        max_pool_members: args.max_pool_members,
        snapshot_dir: args.snapshot_dir,
        allow_disk_dirs: args.allow_disk_dirs,
    };
    match capsad::daemon::run(cfg).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("capsad: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
