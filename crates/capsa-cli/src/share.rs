//! `capsa share add|rm|ls` and the `-v HOST:GUEST[:ro]` flag of `run` and `create`.
//!
//! Attach and detach go through the service to the sandbox's monitor (its
//! RPC starts virtiofsd and hot-plugs the device), then to the guest agent
//! (mount/unmount), so they work on any running sandbox: created, restored,
//! or taken from a pool, directly or through capsad.

use std::process::ExitCode;

use capsa::ShareSpec;
use capsa_api::types::ShareRequest;

use crate::service::{connect, Conn};

/// `capsa share ...`.
#[derive(clap::Subcommand, Debug)]
pub enum ShareCmd {
    /// Mount a host directory in a running sandbox: `share add NAME HOST:GUEST[:ro]`.
    Add {
        /// The sandbox.
        name: String,
        /// HOST:GUEST, or HOST:GUEST:ro for a read-only share (enforced by the host).
        #[arg(value_name = "HOST:GUEST[:ro]")]
        share: String,
    },
    /// Unmount and detach the share at GUEST: `share rm NAME GUEST`.
    Rm {
        /// The sandbox.
        name: String,
        /// The guest path the share is mounted at.
        guest: String,
    },
    /// List a sandbox's shares.
    Ls {
        /// The sandbox.
        name: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// `-v` values as service requests (host path made absolute; the service
/// checks the host side: the caller's own, or capsad's allow-list).
pub fn share_requests(v: &[String]) -> anyhow::Result<Vec<ShareRequest>> {
    v.iter()
        .map(|s| Ok(ShareRequest::of(&ShareSpec::parse_cli(s)?)))
        .collect()
}

pub async fn run(conn: &Conn, cmd: ShareCmd) -> anyhow::Result<ExitCode> {
    let svc = connect(conn)?;
    match cmd {
        ShareCmd::Add { name, share } => {
            let req = ShareRequest::of(&ShareSpec::parse_cli(&share)?);
            svc.share_add(&name, req).await?;
        }
        ShareCmd::Rm { name, guest } => svc.share_remove(&name, &guest).await?,
        ShareCmd::Ls { name, json } => {
            let shares: Vec<ShareSpec> = svc
                .share_list(&name)
                .await?
                .iter()
                .map(ShareRequest::spec)
                .collect();
            print_shares(&shares, json)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_shares(shares: &[ShareSpec], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(shares)?);
    } else {
        println!("{:<24} {:<4} HOST", "GUEST", "MODE");
        for s in shares {
            println!(
                "{:<24} {:<4} {}",
                s.guest,
                if s.read_only() { "ro" } else { "rw" },
                s.host.display()
            );
        }
    }
    Ok(())
}
