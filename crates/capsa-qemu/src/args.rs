//! Turns a [`VmSpec`] into QEMU's command line. Pure, so it is unit-tested
//! without starting anything.

use std::path::{Path, PathBuf};

use capsa_core::{Accel, BootSource, DiskFormat, KernelCmdline, Result, VmSpec};

/// Machine type used for every VM.
///
/// Measured under TCG on the development host (see BENCHMARKS.md): q35 with PVH
/// boot of an uncompressed vmlinux reaches init in ~1.9 s against ~4.7 s for a
/// bzImage through SeaBIOS; microvm was ~0.1 s faster still but hangs in a share
/// of boots under TCG unless the TSC frequency is passed in, and lacks the PCI
/// transport later devices (vhost-user-vsock-pci) use.
pub const MACHINE: &str = "q35";

/// Kernel arguments every capsa VM gets; the spec's own line is merged over them.
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=-1";

/// Host paths QEMU is given for one run.
#[derive(Debug, Clone)]
pub struct RunPaths {
    /// The QMP control socket.
    pub qmp: PathBuf,
    /// The vhost-user socket of the vsock device, when the spec has one.
    pub vhost_vsock: Option<PathBuf>,
}

/// QEMU id of the vsock device (hot-unplugged around a snapshot).
pub const VSOCK_DEVICE_ID: &str = "capsa-vsock";
/// QEMU id of the vsock device's vhost-user chardev.
pub const VSOCK_CHARDEV_ID: &str = "vsock0";
/// The PCIe root port the vsock device sits on: devices on the q35 root bus
/// cannot be hot-plugged, devices behind a root port can.
pub const VSOCK_BUS: &str = "capsa-rp0";

/// QEMU id of the network backend.
pub const NET_ID: &str = "net0";

/// How a VM is launched, beyond its spec.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// Guest RAM is the memfd inherited as this fd, made by capsa (so that
    /// capsa can save and load it directly); otherwise QEMU makes its own.
    pub ram_fd: Option<i32>,
    /// Start without the vsock device; it is hot-plugged once an incoming
    /// migration has loaded (saved states never contain it, see `snapshot`).
    pub vsock_unplugged: bool,
    /// Wait for an incoming migration (`-incoming defer`).
    pub incoming: bool,
    /// Run QEMU under its own seccomp filter ([`SANDBOX`]).
    pub seccomp: bool,
    /// Bound TCG's translation cache (MiB; QEMU's default is up to 1 GiB),
    /// so that a memory cap on QEMU holds whatever code the guest runs.
    pub tb_size_mib: Option<u32>,
    /// Kernel, initrd and disks as inherited fds instead of paths: a QEMU
    /// running as an unprivileged user cannot open capsa's files by path.
    pub files: Option<FileFds>,
    /// The vhost-user socket of each share of the spec, in order (its
    /// virtiofsd listens there); share `i` is plugged into slot `i`.
    pub share_sockets: Vec<PathBuf>,
    /// QEMU's end of the network socket pair, when the spec has a network.
    pub net_fd: Option<i32>,
}

/// The PCIe root port of share slot `i`. Every VM with shared RAM gets
/// [`capsa_core::MAX_SHARES`] of them, empty or not, so that shares can be
/// hot-plugged at any time and the machine (and so a saved state) looks the
/// same whatever is attached.
pub fn share_bus(i: usize) -> String {
    format!("capsa-fsrp{i}")
}

/// QEMU id of the virtio-fs device in share slot `i`.
pub fn share_device_id(i: usize) -> String {
    format!("capsa-fs{i}")
}

/// QEMU id of the vhost-user chardev of share slot `i`.
pub fn share_chardev_id(i: usize) -> String {
    format!("fs{i}")
}

/// QEMU's seccomp filter, as Firecracker's jailer would want it: no obsolete
/// syscalls, no set*id, no fork/exec, no scheduler or NUMA changes.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The fd numbers a confined QEMU finds its files at.
#[derive(Debug, Clone, Default)]
pub struct FileFds {
    /// The kernel, opened read-only (read through `/proc/self/fd/N`).
    pub kernel: i32,
    /// The initrd, likewise.
    pub initrd: Option<i32>,
    /// One entry per disk of the spec, in order.
    pub disks: Vec<DiskFds>,
}

/// A disk image handed to QEMU as an fd set (`-add-fd`, `/dev/fdset/N`).
#[derive(Debug, Clone)]
pub struct DiskFds {
    /// The fd set id.
    pub set: u32,
    /// The fds in the set (one per access mode QEMU may ask for).
    pub fds: Vec<i32>,
    /// A read-only backing image (an overlay's base), opened by capsa because
    /// QEMU could not follow the overlay's path to it.
    pub backing: Option<(DiskFormat, u32, Vec<i32>)>,
}

/// The full argument vector (without the program) for `spec` on `accel`.
///
/// `accel` must already be resolved (not [`Accel::Auto`]); `spec` must have
/// been validated, so disk formats are known.
pub fn build_args(
    spec: &VmSpec,
    accel: Accel,
    paths: &RunPaths,
    name: &str,
) -> Result<Vec<String>> {
    build_args_with(spec, accel, paths, name, &Launch::default())
}

/// [`build_args`] with launch options. The device order is the same whatever
/// the options, so a saved state loads into a VM built from the same spec.
pub fn build_args_with(
    spec: &VmSpec,
    accel: Accel,
    paths: &RunPaths,
    name: &str,
    launch: &Launch,
) -> Result<Vec<String>> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    let accel_name = match accel {
        Accel::Kvm => "kvm",
        Accel::Tcg | Accel::Auto => "tcg",
    };
    push(&[
        "-name",
        &format!("{},process=capsa-{}", escape(name), escape(name)),
    ]);
    let accel_opt = match (accel, launch.tb_size_mib) {
        (Accel::Tcg | Accel::Auto, Some(mib)) => format!("{accel_name},tb-size={mib}"),
        _ => accel_name.to_string(),
    };
    push(&["-machine", MACHINE, "-accel", &accel_opt]);
    push(&["-cpu", if accel == Accel::Kvm { "host" } else { "max" }]);
    push(&[
        "-smp",
        &spec.cpus.to_string(),
        "-m",
        &format!("{}M", spec.memory_mib),
    ]);
    let vsock = match (&spec.vsock, &paths.vhost_vsock) {
        (Some(_), Some(sock)) => Some(sock),
        _ => None,
    };
    if let Some(fd) = launch.ram_fd {
        // Shared, so the vhost-user device can map it and so that a snapshot
        // can skip it in the migration stream (x-ignore-shared) and copy it
        // straight from the memfd instead.
        push(&[
            "-object",
            &format!(
                "memory-backend-file,id=mem,size={}M,share=on,mem-path=/proc/self/fd/{fd}",
                spec.memory_mib
            ),
            "-machine",
            "memory-backend=mem",
        ]);
    } else if vsock.is_some() || !spec.shares.is_empty() {
        // vhost-user devices read guest RAM directly, so it must be a shareable memfd.
        push(&[
            "-object",
            &format!(
                "memory-backend-memfd,id=mem,size={}M,share=on",
                spec.memory_mib
            ),
            "-machine",
            "memory-backend=mem",
        ]);
    }
    if let Some(sock) = vsock {
        push(&[
            "-device",
            &format!("pcie-root-port,id={VSOCK_BUS},chassis=1"),
        ]);
        if !launch.vsock_unplugged {
            push(&[
                "-chardev",
                &format!("socket,id={VSOCK_CHARDEV_ID},path={}", escape_path(sock)),
            ]);
            // The guest reads its CID from the device's config space, served by
            // capsa's vhost-user device (QEMU 7.2 has no guest-cid property here).
            push(&[
                "-device",
                &format!(
                    "vhost-user-vsock-pci,chardev={VSOCK_CHARDEV_ID},bus={VSOCK_BUS},id={VSOCK_DEVICE_ID}"
                ),
            ]);
        }
    }
    if launch.ram_fd.is_some() || vsock.is_some() || !spec.shares.is_empty() {
        for i in 0..capsa_core::MAX_SHARES {
            // Chassis numbers must differ per port; 1 is the vsock's. No I/O
            // window: virtio-fs is a modern-only device, and 8 I/O windows
            // would eat half of the 64 KiB port space.
            push(&[
                "-device",
                &format!(
                    "pcie-root-port,id={},chassis={},io-reserve=0",
                    share_bus(i),
                    i + 2
                ),
            ]);
        }
        for (i, (share, sock)) in spec.shares.iter().zip(&launch.share_sockets).enumerate() {
            push(&[
                "-chardev",
                &format!(
                    "socket,id={},path={}",
                    share_chardev_id(i),
                    escape_path(sock)
                ),
                "-device",
                &format!(
                    "vhost-user-fs-pci,chardev={},tag={},bus={},id={}",
                    share_chardev_id(i),
                    escape(&share.tag()),
                    share_bus(i),
                    share_device_id(i)
                ),
            ]);
        }
    }
    if launch.seccomp {
        push(&["-sandbox", SANDBOX]);
    }
    if let Some(files) = &launch.files {
        for d in &files.disks {
            let backing = d.backing.iter().map(|(_, set, fds)| (*set, fds));
            for (set, fds) in std::iter::once((d.set, &d.fds)).chain(backing) {
                for fd in fds {
                    push(&["-add-fd", &format!("fd={fd},set={set}")]);
                }
            }
        }
    }
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    if spec.console.enabled {
        push(&[
            "-chardev",
            "stdio,id=con0,signal=off",
            "-serial",
            "chardev:con0",
        ]);
    } else {
        push(&["-serial", "null"]);
    }
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", escape_path(&paths.qmp)),
    ]);

    let BootSource::LinuxDirect {
        kernel,
        initrd,
        cmdline,
    } = &spec.boot;
    let files = launch.files.as_ref();
    match files {
        Some(f) => push(&["-kernel", &format!("/proc/self/fd/{}", f.kernel)]),
        None => push(&["-kernel", &escape_path(kernel)]),
    }
    match (initrd, files) {
        (
            Some(_),
            Some(FileFds {
                initrd: Some(fd), ..
            }),
        ) => push(&["-initrd", &format!("/proc/self/fd/{fd}")]),
        (Some(initrd), _) => push(&["-initrd", &escape_path(initrd)]),
        (None, _) => {}
    }
    let mut line = KernelCmdline::parse(BASE_CMDLINE)?;
    line.extend_from_str(&cmdline.to_string())?;
    push(&["-append", &line.render()?]);

    for (i, disk) in spec.disks.iter().enumerate() {
        let format = disk.format.unwrap_or(DiskFormat::Raw);
        let fds = files.and_then(|f| f.disks.get(i));
        let filename = match fds {
            Some(d) => format!("/dev/fdset/{}", d.set),
            None => disk.path.to_string_lossy().into_owned(),
        };
        // JSON blockdev syntax: no comma escaping, and the format is explicit so
        // QEMU never probes (a guest-written raw image must not turn into qcow2).
        let mut node = serde_json::json!({
            "driver": format.as_str(),
            "node-name": format!("disk{i}"),
            "read-only": disk.read_only,
            "file": {
                "driver": "file",
                "filename": filename,
                "read-only": disk.read_only,
            },
        });
        if let Some((bformat, set, _)) = fds.and_then(|d| d.backing.as_ref()) {
            node["backing"] = serde_json::json!({
                "driver": bformat.as_str(),
                "read-only": true,
                "file": {
                    "driver": "file",
                    "filename": format!("/dev/fdset/{set}"),
                    "read-only": true,
                },
            });
        }
        push(&["-blockdev", &node.to_string()]);
        // Serials are validated ([A-Za-z0-9_-]): nothing to escape.
        let serial = disk
            .serial
            .as_deref()
            .map(|s| format!(",serial={s}"))
            .unwrap_or_default();
        push(&[
            "-device",
            &format!("virtio-blk-pci,drive=disk{i},id=vd{i}{serial}"),
        ]);
    }
    if let (Some(_), Some(fd)) = (&spec.network, launch.net_fd) {
        // Frames as a 4-byte big-endian length plus the Ethernet frame, over
        // the inherited socket; the NIC is QEMU's, so it migrates with snapshots.
        // No option ROM: capsa boots PVH, never through PXE.
        push(&[
            "-netdev",
            &format!("stream,id={NET_ID},server=off,addr.type=fd,addr.str={fd}"),
            "-device",
            &format!(
                "virtio-net-pci,netdev={NET_ID},id=capsa-net,mac={},romfile=",
                capsa_net::GUEST_MAC
            ),
        ]);
    }
    if let Some(d) = &spec.display {
        // bochs-display: a linear framebuffer in a PCI BAR and no VGA legacy;
        // the guest's tiny `bochs` DRM driver sets the size from the EDID
        // (xres/yres) and gives /dev/fb0 through fbdev emulation. QEMU's
        // screendump reads that memory directly (no virtqueue round trip, as
        // virtio-gpu would need). `-vnc none`: a VNC server without any
        // listening socket; viewers are handed in over QMP (`add_client`).
        // virtio input devices are absolute (tablet) and need no USB stack.
        push(&[
            "-device",
            &format!(
                "bochs-display,id={DISPLAY_ID},xres={},yres={},vgamem={}",
                d.width,
                d.height,
                d.vram_bytes()
            ),
            "-vnc",
            "none",
            // A second QMP monitor, for handing viewers' sockets to the VNC
            // server (fd passing, which capsa's QMP client does not do).
            "-chardev",
            &format!(
                "socket,id={},path={},server=on,wait=off",
                crate::vnc::FD_QMP_CHARDEV,
                escape_path(&paths.qmp.with_file_name(crate::vnc::FD_QMP_SOCK))
            ),
            "-mon",
            &format!("chardev={},mode=control", crate::vnc::FD_QMP_CHARDEV),
            "-device",
            &format!("virtio-tablet-pci,id={TABLET_ID}"),
            "-device",
            &format!("virtio-keyboard-pci,id={KEYBOARD_ID}"),
        ]);
    }
    if launch.incoming {
        push(&["-incoming", "defer"]);
    }
    Ok(a)
}

/// QEMU id of the display device.
pub const DISPLAY_ID: &str = "capsa-display";
/// QEMU id of the absolute pointer.
pub const TABLET_ID: &str = "capsa-tablet";
/// QEMU id of the keyboard.
pub const KEYBOARD_ID: &str = "capsa-kbd";

/// QEMU option values escape `,` as `,,`.
fn escape(s: &str) -> String {
    s.replace(',', ",,")
}

fn escape_path(p: &Path) -> String {
    escape(&p.to_string_lossy())
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsa_core::DiskSpec;

    fn spec() -> VmSpec {
        let mut s = VmSpec::linux("/k/vm,linux", Some("/k/initrd".into()));
        s.cpus = 2;
        s.memory_mib = 256;
        let BootSource::LinuxDirect { cmdline, .. } = &mut s.boot;
        *cmdline = KernelCmdline::parse("quiet panic=5").unwrap();
        let mut d = DiskSpec::new("/d/a.qcow2");
        d.read_only = true;
        d.format = Some(DiskFormat::Qcow2);
        s.disks.push(d);
        s
    }

    #[test]
    fn renders_expected_flags() {
        let paths = RunPaths {
            qmp: "/run/x/qmp.sock".into(),
            vhost_vsock: None,
        };
        let a = build_args(&spec(), Accel::Tcg, &paths, "t1").unwrap();
        let joined = a.join(" ");
        assert!(
            joined.contains("-machine q35 -accel tcg -cpu max"),
            "{joined}"
        );
        assert!(joined.contains("-smp 2 -m 256M"));
        assert!(
            joined.contains("-kernel /k/vm,,linux"),
            "commas escaped: {joined}"
        );
        let append = &a[a.iter().position(|x| x == "-append").unwrap() + 1];
        assert_eq!(append, "console=ttyS0 quiet panic=5");
        let bd = &a[a.iter().position(|x| x == "-blockdev").unwrap() + 1];
        let v: serde_json::Value = serde_json::from_str(bd).unwrap();
        assert_eq!(v["driver"], "qcow2");
        assert_eq!(v["read-only"], true);
        assert_eq!(v["file"]["filename"], "/d/a.qcow2");
        assert!(joined.contains("virtio-blk-pci,drive=disk0"));
        assert!(!joined.contains("serial="));
    }

    #[test]
    fn display_adds_framebuffer_and_input_only_when_asked() {
        let paths = RunPaths {
            qmp: "/q".into(),
            vhost_vsock: None,
        };
        let headless = build_args(&spec(), Accel::Tcg, &paths, "t")
            .unwrap()
            .join(" ");
        for absent in ["bochs", "-vnc", "virtio-tablet", "virtio-keyboard", "-vga"] {
            assert!(!headless.contains(absent), "{absent}: {headless}");
        }
        let mut s = spec();
        s.display = Some(capsa_core::DisplaySpec::new(1280, 800));
        let a = build_args(&s, Accel::Tcg, &paths, "t").unwrap();
        let joined = a.join(" ");
        assert!(
            joined.contains(
                "-device bochs-display,id=capsa-display,xres=1280,yres=800,vgamem=16777216"
            ),
            "{joined}"
        );
        assert!(joined.contains("-device virtio-tablet-pci,id=capsa-tablet"));
        assert!(joined.contains("-device virtio-keyboard-pci,id=capsa-kbd"));
        // Never a listening VNC socket (unix:...,websocket=on also opens TCP).
        let vnc = &a[a.iter().position(|x| x == "-vnc").unwrap() + 1];
        assert_eq!(vnc, "none");
        assert_eq!(a.iter().filter(|x| *x == "-vnc").count(), 1);
        assert!(!joined.contains("websocket"));
    }

    #[test]
    fn vsock_needs_shared_memfd() {
        let mut s = spec();
        s.vsock = Some(capsa_core::VsockSpec { guest_cid: 7 });
        let paths = RunPaths {
            qmp: "/q".into(),
            vhost_vsock: Some("/r/vhost.sock".into()),
        };
        let a = build_args(&s, Accel::Tcg, &paths, "t").unwrap().join(" ");
        assert!(
            a.contains("memory-backend-memfd,id=mem,size=256M,share=on"),
            "{a}"
        );
        assert!(a.contains("-machine memory-backend=mem"));
        assert!(a.contains("-device vhost-user-vsock-pci,chardev=vsock0,bus=capsa-rp0"));
        assert!(a.contains("-chardev socket,id=vsock0,path=/r/vhost.sock"));
    }

    #[test]
    fn restore_launch_keeps_the_port_and_drops_the_device() {
        let mut s = spec();
        s.vsock = Some(capsa_core::VsockSpec { guest_cid: 7 });
        let paths = RunPaths {
            qmp: "/q".into(),
            vhost_vsock: Some("/r/vhost.sock".into()),
        };
        let launch = Launch {
            ram_fd: Some(3),
            vsock_unplugged: true,
            incoming: true,
            ..Default::default()
        };
        let a = build_args_with(&s, Accel::Tcg, &paths, "t", &launch)
            .unwrap()
            .join(" ");
        assert!(a.contains("mem-path=/proc/self/fd/3"), "{a}");
        assert!(a.contains("pcie-root-port,id=capsa-rp0"));
        assert!(!a.contains("vhost-user-vsock-pci"));
        assert!(a.ends_with("-incoming defer"));
    }

    #[test]
    fn share_slots_are_always_there_and_boot_shares_are_plugged_in() {
        let paths = RunPaths {
            qmp: "/q".into(),
            vhost_vsock: None,
        };
        let mut s = spec();
        let plain = build_args_with(
            &s,
            Accel::Tcg,
            &paths,
            "t",
            &Launch {
                ram_fd: Some(3),
                ..Default::default()
            },
        )
        .unwrap()
        .join(" ");
        for i in 0..capsa_core::MAX_SHARES {
            assert!(
                plain.contains(&format!(
                    "pcie-root-port,id=capsa-fsrp{i},chassis={}",
                    i + 2
                )),
                "{plain}"
            );
        }
        assert!(!plain.contains("vhost-user-fs-pci"));
        s.shares = vec![capsa_core::ShareSpec::new(
            "/h",
            "/work",
            capsa_core::ShareMode::ReadOnly,
        )];
        let launch = Launch {
            share_sockets: vec!["/j/virtiofs0.sock".into()],
            ..Default::default()
        };
        let a = build_args_with(&s, Accel::Tcg, &paths, "t", &launch)
            .unwrap()
            .join(" ");
        // Shared RAM even without vsock: virtiofsd maps it.
        assert!(
            a.contains("memory-backend-memfd,id=mem,size=256M,share=on"),
            "{a}"
        );
        assert!(a.contains("-chardev socket,id=fs0,path=/j/virtiofs0.sock"));
        let tag = s.shares[0].tag();
        assert!(
            a.contains(&format!(
                "-device vhost-user-fs-pci,chardev=fs0,tag={tag},bus=capsa-fsrp0,id=capsa-fs0"
            )),
            "{a}"
        );
        // The host path never reaches QEMU: virtiofsd has it.
        assert!(!a.contains("/h,") && !a.contains(" /h "));
    }

    #[test]
    fn network_is_a_stream_netdev_on_an_fd() {
        let mut s = spec();
        let paths = RunPaths {
            qmp: "/q".into(),
            vhost_vsock: None,
        };
        let launch = Launch {
            net_fd: Some(9),
            ..Default::default()
        };
        let a = build_args_with(&s, Accel::Tcg, &paths, "t", &launch)
            .unwrap()
            .join(" ");
        assert!(!a.contains("netdev"), "no network in the spec, no NIC: {a}");
        s.network = Some(capsa_core::NetworkSpec::default());
        let a = build_args_with(&s, Accel::Tcg, &paths, "t", &launch)
            .unwrap()
            .join(" ");
        assert!(
            a.contains("-netdev stream,id=net0,server=off,addr.type=fd,addr.str=9"),
            "{a}"
        );
        assert!(a.contains("virtio-net-pci,netdev=net0"), "{a}");
    }

    #[test]
    fn confined_launch_sandboxes_and_passes_fds() {
        let paths = RunPaths {
            qmp: "/q".into(),
            vhost_vsock: None,
        };
        let launch = Launch {
            seccomp: true,
            tb_size_mib: Some(256),
            files: Some(FileFds {
                kernel: 4,
                initrd: Some(5),
                disks: vec![DiskFds {
                    set: 10,
                    fds: vec![6, 7],
                    backing: Some((DiskFormat::Raw, 11, vec![8])),
                }],
            }),
            ..Default::default()
        };
        let a = build_args_with(&spec(), Accel::Tcg, &paths, "t", &launch).unwrap();
        let joined = a.join(" ");
        assert!(
            joined.contains(
                "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ),
            "{joined}"
        );
        assert!(joined.contains("-kernel /proc/self/fd/4 -initrd /proc/self/fd/5"));
        assert!(joined.contains("-accel tcg,tb-size=256"), "{joined}");
        assert!(joined.contains("-add-fd fd=6,set=10 -add-fd fd=7,set=10 -add-fd fd=8,set=11"));
        assert!(
            !joined.contains("/d/a.qcow2"),
            "no host path reaches QEMU: {joined}"
        );
        let bd = &a[a.iter().position(|x| x == "-blockdev").unwrap() + 1];
        let v: serde_json::Value = serde_json::from_str(bd).unwrap();
        assert_eq!(v["file"]["filename"], "/dev/fdset/10");
        assert_eq!(v["backing"]["driver"], "raw");
        assert_eq!(v["backing"]["file"]["filename"], "/dev/fdset/11");
        // Unconfined launches have neither.
        let plain = build_args(&spec(), Accel::Tcg, &paths, "t")
            .unwrap()
            .join(" ");
        assert!(!plain.contains("-sandbox") && !plain.contains("-add-fd"));
    }

    #[test]
    fn kvm_uses_host_cpu() {
        let paths = RunPaths {
            qmp: "/q".into(),
            vhost_vsock: None,
        };
        let a = build_args(&spec(), Accel::Kvm, &paths, "t")
            .unwrap()
            .join(" ");
        assert!(a.contains("-accel kvm -cpu host"));
    }
}
