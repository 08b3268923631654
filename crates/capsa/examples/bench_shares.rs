//! Shared directory benchmarks (BENCHMARKS.md, issue 12), side by side in one run:
//! - sequential write and read of a 128 MiB file through a share vs the
//!   guest's own tmpfs (`/tmp`; the guest's root is an initramfs, it has no disk);
//! - `find | wc -l` over a 10,000-file tree through the share vs the same tree
//!   in the guest's tmpfs, and `capsa cp` of the tree into the guest
//!   (`Sandbox::copy_in`, the walk `capsa cp` runs);
//! - attaching (and detaching) a share on a sandbox taken from a pool.
//!
//! Guest page caches are dropped before each read and each `find`, so the
//! share's numbers are the virtio-fs path, not the guest's cache. Each exec
//! is timed on the host and the median time of an `exec true` is subtracted.
//!
//! `cargo run --release -p capsa --example bench_shares -- [runs]` (as root, like the tests)

#[allow(dead_code)] // the shared helpers include ones this benchmark does not use
mod common;

use std::time::Instant;

use capsa::{Capsa, Command, Sandbox, ShareMode, ShareSpec};

const FILE_MIB: u64 = 128;
const TREE_DIRS: usize = 100;
const TREE_FILES: usize = 100;

async fn timed(sb: &Sandbox, script: &str) -> anyhow::Result<(f64, String)> {
    let t = Instant::now();
    let out = sb.exec(&Command::new("sh").args(["-c", script])).await?;
    let took = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        out.status.code == Some(0),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((took, String::from_utf8_lossy(&out.stdout).into_owned()))
}

fn make_tree(root: &std::path::Path) -> anyhow::Result<()> {
    for d in 0..TREE_DIRS {
        let dir = root.join(format!("d{d:03}"));
        std::fs::create_dir_all(&dir)?;
        for f in 0..TREE_FILES {
            std::fs::write(dir.join(format!("f{f:03}.txt")), format!("file {d} {f}\n"))?;
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let tmp = tempfile::tempdir()?;
    let share = tmp.path().join("share");
    std::fs::create_dir(&share)?;
    make_tree(&share.join("tree"))?;

    let sb = Capsa::sandbox()
        .memory_mb(1024)
        .accel(capsa::Accel::Tcg)
        .share(&share, "/work", ShareMode::ReadWrite)
        .build()
        .await?;
    let mut base = Vec::new();
    for _ in 0..runs {
        base.push(timed(&sb, "true").await?.0);
    }
    let base = common::median(base);
    println!(
        "exec true, median of {runs}: {:.3}s (subtracted below)",
        base
    );

    let drop = "sync; echo 3 > /proc/sys/vm/drop_caches";
    for (label, dir) in [("share (virtio-fs)", "/work"), ("guest tmpfs", "/tmp")] {
        let (mut w, mut r, mut f) = (Vec::new(), Vec::new(), Vec::new());
        if dir == "/tmp" {
            timed(&sb, "cp -a /work/tree /tmp/tree").await?;
        }
        for _ in 0..runs {
            let (t, _) = timed(
                &sb,
                &format!(
                    "rm -f {dir}/big; dd if=/dev/zero of={dir}/big bs=1M count={FILE_MIB} conv=fsync 2>/dev/null"
                ),
            )
            .await?;
            w.push(t - base);
            timed(&sb, drop).await?;
            let (t, _) = timed(
                &sb,
                &format!("dd if={dir}/big of=/dev/null bs=1M 2>/dev/null"),
            )
            .await?;
            r.push(t - base);
            timed(&sb, drop).await?;
            let (t, n) = timed(&sb, &format!("find {dir}/tree | wc -l")).await?;
            anyhow::ensure!(
                n.trim() == (1 + TREE_DIRS + TREE_DIRS * TREE_FILES).to_string(),
                "find saw {n}"
            );
            f.push(t - base);
        }
        timed(&sb, &format!("rm -f {dir}/big")).await?;
        let (w, r, f) = (common::median(w), common::median(r), common::median(f));
        println!(
            "{label}: write {FILE_MIB} MiB {:.3}s ({:.0} MiB/s), read {:.3}s ({:.0} MiB/s), find|wc -l over {} entries {:.3}s",
            w,
            FILE_MIB as f64 / w,
            r,
            FILE_MIB as f64 / r,
            1 + TREE_DIRS + TREE_DIRS * TREE_FILES,
            f
        );
    }
    let mut cp = Vec::new();
    for i in 0..runs {
        let t = Instant::now();
        sb.copy_in(&share.join("tree"), &format!("/tmp/cp{i}"))
            .await?;
        cp.push(t.elapsed().as_secs_f64());
        timed(&sb, &format!("rm -rf /tmp/cp{i}")).await?;
    }
    println!(
        "capsa cp (Sandbox::copy_in) of the tree into the guest, median of {runs}: {:.3}s",
        common::median(cp)
    );
    sb.kill().await?;

    // Attach cost on pooled (restored) sandboxes.
    let pool = Capsa::pool(Capsa::sandbox().memory_mb(512).accel(capsa::Accel::Tcg))
        .size(1)
        .build()
        .await?;
    let (mut add, mut first, mut rm) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let sb = pool.acquire().await?;
        let t = Instant::now();
        sb.share_add(ShareSpec::new(&share, "/work", ShareMode::ReadOnly))
            .await?;
        add.push(t.elapsed().as_secs_f64());
        let (t, _) = timed(&sb, "cat /work/tree/d000/f000.txt").await?;
        first.push(t);
        let t = Instant::now();
        sb.share_remove("/work").await?;
        rm.push(t.elapsed().as_secs_f64());
        sb.kill().await?;
    }
    println!(
        "pooled sandbox, median of {runs}: share_add (virtiofsd start + hot-plug + mount) {:.3}s; first read {:.3}s; share_remove {:.3}s",
        common::median(add),
        common::median(first),
        common::median(rm)
    );
    Ok(())
}
