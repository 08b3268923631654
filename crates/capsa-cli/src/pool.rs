//! `capsa pool create|ls|acquire|rm`: capsad's warm pools. They live in the
//! daemon, which keeps them filled; the local service answers that pools need
//! `--host`/`CAPSA_HOST`.
//!
//! A pool keeps N sandboxes restored and idle; `acquire` hands one over at
//! once (its name is `<pool>-<hex>`) and the pool refills in the background.
//! A handed-out sandbox is an ordinary named sandbox: `capsa exec` into it,
//! `capsa rm -f` it when done (it is destroyed, never reused).

use std::process::ExitCode;

use capsa_api::types::{AcquireRequest, CreatePoolRequest};

use crate::service::{connect, each_name, Conn, View};

/// `capsa pool ...` (needs --host).
#[derive(clap::Subcommand, Debug)]
pub enum PoolCmd {
    /// Create a warm pool in capsad (it fills in the background; saved across daemon restarts).
    Create {
        /// Pool name (members are named NAME-<hex>).
        name: String,
        /// How many sandboxes to keep ready (1-32).
        #[arg(long, default_value_t = 2)]
        size: usize,
        /// vCPUs per sandbox.
        #[arg(long, conflicts_with = "snapshot")]
        cpus: Option<u32>,
        /// Guest memory per sandbox, e.g. 256M.
        #[arg(long, value_parser = crate::parse_mib, conflicts_with = "snapshot")]
        memory: Option<u64>,
        /// Restore members from this named snapshot (capsad's store) instead
        /// of a base snapshot of a fresh boot.
        #[arg(long)]
        snapshot: Option<String>,
        /// Members run commands inside this OCI image (capsad's image store).
        #[arg(long, value_name = "REF", conflicts_with = "snapshot")]
        image: Option<String>,
    },
    /// List pools: size, ready, starting, handed out.
    Ls {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Take a ready sandbox from a pool; prints its name. Release it with `capsa rm -f NAME`.
    Acquire {
        /// The pool.
        pool: String,
        /// Restore a fresh member under this name instead of handing over a
        /// ready one (a restore's time, not a handover's).
        #[arg(long)]
        name: Option<String>,
        /// Print the sandbox's record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete pools and their idle members (handed-out sandboxes stay).
    Rm {
        /// The pools.
        #[arg(required = true)]
        pools: Vec<String>,
    },
}

pub async fn run(conn: &Conn, cmd: PoolCmd) -> anyhow::Result<ExitCode> {
    let svc = connect(conn)?;
    match cmd {
        PoolCmd::Create {
            name,
            size,
            cpus,
            memory,
            snapshot,
            image,
        } => {
            let p = svc
                .pool_create(CreatePoolRequest {
                    name,
                    size,
                    cpus,
                    memory_mib: memory,
                    snapshot,
                    image,
                })
                .await?;
            println!("{}", p.name);
        }
        PoolCmd::Ls { json } => {
            let list = svc.pool_list().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<20} {:>4} {:>5} {:>8} {:>8} {:<10} SOURCE",
                "POOL", "SIZE", "READY", "STARTING", "ACQUIRED", "STATUS"
            );
            for p in list {
                println!(
                    "{:<20} {:>4} {:>5} {:>8} {:>8} {:<10} {}",
                    p.name,
                    p.size,
                    p.ready,
                    p.starting,
                    p.acquired_total,
                    p.status,
                    match (&p.snapshot, p.memory_mib) {
                        (Some(s), _) => format!("snapshot {s}"),
                        (None, Some(m)) => format!("{}x {m}M", p.cpus.unwrap_or(1)),
                        (None, None) => "default spec".into(),
                    }
                );
                if let Some(e) = &p.last_error {
                    println!("  last error: {e}");
                }
            }
        }
        PoolCmd::Acquire { pool, name, json } => {
            let v = View::from(svc.pool_acquire(&pool, AcquireRequest { name }).await?);
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{}", v.name);
            }
        }
        PoolCmd::Rm { pools } => {
            let svc = svc.as_ref();
            return Ok(each_name(&pools, |p| async move { svc.pool_remove(&p).await }).await);
        }
    }
    Ok(ExitCode::SUCCESS)
}
