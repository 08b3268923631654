//! `capsa boot`: a VM with this terminal on its serial console.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use capsa::{Accel, Capsa, DiskSpec, ExitReason, LinuxDirectBoot};
use capsa_image::{BundleOptions, Progress};
use tokio::io::AsyncReadExt;

use crate::term::RawMode;

/// The detach key: Ctrl-] (as telnet and virsh use).
const DETACH: u8 = 0x1d;

/// Flags of `capsa boot`.
#[derive(clap::Args, Debug)]
pub struct BootArgs {
    /// Kernel image; default: capsa's guest bundle (see `capsa image build`).
    #[arg(long, env = "CAPSA_KERNEL")]
    kernel: Option<PathBuf>,
    /// Initramfs to boot with --kernel instead of building capsa's.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Attach a disk image (raw or qcow2, detected); append :ro for read-only. Repeatable.
    #[arg(long = "disk", value_name = "PATH[:ro]")]
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

    let raw = RawMode::enter(0);
    let (mut reader, mut writer) = console.split();
    let out_task = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        let mut stdout = std::io::stdout();
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stdout
                        .write_all(&buf[..n])
                        .and_then(|_| stdout.flush())
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });

    // stdin is read on a plain thread: a blocking read cannot be cancelled, and
    // must not hold up the runtime when the VM ends first.
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if in_tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });

    let interactive = raw.is_some();
    let mut stdin_open = true;
    let outcome = loop {
        tokio::select! {
            r = vm.wait() => break Outcome::Exited(r?),
            chunk = in_rx.recv(), if stdin_open => match chunk {
                Some(bytes) => {
                    if let Some(pos) = bytes.iter().position(|&c| c == DETACH) {
                        use tokio::io::AsyncWriteExt;
                        let _ = writer.write_all(&bytes[..pos]).await;
                        break Outcome::Detached;
                    }
                    use tokio::io::AsyncWriteExt;
                    if writer.write_all(&bytes).await.is_err() {
                        stdin_open = false;
                    }
                }
                None => stdin_open = false,
            },
            _ = tokio::signal::ctrl_c(), if !interactive => break Outcome::Interrupted,
        }
    };
    let reason = match outcome {
        Outcome::Exited(r) => r,
        Outcome::Detached | Outcome::Interrupted => {
            eprint!("\r\n[capsa] detached; stopping VM {}\r\n", vm.name());
            vm.stop_timeout(Duration::from_secs(5)).await?
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), out_task).await;
    drop(raw);
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

enum Outcome {
    Exited(ExitReason),
    Detached,
    Interrupted,
}
