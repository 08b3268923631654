//! Shared directories on sandboxes: attach (virtio-fs hot-plug by whoever owns
//! the VM: this process or the monitor) and mount (by the guest agent).
//!
//! Shares given to [`SandboxBuilder::share`] are plugged in on QEMU's command
//! line when the sandbox boots cold, and hot-plugged after a restore (base
//! snapshots, pools), since a snapshot cannot hold a share.

use std::path::PathBuf;

use capsa_core::{ShareMode, ShareSpec};

use crate::{Error, Result, Sandbox, SandboxBuilder, VmHandle};

impl SandboxBuilder {
    /// Mounts host directory `host` at guest path `guest`. Read-only is
    /// enforced on the host; files the guest creates in a read-write share
    /// belong to the host directory's owner.
    pub fn share(
        self,
        host: impl Into<PathBuf>,
        guest: impl Into<String>,
        mode: ShareMode,
    ) -> Self {
        self.share_spec(ShareSpec::new(host, guest, mode))
    }

    /// Adds a share described in full.
    pub fn share_spec(mut self, share: ShareSpec) -> Self {
        self.shares.push(share);
        self
    }
}

impl VmHandle {
    /// Attaches a host directory to the running VM (the guest still has to
    /// mount it; [`Sandbox::share_add`] does both).
    pub async fn attach_share(&self, share: &ShareSpec) -> Result<()> {
        Ok(self.instance().attach_share(share).await?)
    }

    /// Detaches the share at guest path `guest` (unmount it in the guest first).
    pub async fn detach_share(&self, guest: &str) -> Result<ShareSpec> {
        Ok(self.instance().detach_share(guest).await?)
    }

    /// The shares attached now.
    pub async fn shares(&self) -> Result<Vec<ShareSpec>> {
        Ok(self.instance().shares().await?)
    }

    /// Refuses a snapshot while shares are attached, naming them and the fix.
    pub(crate) async fn check_no_shares(&self) -> Result<()> {
        let shares = self.shares().await?;
        if shares.is_empty() {
            return Ok(());
        }
        let name = self.name();
        let list = shares
            .iter()
            .map(|s| format!("{} (host {})", s.guest, s.host.display()))
            .collect::<Vec<_>>()
            .join(", ");
        let rm = shares
            .iter()
            .map(|s| format!("`capsa share rm {name} {}`", s.guest))
            .collect::<Vec<_>>()
            .join(", ");
        Err(capsa_core::Error::invalid(
            "snapshot",
            format!(
                "sandbox {name} has a shared directory attached at {list}; a snapshot cannot hold \
                 a shared directory (QEMU cannot save virtio-fs devices)"
            ),
            format!(
                "detach it first ({rm}), take the snapshot, then attach it again (`capsa share add`)"
            ),
        )
        .into())
    }
}

impl Sandbox {
    /// Attaches `share` to the running sandbox and mounts it in the guest.
    /// Works on any sandbox, including restored and pooled ones.
    pub async fn share_add(&self, share: ShareSpec) -> Result<()> {
        let mut share = share;
        share.validate()?;
        self.vm.attach_share(&share).await?;
        self.mount(&share).await
    }

    /// Unmounts the share at guest path `guest` and detaches it; returns it.
    pub async fn share_remove(&self, guest: &str) -> Result<ShareSpec> {
        let shares = self.vm.shares().await?;
        if shares.iter().any(|s| s.guest == guest) {
            // Lazy: a busy file in the guest does not hold the host's detach up.
            if let Err(e) = self.client.unmount(guest, self.op_timeout).await {
                tracing::warn!(
                    guest,
                    "unmounting the share failed ({e}); detaching it anyway"
                );
            }
        }
        self.vm.detach_share(guest).await
    }

    /// The shares attached to the sandbox now.
    pub async fn shares(&self) -> Result<Vec<ShareSpec>> {
        self.vm.shares().await
    }

    /// Mounts an attached share in the guest; on failure it is detached again.
    async fn mount(&self, share: &ShareSpec) -> Result<()> {
        let mounted = self
            .client
            .mount(
                &share.tag(),
                &share.guest,
                share.read_only(),
                self.op_timeout,
            )
            .await;
        if let Err(e) = mounted {
            let _ = self.vm.detach_share(&share.guest).await;
            return Err(Error::from(e));
        }
        Ok(())
    }

    /// Mounts the shares the VM booted with (plugged in on QEMU's command line).
    /// A sandbox whose shares cannot be mounted is killed (and a kept one removed).
    pub(crate) async fn mount_boot_shares(self) -> Result<Sandbox> {
        let shares = self.vm.spec().shares.clone();
        for s in &shares {
            let r = self
                .client
                .mount(&s.tag(), &s.guest, s.read_only(), self.op_timeout)
                .await;
            if let Err(e) = r {
                let _ = self.vm.kill().await;
                if let Some(dir) = self.vm.state_dir() {
                    let _ = std::fs::remove_dir_all(dir);
                }
                return Err(Error::from(e));
            }
        }
        Ok(self)
    }

    /// Attaches and mounts `shares` on a sandbox that has just been restored;
    /// on failure the sandbox is killed (and a kept one removed).
    pub(crate) async fn add_shares_or_kill(self, shares: Vec<ShareSpec>) -> Result<Sandbox> {
        for s in shares {
            if let Err(e) = self.share_add(s).await {
                let _ = self.vm.kill().await;
                if let Some(dir) = self.vm.state_dir() {
                    let _ = std::fs::remove_dir_all(dir);
                }
                return Err(e);
            }
        }
        Ok(self)
    }
}

/// Validates shares that will be hot-plugged after a restore, before the
/// restore starts anything.
pub(crate) fn validate_shares(shares: &mut [ShareSpec]) -> Result<()> {
    if !shares.is_empty() && !capsa_qemu::share::running_as_root() {
        return Err(capsa_core::Error::Unsupported {
            backend: "qemu".into(),
            what: "shared directories when capsa does not run as root".into(),
            fix: "run capsa or capsad as root, or copy files with `capsa cp` / --copy-in and \
                  --copy-out"
                .into(),
        }
        .into());
    }
    if shares.len() > capsa_core::MAX_SHARES {
        return Err(capsa_core::Error::invalid(
            "share",
            format!("{} shares asked for", shares.len()),
            format!(
                "share at most {} directories (share a common parent instead)",
                capsa_core::MAX_SHARES
            ),
        )
        .into());
    }
    for s in shares.iter_mut() {
        s.validate()?;
    }
    capsa_core::check_distinct_shares(shares, None)?;
    Ok(())
}
