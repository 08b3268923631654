//! Helpers shared by the VM integration tests.
#![allow(dead_code)]

use std::time::Duration;

use capsa::{Capsa, LinuxDirectBoot, SandboxBuilder, Strategy, VmBuilder};

/// Generous: TCG boots take ~2 s alone, but CI machines may run several at once.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

/// The default bundle (built once, then cached).
pub async fn bundle() -> capsa::image::Bundle {
    init_tracing();
    capsa::default_bundle().await.expect("default guest bundle")
}

/// The strategy the suites run under: forced by the including test binary
/// (`crate::FORCE_MONITOR`, see `monitor_*.rs`), else `$CAPSA_TEST_STRATEGY`
/// (`monitor` or `inprocess`), else in-process.
pub fn strategy() -> Strategy {
    if crate::FORCE_MONITOR {
        return Strategy::Monitor;
    }
    match std::env::var("CAPSA_TEST_STRATEGY").as_deref() {
        Ok("monitor") => Strategy::Monitor,
        Ok("inprocess") | Ok("") | Err(_) => Strategy::InProcess,
        Ok(other) => panic!("CAPSA_TEST_STRATEGY={other}: use monitor or inprocess"),
    }
}

/// A builder for a small VM on the default guest, with its console captured.
pub async fn vm() -> VmBuilder {
    let b = bundle().await;
    Capsa::vm(LinuxDirectBoot::from_bundle(&b))
        .cpus(1)
        .memory_mb(256)
        .console()
        .strategy(strategy())
}

/// A sandbox builder on the suite's strategy.
pub fn sandbox() -> SandboxBuilder {
    init_tracing();
    // Boots, so the suite tests what a boot does; the fast start has its own test.
    Capsa::sandbox().strategy(strategy()).fast_start(false)
}

/// Child processes of this test process whose command name mentions qemu.
pub fn qemu_children() -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // comm is in parentheses and may hold spaces; fields after the last ')' are fixed.
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let comm = &stat[stat.find('(').map_or(0, |i| i + 1)..close];
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ppid: u32 = fields.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        if ppid == me && (comm.contains("qemu") || comm.starts_with("capsa-")) {
            out.push(pid);
        }
    }
    out
}

/// Whether a process exists at all (a zombie counts: it is not yet reaped).
pub fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}
