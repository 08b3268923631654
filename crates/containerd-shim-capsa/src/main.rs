//! `containerd-shim-capsa-v2`: containerd's runtime v2 shim
//! (`io.containerd.capsa.v2`) that runs each task in a capsa VM.
//!
//! containerd runs it three ways: `start` (spawns the long-lived shim
//! server, writes `address` into the bundle and prints the socket address),
//! the server itself (task API v2 over ttrpc), and `delete` (cleans up after
//! a shim that died: kills the task's VM by its sandbox name).

mod bundle;
mod config;
mod error;
mod pool;
mod rootfs;
mod service;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{run, spawn, ExitSignal, Shim};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::{Config, DeleteResponse, Error, Flags, StartOpts};

/// The runtime name containerd knows this shim by.
const RUNTIME_ID: &str = "io.containerd.capsa.v2";

struct CapsaShim {
    namespace: String,
    id: String,
    bundle: String,
    exit: Arc<ExitSignal>,
}

#[async_trait]
impl Shim for CapsaShim {
    type T = service::Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        init_logging(args);
        CapsaShim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle: args.bundle.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let grouping = opts.id.clone();
        let address = spawn(opts, &grouping, Vec::new()).await?;
        // containerd 1.6 reads it back from the bundle when it restarts.
        std::fs::write("address", address.as_bytes())
            .map_err(|e| Error::Other(format!("writing the address file: {e}")))?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        let bundle = if self.bundle.is_empty() {
            std::env::current_dir()
                .map_err(|e| Error::Other(format!("the bundle directory: {e}")))?
        } else {
            std::path::PathBuf::from(&self.bundle)
        };
        let name = service::sandbox_name(&self.namespace, &self.id);
        tracing::info!(id = self.id, sandbox = name, "delete after a dead shim");
        service::cleanup_container(&self.namespace, &self.id, &bundle).await;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(DeleteResponse {
            // As runc's shim does: the task died with SIGKILL.
            exit_status: 128 + 9,
            exited_at: MessageField::some(Timestamp {
                seconds: now.as_secs() as i64,
                nanos: now.subsec_nanos() as i32,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        service::Service::new(self.namespace.clone(), publisher, self.exit.clone())
    }
}

/// Where logs go: the server writes to the `log` FIFO containerd reads in
/// the bundle (non-blocking: a containerd that went away never stalls the
/// shim); `start` and `delete` write to stderr, which containerd logs.
fn init_logging(flags: &Flags) {
    let level = if flags.debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let server = flags.action.is_empty() && !flags.socket.is_empty();
    let fifo = server
        .then(|| {
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open("log")
                .ok()
        })
        .flatten();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    let _ = match fifo {
        Some(f) => {
            let f = Arc::new(Mutex::new(f));
            builder.with_writer(move || LogWriter(f.clone())).try_init()
        }
        None => builder.with_writer(std::io::stderr).try_init(),
    };
}

/// A writer that drops what the FIFO cannot take instead of blocking.
struct LogWriter(Arc<Mutex<std::fs::File>>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = f.write(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    let config = Config {
        // Logs go through tracing (init_logging).
        no_setup_logger: true,
        default_log_level: "info".into(),
        // capsa waits for its own children (monitors, QEMU); a reaper
        // collecting every child would steal their exit statuses.
        no_reaper: true,
        // Orphaned monitors must not become the shim's zombies.
        no_sub_reaper: true,
    };
    run::<CapsaShim>(RUNTIME_ID, Some(config)).await;
}
