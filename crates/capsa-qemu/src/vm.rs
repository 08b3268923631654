//! [`VmInstance`] for a running QEMU: the backend-neutral face of
//! [`QemuInstance`]. It lives apart from `instance` so that `instance` (the
//! process and its QMP) and `snapshot` (which drives an instance) do not
//! import each other: both are used from here.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use capsa_core::{ConsoleStreams, ExitReason, Result, SnapshotMeta, VmInstance, VmStatus};
use qapi::qmp;

use crate::instance::QemuInstance;
use crate::QemuError;

#[async_trait::async_trait]
impl VmInstance for QemuInstance {
    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    fn take_console(&mut self) -> Option<ConsoleStreams> {
        self.console.take()
    }

    fn vsock_socket(&self) -> Option<PathBuf> {
        self.vsock.as_ref().map(|d| d.config().uds_path.clone())
    }

    async fn status(&self) -> Result<VmStatus> {
        if let Some(reason) = self.exit.borrow().clone() {
            return Ok(VmStatus::Stopped { reason });
        }
        let info = match self.exec("query-status", qmp::query_status {}).await {
            Ok(i) => i,
            Err(_) if self.exit.borrow().is_some() => {
                let reason = self.exit.borrow().clone().unwrap_or(ExitReason::PoweredOff);
                return Ok(VmStatus::Stopped { reason });
            }
            Err(e) => return Err(e),
        };
        use qmp::RunState as R;
        Ok(match info.status {
            R::running if self.shutting_down.load(Ordering::Relaxed) => VmStatus::ShuttingDown,
            R::running => VmStatus::Running,
            R::paused | R::suspended => VmStatus::Paused,
            R::prelaunch | R::inmigrate | R::restore_vm => VmStatus::Starting,
            R::shutdown => VmStatus::ShuttingDown,
            _ => VmStatus::Running,
        })
    }

    async fn pause(&self) -> Result<()> {
        self.exec("stop", qmp::stop {}).await.map(|_| ())
    }

    async fn resume(&self) -> Result<()> {
        self.exec("cont", qmp::cont {}).await.map(|_| ())
    }

    async fn request_shutdown(&self) -> Result<()> {
        self.shutting_down.store(true, Ordering::Relaxed);
        // capsa's init disables the kernel's Ctrl-Alt-Del reboot, so the kernel
        // turns this key chord into SIGINT for PID 1: a clean, guest-side shutdown
        // that needs no ACPI daemon in the guest.
        let key = |code: qmp::QKeyCode| qmp::KeyValue::qcode(qmp::QKeyCodeWrapper { data: code });
        let keys = vec![
            key(qmp::QKeyCode::ctrl),
            key(qmp::QKeyCode::alt),
            key(qmp::QKeyCode::delete),
        ];
        self.exec(
            "send-key",
            qmp::send_key {
                keys,
                hold_time: None,
            },
        )
        .await
        .map(|_| ())?;
        // Also press the ACPI power button, for guests whose init listens for it.
        let _ = self
            .exec("system_powerdown", qmp::system_powerdown {})
            .await;
        Ok(())
    }

    async fn kill(&self) -> Result<()> {
        let _ = self.kill_tx.send(()).await;
        self.wait().await.map(|_| ())
    }

    async fn snapshot(&self, dir: &Path) -> Result<SnapshotMeta> {
        crate::snapshot::take(self, dir).await
    }

    async fn attach_share(&self, share: &capsa_core::ShareSpec) -> Result<()> {
        use crate::args::{share_bus, share_chardev_id, share_device_id};
        let mut share = share.clone();
        share.validate()?;
        // Not during a snapshot (it would refuse anyway, but not half-way).
        let _no_snapshot = self.snapshot_lock.lock().await;
        let mut slots = self.shares.lock().await;
        let attached: Vec<capsa_core::ShareSpec> =
            slots.iter().flatten().map(|s| s.spec.clone()).collect();
        capsa_core::check_distinct_shares(&attached, Some(&share))?;
        let Some(i) = slots.iter().position(Option::is_none) else {
            return Err(capsa_core::Error::invalid(
                "share",
                format!(
                    "the sandbox already has {} shares attached",
                    capsa_core::MAX_SHARES
                ),
                "remove one first (`capsa share rm`), or share a common parent directory",
            ));
        };
        if self.info.ram.is_none() {
            return Err(capsa_core::Error::Unsupported {
                backend: "qemu".into(),
                what: "shares on a VM whose RAM capsa does not own".into(),
                fix: "start the VM with capsa's QEMU backend".into(),
            });
        }
        let socket = self.qemu_dir.join(format!("virtiofs{i}.sock"));
        let daemon = crate::share::spawn(&share, &socket, self.creds, &self.cgroup_procs)?;
        let t = std::time::Instant::now();
        let plugged = async {
            crate::share::add_chardev(self, &share_chardev_id(i), &socket).await?;
            let mut arguments = qapi::Dictionary::new();
            arguments.insert("chardev".into(), share_chardev_id(i).into());
            arguments.insert("tag".into(), share.tag().into());
            let added = self
                .exec(
                    "device_add",
                    qmp::device_add {
                        driver: "vhost-user-fs-pci".into(),
                        bus: Some(share_bus(i)),
                        id: Some(share_device_id(i)),
                        arguments,
                    },
                )
                .await;
            if let Err(e) = added {
                let _ = crate::share::remove_chardev(self, &share_chardev_id(i)).await;
                return Err(e);
            }
            Ok(())
        }
        .await;
        if let Err(e) = plugged {
            daemon.stop().await;
            return Err(e);
        }
        tracing::debug!(slot = i, guest = %share.guest, took = ?t.elapsed(), "share plugged");
        slots[i] = Some(crate::share::ActiveShare {
            spec: share,
            daemon,
        });
        Ok(())
    }

    async fn detach_share(&self, guest: &str) -> Result<capsa_core::ShareSpec> {
        use crate::args::{share_chardev_id, share_device_id};
        let _no_snapshot = self.snapshot_lock.lock().await;
        let mut slots = self.shares.lock().await;
        let Some(i) = slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.spec.guest == guest))
        else {
            let attached: Vec<String> = slots
                .iter()
                .flatten()
                .map(|s| s.spec.guest.clone())
                .collect();
            return Err(capsa_core::Error::invalid(
                "share",
                format!("no share is attached at {guest}"),
                if attached.is_empty() {
                    "the sandbox has no shares attached".to_string()
                } else {
                    format!(
                        "name one of the attached guest paths: {}",
                        attached.join(", ")
                    )
                },
            ));
        };
        self.exec(
            "device_del",
            qmp::device_del {
                id: share_device_id(i),
            },
        )
        .await?;
        crate::share::wait_unplugged(self, &share_device_id(i)).await?;
        crate::share::remove_chardev(self, &share_chardev_id(i)).await?;
        let Some(active) = slots[i].take() else {
            unreachable!("slot {i} was just found occupied");
        };
        active.daemon.stop().await;
        Ok(active.spec)
    }

    async fn shares(&self) -> Result<Vec<capsa_core::ShareSpec>> {
        Ok(self.share_specs().await)
    }

    async fn set_network_policy(&self, policy: capsa_core::NetworkPolicy) -> Result<()> {
        self.net
            .as_ref()
            .ok_or_else(capsa_core::no_network)?
            .set_policy(policy)
    }

    async fn network_policy(&self) -> Result<capsa_core::NetworkPolicy> {
        Ok(self
            .net
            .as_ref()
            .ok_or_else(capsa_core::no_network)?
            .policy())
    }

    async fn network_log(&self) -> Result<Vec<capsa_core::NetDecision>> {
        Ok(self.net.as_ref().ok_or_else(capsa_core::no_network)?.log())
    }

    async fn add_port_forward(&self, forward: capsa_core::PortForward) -> Result<()> {
        self.net
            .as_ref()
            .ok_or_else(capsa_core::no_network)?
            .add_forward(forward)
    }

    async fn remove_port_forward(
        &self,
        host_ip: std::net::Ipv4Addr,
        host_port: u16,
    ) -> Result<capsa_core::PortForward> {
        self.net
            .as_ref()
            .ok_or_else(capsa_core::no_network)?
            .remove_forward(host_ip, host_port)
            .await
    }

    async fn port_forwards(&self) -> Result<Vec<capsa_core::PortForward>> {
        Ok(self
            .net
            .as_ref()
            .ok_or_else(capsa_core::no_network)?
            .forwards())
    }

    async fn screendump(&self, out: &Path) -> Result<()> {
        if self.info.spec.display.is_none() {
            return Err(capsa_core::no_display());
        }
        // QEMU writes where it can (its jail directory when confined); the
        // file then moves to the caller's private path. A unique name per
        // call, so concurrent screenshots do not share a file.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = self.qemu_dir.join(format!("screendump-{n}.ppm"));
        let dumped = self
            .exec(
                "screendump",
                qmp::screendump {
                    device: Some(crate::args::DISPLAY_ID.into()),
                    head: None,
                    // PNG encoding inside QEMU stalls its main loop (~200 ms at
                    // 1280x800); PPM is a plain copy and capsa encodes.
                    format: Some(qmp::ImageFormat::ppm),
                    filename: tmp.to_string_lossy().into_owned(),
                },
            )
            .await;
        let moved = match dumped {
            Ok(_) => match std::fs::rename(&tmp, out) {
                Ok(()) => Ok(()),
                Err(_) => std::fs::copy(&tmp, out).map(|_| ()),
            },
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let _ = std::fs::remove_file(&tmp);
        moved.map_err(|e| {
            QemuError::Command {
                command: "screendump",
                reason: format!("cannot move the dump to {}: {e}", out.display()),
            }
            .into()
        })
    }

    async fn vnc_add_client(&self, client: std::os::fd::OwnedFd, view_only: bool) -> Result<()> {
        if self.info.spec.display.is_none() {
            return Err(capsa_core::no_display());
        }
        let sock = self.qemu_dir.join(crate::vnc::FD_QMP_SOCK);
        tokio::task::spawn_blocking(move || crate::vnc::add_client(&sock, client, view_only))
            .await
            .map_err(|e| QemuError::Command {
                command: "add_client",
                reason: e.to_string(),
            })?
            .map_err(|reason| {
                QemuError::Command {
                    command: "add_client",
                    reason,
                }
                .into()
            })
    }

    async fn send_input(&self, events: Vec<capsa_core::InputEvent>) -> Result<()> {
        if self.info.spec.display.is_none() {
            return Err(capsa_core::no_display());
        }
        capsa_core::check_input(&events)?;
        // One input-send-event per frame: QEMU syncs after each command.
        let mut frame = Vec::new();
        for e in events
            .iter()
            .chain(std::iter::once(&capsa_core::InputEvent::Sync))
        {
            if *e != capsa_core::InputEvent::Sync {
                qmp_events(e, &mut frame)?;
                continue;
            }
            if frame.is_empty() {
                continue;
            }
            self.exec(
                "input-send-event",
                qmp::input_send_event {
                    device: None,
                    head: None,
                    events: std::mem::take(&mut frame),
                },
            )
            .await?;
        }
        Ok(())
    }

    async fn wait(&self) -> Result<ExitReason> {
        let mut exit = self.exit.clone();
        let r = exit
            .wait_for(|r| r.is_some())
            .await
            .map_err(|_| QemuError::Exited)?
            .clone();
        Ok(r.unwrap_or(ExitReason::PoweredOff))
    }
}

/// One capsa input event as QMP's (a move is one event per axis).
fn qmp_events(e: &capsa_core::InputEvent, out: &mut Vec<qmp::InputEvent>) -> Result<()> {
    use capsa_core::{InputEvent as E, MouseButton as B};
    let abs = |axis, value: u32| {
        qmp::InputEvent::abs(qmp::InputMoveEventWrapper {
            data: qmp::InputMoveEvent {
                axis,
                value: i64::from(value),
            },
        })
    };
    let last = match e {
        E::Key { qcode, down } => {
            let code: qmp::QKeyCode = qcode.parse().map_err(|()| {
                capsa_core::Error::invalid(
                    "input",
                    format!("{qcode:?} is not a QEMU key code"),
                    "use a QKeyCode name such as a, shift, ret, ctrl",
                )
            })?;
            qmp::InputEvent::key(qmp::InputKeyEventWrapper {
                data: qmp::InputKeyEvent {
                    down: *down,
                    key: qmp::KeyValue::qcode(qmp::QKeyCodeWrapper { data: code }),
                },
            })
        }
        E::Button { button, down } => {
            let button = match button {
                B::Left => qmp::InputButton::left,
                B::Middle => qmp::InputButton::middle,
                B::Right => qmp::InputButton::right,
                B::WheelUp => qmp::InputButton::wheel_up,
                B::WheelDown => qmp::InputButton::wheel_down,
                B::WheelLeft => qmp::InputButton::wheel_left,
                B::WheelRight => qmp::InputButton::wheel_right,
            };
            qmp::InputEvent::btn(qmp::InputBtnEventWrapper {
                data: qmp::InputBtnEvent {
                    button,
                    down: *down,
                },
            })
        }
        E::Move { x, y } => {
            out.push(abs(qmp::InputAxis::x, *x));
            abs(qmp::InputAxis::y, *y)
        }
        E::Sync => return Ok(()),
    };
    out.push(last);
    Ok(())
}
