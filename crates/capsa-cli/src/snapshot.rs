//! Named snapshots: `capsa snapshot create|ls|rm`, and the restore half of
//! `capsa create --from-snapshot`.
//!
//! Snapshots live in the snapshot store (`$CAPSA_SNAPSHOT_DIR`, else
//! `~/.local/share/capsa/snapshots`), see [`capsa::Snapshots`]. Without
//! `--host` they are handled here directly; with it, capsad's store is used
//! through its API (`/v1/snapshots`).

use std::path::PathBuf;
use std::process::ExitCode;

use capsa::{Capsa, Snapshots};

use crate::named::{Conn, CreateArgs};
use crate::target::{Target, View};

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

/// Options of the snapshot store, shared with `create --from-snapshot`.
#[derive(clap::Args, Debug, Clone)]
pub struct StoreArgs {
    /// Directory of the named snapshots (default: $XDG_DATA_HOME/capsa/snapshots,
    /// i.e. ~/.local/share/capsa/snapshots).
    #[arg(long, env = "CAPSA_SNAPSHOT_DIR", global = true)]
    pub snapshot_dir: Option<PathBuf>,
}

impl StoreArgs {
    fn store(&self) -> Snapshots {
        Snapshots::new(self.snapshot_dir.clone())
    }
}

/// The snapshot commands through capsad (its own store, not --snapshot-dir).
async fn run_remote(r: &crate::remote::Remote, cmd: SnapshotCmd) -> anyhow::Result<ExitCode> {
    let c = r.client();
    match cmd {
        SnapshotCmd::Create { name, snapshot } => {
            let e = c.snapshot(&name, &snapshot).await?;
            println!("{}", e.name);
        }
        SnapshotCmd::Ls { json } => {
            let list = c.snapshots().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(ExitCode::SUCCESS);
            }
            header();
            for e in list {
                row(
                    &e.name,
                    e.size_bytes,
                    e.cpus,
                    e.memory_mib,
                    e.source.as_deref(),
                    e.problem.as_deref(),
                    e.created_at,
                );
            }
        }
        SnapshotCmd::Rm { snapshots } => {
            let mut failed = false;
            for s in &snapshots {
                match c.delete_snapshot(s).await {
                    Ok(()) => println!("{s}"),
                    Err(e) => {
                        failed = true;
                        crate::report(&e.into());
                    }
                }
            }
            if failed {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
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

pub async fn run(conn: &Conn, store: &StoreArgs, cmd: SnapshotCmd) -> anyhow::Result<ExitCode> {
    if let Target::Remote(r) = Target::from_conn(conn)? {
        return run_remote(&r, cmd).await;
    }
    match cmd {
        SnapshotCmd::Create { name, snapshot } => {
            let Target::Direct(sandboxes) = Target::from_conn(conn)? else {
                unreachable!("--host was handled above");
            };
            let store = store.store();
            // Check the name before touching the sandbox.
            store.path(&snapshot)?;
            let sb = sandboxes.open(&name).await?;
            let entry = store.create(&snapshot, &sb).await?;
            println!("{}", entry.name);
            Ok(ExitCode::SUCCESS)
        }
        SnapshotCmd::Ls { json } => {
            let list = store.store().list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(ExitCode::SUCCESS);
            }
            header();
            for e in list {
                row(
                    &e.name,
                    e.size_bytes,
                    e.spec.as_ref().map(|s| s.cpus),
                    e.spec.as_ref().map(|s| s.memory_mib),
                    e.source.as_deref(),
                    e.problem.as_deref(),
                    e.created_at,
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        SnapshotCmd::Rm { snapshots } => {
            let store = store.store();
            let mut failed = false;
            for s in &snapshots {
                match store.remove(s) {
                    Ok(()) => println!("{s}"),
                    Err(e) => {
                        failed = true;
                        crate::report(&e.into());
                    }
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// `capsa create --name N --from-snapshot SNAPSHOT`: a keep-running sandbox
/// restored from a named snapshot, with a fresh identity.
pub async fn create_from(
    conn: &Conn,
    store: &StoreArgs,
    a: &CreateArgs,
    snapshot: &str,
    shares: Vec<capsa::ShareSpec>,
) -> anyhow::Result<View> {
    let sandboxes = match Target::from_conn(conn)? {
        Target::Direct(s) => s,
        Target::Remote(r) => return r.create_from_snapshot(a, snapshot).await,
    };
    let snap = store.store().get(snapshot)?;
    let mut b = Capsa::restore(snap.path()).name(&a.name);
    for (k, v) in &a.env {
        b = b.env(k, v);
    }
    if let Some(w) = &a.workdir {
        b = b.workdir(w);
    }
    let sb = sandboxes.create_restored(b).await?;
    // A snapshot holds no shares: hot-plugged into the restored sandbox.
    for s in shares {
        if let Err(e) = sb.share_add(s).await {
            let _ = sb.kill().await;
            let _ = sandboxes.remove(&a.name, true).await;
            return Err(e.into());
        }
    }
    let rec = sb.detach().await?;
    Ok(View::from_record(&rec))
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
