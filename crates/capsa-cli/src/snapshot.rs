//! Named snapshots: `capsa snapshot create|ls|rm`. `capsa create
//! --from-snapshot` restores one.
//!
//! Snapshots live in the service's snapshot store: locally
//! `--snapshot-dir` / `$CAPSA_SNAPSHOT_DIR`, else
//! `~/.local/share/capsa/snapshots` (see [`capsa::Snapshots`]); with
//! `--host`, capsad's store.

use std::process::ExitCode;

use crate::service::{connect, each_name, Conn};

/// `capsa snapshot ...`.
#[derive(clap::Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Snapshot a running named sandbox (it keeps running) as SNAPSHOT.
    Create {
        /// The sandbox.
        name: String,
        /// The snapshot's name (the sandbox naming rule applies).
        snapshot: String,
    },
    /// List snapshots.
    Ls {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Remove snapshots.
    Rm {
        /// The snapshots.
        #[arg(required = true)]
        snapshots: Vec<String>,
    },
}

fn header() {
    println!(
        "{:<24} {:>9} {:>4} {:>8} {:<24} CREATED",
        "NAME", "SIZE", "CPUS", "MEMORY", "SOURCE"
    );
}

fn row(
    name: &str,
    size: u64,
    cpus: Option<u32>,
    mem: Option<u64>,
    source: Option<&str>,
    problem: Option<&str>,
    created_at: u64,
) {
    println!(
        "{:<24} {:>9} {:>4} {:>8} {:<24} {}",
        name,
        human_size(size),
        cpus.map_or("-".into(), |c| c.to_string()),
        mem.map_or("-".into(), |m| format!("{m}M")),
        source.unwrap_or("-"),
        match problem {
            Some(p) => format!("unusable: {p}"),
            None => crate::named::ago(created_at),
        }
    );
}

pub async fn run(conn: &Conn, cmd: SnapshotCmd) -> anyhow::Result<ExitCode> {
    let svc = connect(conn)?;
    match cmd {
        SnapshotCmd::Create { name, snapshot } => {
            let e = svc.snapshot_create(&name, &snapshot).await?;
            println!("{}", e.name);
        }
        SnapshotCmd::Ls { json } => {
            let list = svc.snapshot_list().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(ExitCode::SUCCESS);
            }
            header();
            for s in list {
                row(
                    &s.name,
                    s.size_bytes,
                    s.cpus,
                    s.memory_mib,
                    s.source.as_deref(),
                    s.problem.as_deref(),
                    s.created_at,
                );
            }
        }
        SnapshotCmd::Rm { snapshots } => {
            let svc = svc.as_ref();
            return Ok(
                each_name(&snapshots, |s| async move { svc.snapshot_remove(&s).await }).await,
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// "1.2G", "340M", "12K" (binary units).
fn human_size(b: u64) -> String {
    const K: u64 = 1024;
    match b {
        0..K => format!("{b}B"),
        K..0x10_0000 => format!("{:.0}K", b as f64 / K as f64),
        0x10_0000..0x4000_0000 => format!("{:.0}M", b as f64 / (K * K) as f64),
        _ => format!("{:.1}G", b as f64 / (K * K * K) as f64),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::human_size(10), "10B");
        assert_eq!(super::human_size(2048), "2K");
        assert_eq!(super::human_size(300 << 20), "300M");
        assert_eq!(super::human_size(3 << 29), "1.5G");
    }
}
