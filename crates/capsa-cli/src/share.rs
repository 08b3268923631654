//! `capsa share add|rm|ls` and the `-v HOST:GUEST[:ro]` flag of `run` and `create`.
//!
//! Attach and detach go to the sandbox's monitor (its RPC starts virtiofsd and
//! hot-plugs the device), then to the guest agent (mount/unmount), so they
//! work on any running sandbox: created, restored, or taken from a pool.

use std::process::ExitCode;

use capsa::ShareSpec;
use capsad::api::ShareRequest;

use crate::named::Conn;
use crate::target::Target;

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

/// Parses `-v` values (host path made absolute, nothing checked on the host yet).
pub fn parse_volumes(v: &[String]) -> anyhow::Result<Vec<ShareSpec>> {
    v.iter()
        .map(|s| ShareSpec::parse_cli(s).map_err(anyhow::Error::from))
        .collect()
}

/// `-v` values as capsad request fields (the daemon checks them against its allow-list).
pub fn share_requests(v: &[String]) -> anyhow::Result<Vec<ShareRequest>> {
    Ok(parse_volumes(v)?
        .into_iter()
        .map(|s| ShareRequest {
            host: s.host.display().to_string(),
            read_only: s.read_only(),
            guest: s.guest,
        })
        .collect())
}

pub async fn run(conn: &Conn, cmd: ShareCmd) -> anyhow::Result<ExitCode> {
    let sandboxes = match Target::from_conn(conn)? {
        Target::Direct(s) => s,
        Target::Remote(r) => return remote(r.client(), cmd).await,
    };
    match cmd {
        ShareCmd::Add { name, share } => {
            let spec = ShareSpec::parse_cli(&share)?;
            let sb = sandboxes.open(&name).await?;
            sb.share_add(spec).await?;
        }
        ShareCmd::Rm { name, guest } => {
            let sb = sandboxes.open(&name).await?;
            sb.share_remove(&guest).await?;
        }
        ShareCmd::Ls { name, json } => {
            let sb = sandboxes.open(&name).await?;
            print_shares(&sb.shares().await?, json)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `capsa share` through capsad (which checks host paths against its allow-list).
async fn remote(c: &capsad::client::Client, cmd: ShareCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ShareCmd::Add { name, share } => {
            let req = share_requests(&[share])?;
            c.share_add(&name, &req[0]).await?;
        }
        ShareCmd::Rm { name, guest } => c.share_remove(&name, &guest).await?,
        ShareCmd::Ls { name, json } => {
            let shares: Vec<ShareSpec> = c
                .shares(&name)
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
