//! `capsa-init`, the first process (PID 1) of every capsa guest.
//!
//! The host boots a kernel with an initramfs whose `/init` is this binary. It
//! mounts the pseudo file systems, loads the kernel modules listed in
//! [`MODULES_LOAD_PATH`], prints [`READY_MARKER`] on the console and then runs
//! one workload (see [`cmdline::Mode`]); when the workload ends, or the host
//! asks for a graceful stop (Ctrl-Alt-Del via QMP, which the kernel turns into
//! `SIGINT` for PID 1; or `SIGTERM` / `SIGPWR`; or busybox `poweroff`/`halt`
//! in the guest, which send `SIGUSR2`/`SIGUSR1`), it stops every process
//! (`SIGTERM`, `SIGKILL` after 2 s), syncs, unmounts and powers the VM off. PID 1 must never exit (that panics the kernel), so every
//! failure ends in a logged power-off instead.
//!
//! The binary is built fully static (glibc, `+crt-static`) by the
//! `capsa-guest-bin` crate; it uses only std and libc and nothing that needs
//! NSS or `dlopen`.
//!
//! Everything that does not touch the system (command line parsing) lives in
//! [`cmdline`] and is unit-tested on the host. The vsock agent
//! (`capsa.mode=agent`, module `agent`) is transport-agnostic and also runs
//! as an ordinary host process (`capsa-init --agent-unix PATH`) for tests.
#![deny(missing_docs)]

#[cfg(target_os = "linux")]
pub mod agent;
pub mod cmdline;
#[cfg(target_os = "linux")]
mod console;
pub mod netbench;
#[cfg(target_os = "linux")]
pub mod pid1;
#[cfg(target_os = "linux")]
mod rootfs;
#[cfg(target_os = "linux")]
mod setup;
#[cfg(target_os = "linux")]
mod supervisor;
#[cfg(target_os = "linux")]
pub mod tools;

/// The line printed on the console once the guest is set up (same text as
/// `capsa_core::GUEST_READY_MARKER`); the host waits for it.
pub const READY_MARKER: &str = "capsa-init: ready";

/// Prefix of the line printed when the workload ends: `capsa-init: exit <code>`.
///
/// `<code>` is the exit status, or `128 + signal` if the workload was killed by
/// a signal (shell convention), or 127 if it could not be started.
pub const EXIT_MARKER_PREFIX: &str = "capsa-init: exit ";

/// Where the initramfs lists the kernel modules to load, one per line, in order.
///
/// A line is a path relative to `/lib/modules/<kernel release>/` or an absolute
/// path; empty lines and lines starting with `#` are skipped.
pub const MODULES_LOAD_PATH: &str = "/etc/capsa/modules.load";
/// Modules only a display needs (DRM, fbdev, virtio input, evdev), loaded
/// after [`MODULES_LOAD_PATH`] when the kernel command line has `capsa.display=1`.
pub const DISPLAY_MODULES_LOAD_PATH: &str = "/etc/capsa/modules-display.load";

/// `PATH` given to the workload.
pub const GUEST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Version of this crate, printed by `capsa-init --version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Behaviour when the binary is started by someone other than the kernel
/// (not as PID 1): print the version, or explain what the binary is.
///
/// Returns the process exit code.
pub fn not_pid1(mut args: impl Iterator<Item = String>) -> i32 {
    match args.next().as_deref() {
        #[cfg(target_os = "linux")]
        Some("--agent-unix") => match args.next() {
            Some(path) => agent::run_on_unix_socket(std::path::Path::new(&path)),
            None => {
                eprintln!("capsa-init: --agent-unix needs a socket path");
                2
            }
        },
        #[cfg(target_os = "linux")]
        Some(tool @ ("vsock-serve" | "vsock-connect" | "input-events")) => {
            let rest: Vec<String> = args.collect();
            tools::run(tool, &rest)
        }
        Some("net-bench") => {
            let rest: Vec<String> = args.collect();
            match netbench::run(&rest) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("capsa-init net-bench: {e}");
                    2
                }
            }
        }
        Some("--version") | Some("-V") => {
            println!("capsa-init {VERSION}");
            0
        }
        Some("--help") | Some("-h") => {
            println!(
                "capsa-init {VERSION}: PID 1 of capsa guests.\n\
                 It only does its work when the kernel starts it as PID 1; options come from\n\
                 the kernel command line: capsa.mode=shell|run|agent, capsa.run=PATH,\n\
                 capsa.hostname=NAME, capsa.term=TERM, capsa.debug=1.\n\
                 For development and tests, `capsa-init --agent-unix PATH` serves the\n\
                 agent protocol on a Unix socket as an ordinary process.\n\
                 Tools: `vsock-serve PORT -- CMD ARGS...` runs CMD per connection on vsock PORT;\n\
                 `vsock-connect CID PORT` bridges stdin/stdout to CID:PORT (the host is CID 2);\n\
                 `net-bench connect|send|recv ADDR:PORT ...` measures TCP from the guest."
            );
            0
        }
        _ => {
            eprintln!("capsa-init {VERSION}: not running as PID 1, nothing to do (try --help)");
            2
        }
    }
}
