//! `capsa boot`: a VM with this terminal on its serial console.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use capsa::{Accel, Capsa, DiskSpec, ExitReason, LinuxDirectBoot};
use capsa_image::{BundleOptions, Progress};

use crate::console_io::{self, Ended};

/// Flags of `capsa boot`.
#[derive(clap::Args, Debug)]
pub struct BootArgs {
    /// Kernel image; default: capsa's guest bundle (see `capsa image build`).
    #[arg(long, env = "CAPSA_KERNEL")]
    kernel: Option<PathBuf>,
    /// Initramfs to boot with --kernel instead of building capsa's.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Attach a disk image (raw or qcow2, detected); append :ro for read-only, :dev to allow a host block device. Repeatable.
    #[arg(long = "disk", value_name = "PATH[:ro][:dev]")]
    disks: Vec<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Guest memory, e.g. 512M or 2G.
    #[arg(long, default_value = "512M", value_parser = crate::parse_mib)]
    memory: u64,
    /// Accelerator: auto (probe), kvm or tcg.
    #[arg(long, default_value = "auto", value_parser = parse_accel)]
    accel: Accel,
    /// Extra kernel arguments (later values of a key win). Repeatable.
    #[arg(long)]
    append: Vec<String>,
    /// A name for the VM (shown in process titles).
    #[arg(long)]
    name: Option<String>,
    /// Also write the console to this file.
    #[arg(long)]
    console_log: Option<PathBuf>,
}

pub(crate) fn parse_accel(s: &str) -> Result<Accel, String> {
    s.parse::<Accel>().map_err(|e| e.to_string())
}

pub async fn run(args: BootArgs) -> anyhow::Result<ExitCode> {
    let boot = match (&args.kernel, &args.initrd) {
        (Some(k), Some(i)) => LinuxDirectBoot::new(k, Some(i)),
        (kernel, _) => {
            let opts = BundleOptions {
                kernel: kernel.clone(),
                ..BundleOptions::default()
            };
            let bundle =
                tokio::task::spawn_blocking(move || capsa_image::build(&opts, &Progress::new()))
                    .await
                    .context("bundle build task")?
                    .map_err(capsa::Error::from)?;
            LinuxDirectBoot::from_bundle(&bundle)
        }
    };
    let mut b = Capsa::vm(boot)
        .cpus(args.cpus)
        .memory_mb(args.memory)
        .accel(args.accel)
        .console();
    for d in &args.disks {
        b = b.disk_spec(DiskSpec::parse_cli(d));
    }
    for a in &args.append {
        b = b.cmdline_arg(a);
    }
    if let Some(n) = &args.name {
        b = b.name(n.clone());
    }
    if let Some(l) = &args.console_log {
        b = b.console_log(l.clone());
    }
    let vm = b.build().await?;
    let console = vm.console()?;
    eprintln!(
        "[capsa] VM {} started (QEMU pid {}). Ctrl-] detaches and stops it.\r",
        vm.name(),
        vm.pid().unwrap_or(0)
    );

    let (reader, writer) = console.split();
    let reason = match console_io::bridge(reader, writer, vm.wait()).await {
        Ended::Finished(r) => r?,
        Ended::Detached | Ended::Interrupted | Ended::Closed => {
            eprint!("\r\n[capsa] detached; stopping VM {}\r\n", vm.name());
            vm.stop_timeout(Duration::from_secs(5)).await?
        }
    };
    Ok(match reason {
        ExitReason::PoweredOff => {
            eprintln!("[capsa] VM {} powered off", vm.name());
            ExitCode::SUCCESS
        }
        ExitReason::Killed { signal } => {
            eprintln!("[capsa] VM {} killed (signal {signal})", vm.name());
            ExitCode::SUCCESS
        }
        ExitReason::Failed { code, message } => {
            eprintln!("[capsa] QEMU failed with exit code {code}: {message}");
            ExitCode::FAILURE
        }
    })
}
