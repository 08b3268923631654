//! The sandbox registry: sandboxes run by `capsa-vmm` monitors, found by name
//! under a state root. The CLI (`capsa ps/rm/start/exec`) and `capsad` use it.

use std::path::PathBuf;
use std::time::Duration;

use capsa_core::{HostLimits, VmInstance};
use capsa_vmm::{SandboxRecord, SandboxState, StateRoot, VmmError};

use crate::sandbox::SandboxExtra;
use crate::{Error, RestoreBuilder, Result, Sandbox, SandboxBuilder, DEFAULT_READY_TIMEOUT};

/// How long an attach waits for the agent of a running sandbox.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `open` waits for a sandbox that is still starting.
const STARTING_TIMEOUT: Duration = Duration::from_secs(120);

/// The label naming who manages a sandbox besides capsa (the containerd
/// shim writes `containerd-shim`); `capsa ps` and capsad show it.
pub const LABEL_OWNER: &str = "owner";

/// The sandboxes under one state root.
#[derive(Debug, Clone)]
pub struct Sandboxes {
    root: StateRoot,
}

impl Sandboxes {
    /// The registry at `root`, or at [`StateRoot::default_root`] for `None`.
    pub fn new(root: Option<PathBuf>) -> Self {
        Self {
            root: root.map_or_else(StateRoot::default_root, StateRoot::new),
        }
    }

    /// The state root.
    pub fn root(&self) -> &StateRoot {
        &self.root
    }

    /// Every sandbox, sorted by name, with liveness checked.
    pub fn list(&self) -> Result<Vec<SandboxRecord>> {
        Ok(self.root.list()?)
    }

    /// One sandbox's record.
    pub fn get(&self, name: &str) -> Result<SandboxRecord> {
        Ok(self.root.get(name)?)
    }

    /// Creates a keep-running sandbox here (`builder.keep_running(true)`, this root).
    pub async fn create(&self, builder: SandboxBuilder) -> Result<Sandbox> {
        builder
            .state_root(self.root.path())
            .keep_running(true)
            .build()
            .await
    }

    /// Creates a keep-running sandbox here restored from a snapshot
    /// (`builder.keep_running(true)`, this root; the builder needs a name).
    /// The clone gets a fresh identity unless the builder says otherwise.
    pub async fn create_restored(&self, builder: RestoreBuilder) -> Result<Sandbox> {
        builder
            .state_root(self.root.path())
            .keep_running(true)
            .build()
            .await
    }

    /// Attaches to a running sandbox: its monitor over `monitor.sock`, its
    /// agent over `vsock.sock`. Dropping the result does not stop the sandbox.
    /// The handle has no console (`vm().console()` fails): exec and files
    /// never need one; [`Sandboxes::open_with_console`] attaches it too.
    pub async fn open(&self, name: &str) -> Result<Sandbox> {
        self.open_inner(name, false).await
    }

    /// [`Sandboxes::open`], also attaching the serial console.
    pub async fn open_with_console(&self, name: &str) -> Result<Sandbox> {
        self.open_inner(name, true).await
    }

    /// Stops a running sandbox through its monitor alone (graceful, then
    /// killed after `grace`): a frozen or hostile guest agent cannot delay it.
    pub async fn stop(&self, name: &str, grace: Duration) -> Result<capsa_core::ExitReason> {
        let handle = self.monitor_of(name).await?;
        if let Err(e) = handle.request_shutdown().await {
            tracing::debug!(
                sandbox = name,
                "graceful stop request failed ({e}); killing"
            );
            handle.kill().await?;
        } else if tokio::time::timeout(grace, handle.wait()).await.is_err() {
            tracing::warn!(
                sandbox = name,
                ?grace,
                "guest did not shut down in time; killing"
            );
            handle.kill().await?;
        }
        Ok(handle.wait().await?)
    }

    /// Kills a running sandbox at once through its monitor alone.
    pub async fn kill(&self, name: &str) -> Result<capsa_core::ExitReason> {
        let handle = self.monitor_of(name).await?;
        handle.kill().await?;
        Ok(handle.wait().await?)
    }

    /// The monitor of a live sandbox, connected without console or agent.
    async fn monitor_of(&self, name: &str) -> Result<capsa_vmm::MonitorHandle> {
        let rec = self.root.get(name)?;
        match rec.state {
            SandboxState::Dead => return Err(VmmError::Dead { name: name.into() }.into()),
            SandboxState::Stopped => return Err(VmmError::Stopped { name: name.into() }.into()),
            SandboxState::Starting | SandboxState::Running | SandboxState::Paused => {}
        }
        let mut h = capsa_vmm::connect(&rec.dir).await?;
        h.skip_console();
        Ok(h)
    }

    async fn open_inner(&self, name: &str, console: bool) -> Result<Sandbox> {
        let rec = self.root.get(name)?;
        match rec.state {
            SandboxState::Dead => return Err(VmmError::Dead { name: name.into() }.into()),
            SandboxState::Stopped => return Err(VmmError::Stopped { name: name.into() }.into()),
            SandboxState::Starting | SandboxState::Running | SandboxState::Paused => {}
        }
        let spec = rec.spec.clone().ok_or_else(|| VmmError::BadState {
            path: rec.dir.join(capsa_vmm::state::files::SPEC),
            message: "missing or unreadable".into(),
        })?;
        let mut handle = match capsa_vmm::connect(&rec.dir).await {
            Ok(h) => h,
            // It may have ended between the record and the connect.
            Err(e) => {
                return Err(match self.root.get(name).map(|r| r.state) {
                    Ok(SandboxState::Stopped) => VmmError::Stopped { name: name.into() },
                    Ok(SandboxState::Dead) => VmmError::Dead { name: name.into() },
                    _ => e,
                }
                .into())
            }
        };
        if rec.state == SandboxState::Starting {
            handle.wait_started(STARTING_TIMEOUT).await?;
        }
        if !console {
            handle.skip_console();
        }
        let vm = crate::builder::attach_monitor(name.to_string(), spec, handle)?;
        let extra = extra_of(&rec);
        // A sandbox still booting has no agent yet: wait for it on the console.
        let booting = rec.state == SandboxState::Starting;
        Sandbox::ready(
            vm,
            extra,
            if booting {
                DEFAULT_READY_TIMEOUT
            } else {
                ATTACH_TIMEOUT
            },
            false,
        )
        .await
    }

    /// Boots a stopped (or dead) sandbox again from its recorded spec, with a
    /// fresh monitor; it keeps running like a created one.
    pub async fn start(&self, name: &str) -> Result<Sandbox> {
        let rec = self.root.get(name)?;
        if rec.is_live() {
            return Err(Error::InvalidArgument(format!(
                "sandbox {name:?} is already {}; fix: use Sandboxes::open",
                rec.state
            )));
        }
        let mut spec = rec.spec.clone().ok_or_else(|| VmmError::BadState {
            path: rec.dir.join(capsa_vmm::state::files::SPEC),
            message: "missing or unreadable".into(),
        })?;
        // The kernel or disks may be gone since it was created.
        spec.validate(&HostLimits::detect())?;
        if rec.state == SandboxState::Dead {
            self.root.kill_leftovers(name)?;
        }
        let handle = capsa_vmm::respawn(&self.root, name, true, None).await?;
        if let Err(e) = handle.wait_started(STARTING_TIMEOUT).await {
            let _ = handle.kill().await;
            return Err(e.into());
        }
        let vm = crate::builder::attach_monitor(name.to_string(), spec, handle)?;
        let extra = extra_of(&rec);
        Sandbox::ready(vm, extra, DEFAULT_READY_TIMEOUT, true)
            .await?
            .mount_boot_shares()
            .await
    }

    /// Removes a sandbox. A running one needs `force` (it is killed first); a
    /// dead one's leftover processes are reaped.
    pub async fn remove(&self, name: &str, force: bool) -> Result<()> {
        let rec = self.root.get(name)?;
        if rec.is_live() {
            if !force {
                return Err(VmmError::Running { name: name.into() }.into());
            }
            // Politely through the monitor (it records the exit); the state
            // root's removal below kills whatever is left regardless.
            if let Ok(h) = capsa_vmm::connect(&rec.dir).await {
                let _ = tokio::time::timeout(Duration::from_secs(10), h.kill()).await;
                let _ = tokio::time::timeout(Duration::from_secs(5), h.wait()).await;
            }
        }
        // Removal may wait (bounded) for killed processes to go: off the runtime.
        let (root, owned) = (self.root.clone(), name.to_string());
        tokio::task::spawn_blocking(move || root.remove(&owned))
            .await
            .map_err(|e| Error::io("removing a sandbox", std::io::Error::other(e)))??;
        Ok(())
    }
}

impl Sandboxes {
    /// A label of a sandbox record (set with [`RestoreBuilder::label`] or
    /// [`Sandboxes::set_label`]).
    pub fn label<'a>(rec: &'a SandboxRecord, key: &str) -> Option<&'a str> {
        rec.extra.as_ref()?.get("labels")?.get(key)?.as_str()
    }

    /// Sets (`Some`) or removes (`None`) a label in the sandbox's
    /// `sandbox.json`, atomically (temp file + rename), keeping every other
    /// field as it is.
    pub fn set_label(&self, name: &str, key: &str, value: Option<&str>) -> Result<()> {
        let rec = self.root.get(name)?;
        let path = rec.dir.join(capsa_vmm::state::files::SANDBOX);
        let mut doc = match rec.extra {
            Some(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        let labels = doc
            .entry("labels")
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
        if !labels.is_object() {
            *labels = serde_json::Value::Object(Default::default());
        }
        if let Some(m) = labels.as_object_mut() {
            match value {
                Some(v) => {
                    m.insert(key.to_string(), v.into());
                }
                None => {
                    m.remove(key);
                }
            }
        }
        let bytes = serde_json::to_vec_pretty(&doc)
            .map_err(|e| Error::io("encoding sandbox.json", std::io::Error::other(e)))?;
        let tmp = rec.dir.join(".sandbox.json.label.tmp");
        std::fs::write(&tmp, bytes)
            .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| Error::io(format!("renaming to {}", path.display()), e))
    }
}

fn extra_of(rec: &SandboxRecord) -> SandboxExtra {
    rec.extra
        .clone()
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default()
}
