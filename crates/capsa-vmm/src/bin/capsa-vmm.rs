//! `capsa-vmm`: the per-VM monitor. Started by the capsa library or daemon,
//! not by hand: `capsa-vmm serve --state-dir DIR [--keep-alive]`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "capsa-vmm", version, about = "capsa's per-VM monitor process")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boots DIR/spec.json and serves its control RPC on stdin/stdout and DIR/monitor.sock.
    Serve {
        /// The sandbox's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// Keep the VM running when stdin closes (the spawner went away).
        #[arg(long)]
        keep_alive: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // stderr is monitor.log: plain text, no colours.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("CAPSA_VMM_LOG").unwrap_or_else(|_| "info,capsa_qemu=debug".into()),
        )
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
    match cli.cmd {
        Cmd::Serve {
            state_dir,
            keep_alive,
        } => {
            match capsa_vmm::server::run(capsa_vmm::server::ServeOptions {
                state_dir,
                keep_alive,
            }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("capsa-vmm: {e}");
                    eprintln!("capsa-vmm: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
