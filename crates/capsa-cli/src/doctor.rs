//! `capsa doctor` and `capsa backends`: what works on this host, and the fix for what does not.

use std::process::ExitCode;

use capsa_core::Hypervisor;
use capsa_image::Progress;
use capsa_qemu::QemuBackend;

struct Check {
    ok: bool,
    what: String,
    fix: Option<String>,
}

fn print(c: &Check) {
    let mark = if c.ok { "ok  " } else { "MISS" };
    println!("[{mark}] {}", c.what);
    if let Some(f) = &c.fix {
        println!("       fix: {f}");
    }
}

pub async fn run() -> anyhow::Result<ExitCode> {
    let mut checks = Vec::new();
    let qemu = QemuBackend::new();
    match &qemu {
        Ok(q) => {
            let v = q
                .version()
                .await
                .unwrap_or_else(|e| format!("(version unknown: {e})"));
            checks.push(Check {
                ok: true,
                what: format!("QEMU: {} ({v})", q.binary().display()),
                fix: None,
            });
        }
        Err(e) => checks.push(Check {
            ok: false,
            what: format!("QEMU: {e}"),
            fix: e.fix(),
        }),
    }
    match std::fs::metadata("/bin/busybox").or_else(|_| std::fs::metadata("/usr/bin/busybox")) {
        Ok(_) => checks.push(Check {
            ok: true,
            what: "busybox found".into(),
            fix: None,
        }),
        Err(_) => checks.push(Check {
            ok: false,
            what: "busybox (static) not found".into(),
            fix: Some("apt-get install busybox-static".into()),
        }),
    }
    let kernel =
        tokio::task::spawn_blocking(|| capsa_image::resolve_kernel(None, &Progress::new())).await?;
    let mut probe_kernel = None;
    match kernel {
        Ok(k) => {
            checks.push(Check {
                ok: true,
                what: format!(
                    "guest kernel: {} {} ({:?})",
                    k.version,
                    k.image.display(),
                    k.source
                ),
                fix: None,
            });
            probe_kernel = Some(k);
        }
        Err(e) => checks.push(Check {
            ok: false,
            what: format!("guest kernel: {e}"),
            fix: None,
        }),
    }
    match capsa_qemu::accel::kvm_device_usable() {
        Ok(()) => checks.push(Check { ok: true, what: "/dev/kvm opens and answers".into(), fix: None }),
        Err(why) => checks.push(Check {
            ok: true,
            what: format!("KVM unavailable ({why}); VMs run under TCG (slower)"),
            fix: Some("for speed, give this user read-write access to /dev/kvm on a host with virtualisation".into()),
        }),
    }
    if let (Ok(q), Some(k)) = (&qemu, &probe_kernel) {
        match q.resolve_accel(capsa::Accel::Auto, &k.image, None).await {
            Ok((accel, why)) => checks.push(Check {
                ok: true,
                what: format!("accelerator for --accel auto: {accel} ({why})"),
                fix: None,
            }),
            Err(e) => checks.push(Check {
                ok: false,
                what: format!("accelerator probe: {e}"),
                fix: e.fix().map(str::to_string),
            }),
        }
    }
    if let Ok(q) = &qemu {
        for f in q.confinement_report().await {
            checks.push(Check {
                ok: f.ok,
                what: f.what,
                fix: f.fix,
            });
        }
    }
    let cache = capsa_image::default_cache_dir()
        .unwrap_or_else(|_| "(none: set HOME or XDG_CACHE_HOME)".into());
    let writable = std::fs::create_dir_all(&cache).is_ok() && tempfile::tempfile_in(&cache).is_ok();
    checks.push(Check {
        ok: writable,
        what: format!("cache directory {}", cache.display()),
        fix: (!writable)
            .then(|| "make it writable, or set XDG_CACHE_HOME to a writable directory".into()),
    });
    for c in &checks {
        print(c);
    }
    Ok(if checks.iter().all(|c| c.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub async fn backends(json: bool) -> anyhow::Result<ExitCode> {
    let qemu = QemuBackend::new();
    let entry = match &qemu {
        Ok(q) => serde_json::json!({
            "name": "qemu",
            "strategy": "external VMM process",
            "available": true,
            "binary": q.binary(),
            "capabilities": q.capabilities(),
        }),
        Err(e) => serde_json::json!({
            "name": "qemu",
            "strategy": "external VMM process",
            "available": false,
            "reason": e.to_string(),
            "fix": e.fix(),
        }),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!([entry]))?
        );
    } else {
        println!(
            "{:<8} {:<22} {:<10} DETAILS",
            "BACKEND", "STRATEGY", "AVAILABLE"
        );
        match &qemu {
            Ok(q) => {
                let c = q.capabilities();
                let accels: Vec<_> = c.accels.iter().map(|a| a.as_str()).collect();
                let formats: Vec<_> = c.disk_formats.iter().map(|f| f.as_str()).collect();
                println!(
                    "{:<8} {:<22} {:<10} accels={} disks={} max_cpus={}",
                    "qemu",
                    "external VMM process",
                    "yes",
                    accels.join(","),
                    formats.join(","),
                    c.max_cpus
                );
            }
            Err(e) => println!(
                "{:<8} {:<22} {:<10} {e}",
                "qemu", "external VMM process", "no"
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}
