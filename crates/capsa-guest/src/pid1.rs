//! The PID 1 main sequence: set up, announce readiness, run, power off.

use std::time::Instant;

use crate::cmdline::{self, CmdlineError, Config, MAX_CMDLINE_BYTES};
use crate::console::{self, debug, error, warning};
use crate::setup;
use crate::supervisor::{self, Stop, Supervisor};
use crate::READY_MARKER;

/// Runs `capsa-init` as PID 1. Never returns: the VM powers off at the end,
/// after a fatal error, and after a panic.
pub fn run() -> ! {
    std::panic::set_hook(Box::new(|info| {
        // A bug hit by one agent request ends that connection (its thread
        // unwinds, the connection closes), not the whole sandbox.
        if std::thread::current().name() == Some(crate::agent::CONNECTION_THREAD) {
            error!("panic in an agent connection (dropping it): {info}");
            return;
        }
        error!("panic: {info}; powering off");
        supervisor::power_off();
    }));
    let start = Instant::now();
    if let Err(e) = supervisor::take_signals() {
        // Still usable: the workload runs, only graceful stop is degraded.
        warning!("cannot take signals / disable Ctrl-Alt-Del reboot: {e}");
    }
    let mut sup = Supervisor::new();
    match boot() {
        Ok(cfg) => {
            debug!("set up in {:?}", start.elapsed());
            console::write_line(READY_MARKER);
            let stop = match sup.start(&cfg) {
                Some(stop) => stop,
                None => sup.wait(),
            };
            if let Stop::Requested(_) = stop {
                debug!("graceful stop");
            }
        }
        Err(e) => error!("{e}; powering off"),
    }
    sup.shutdown()
}

/// Everything before the workload starts. An error here is fatal.
fn boot() -> Result<Config, BootError> {
    // The initramfs may carry /dev/console (kernel-opened stdio); reattach
    // after devtmpfs hides it, or for the first time if it did not.
    setup::mount_all().map_err(BootError::Mount)?;
    if let Err(e) = console::attach_stdio() {
        // Keep going: the workload may not need a console. Nothing can be
        // printed if this failed, which is why it is not fatal.
        warning!("cannot open /dev/console: {e}");
    }
    let cfg = read_cmdline()?;
    console::set_debug(cfg.debug);
    for w in &cfg.warnings {
        warning!("{w}");
    }
    setup::dev_links();
    let t = Instant::now();
    setup::load_modules(cfg.display);
    debug!("modules done in {:?}", t.elapsed());
    if let Err(e) = setup::set_hostname(&cfg.hostname) {
        warning!("cannot set hostname {:?}: {e}", cfg.hostname);
    }
    if let Err(e) = setup::loopback_up() {
        warning!("cannot bring up lo: {e}");
    }
    if let Some(r) = &cfg.rootfs {
        // Fatal: commands must not silently run in the initramfs instead of
        // the image the host asked for.
        crate::rootfs::mount_root(r, &cfg.hostname).map_err(BootError::Rootfs)?;
    }
    // capsa's fixed guest addresses (capsa_core::GUEST_ADDR and friends;
    // the guest crate does not depend on capsa-core).
    match setup::network_up([10, 0, 2, 15], [255, 255, 255, 0], [10, 0, 2, 2]) {
        Ok(true) => debug!("eth0 is 10.0.2.15/24 via 10.0.2.2"),
        Ok(false) => {}
        Err(e) => warning!("cannot configure eth0: {e}"),
    }
    Ok(cfg)
}

fn read_cmdline() -> Result<Config, BootError> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open("/proc/cmdline")
        .and_then(|f| f.take(MAX_CMDLINE_BYTES as u64).read_to_end(&mut buf))
        .map_err(BootError::Cmdline)?;
    cmdline::parse(&String::from_utf8_lossy(&buf)).map_err(BootError::Config)
}

/// A failure that stops the boot.
#[derive(Debug)]
enum BootError {
    Mount(std::io::Error),
    Cmdline(std::io::Error),
    Config(CmdlineError),
    Rootfs(std::io::Error),
}

impl std::fmt::Display for BootError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Mount(e) => write!(f, "{e}"),
            Self::Cmdline(e) => write!(f, "cannot read /proc/cmdline: {e}"),
            Self::Config(e) => write!(f, "{e}"),
            Self::Rootfs(e) => write!(f, "cannot mount the image root filesystem: {e}"),
        }
    }
}
