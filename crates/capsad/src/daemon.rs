//! Starting the daemon: state dir, token, socket (permissions, stale-socket
//! handling, single instance), optional loopback TCP, graceful shutdown.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use capsa_api::local::{pools::PoolConfig, LocalService};
use capsa_api::Service;

use crate::server::{app, AppState};

/// How to run the daemon.
#[derive(Debug, Clone)]
pub struct Config {
    /// The state root (shared with the library's `StateRoot`).
    pub state_dir: PathBuf,
    /// The Unix socket to serve on (default `<state_dir>/capsad.sock`).
    pub socket: Option<PathBuf>,
    /// Group allowed to connect (socket mode 0660 instead of 0600).
    pub socket_group: Option<String>,
    /// The token file (default `<state_dir>/capsad.token`).
    pub token_file: Option<PathBuf>,
    /// Also serve on this loopback TCP address.
    pub listen_tcp: Option<SocketAddr>,
    /// Warm pools to run (`--pool`), besides those saved by the API.
    pub pools: Vec<PoolConfig>,
    /// Most ready pool members across all pools.
    pub max_pool_members: usize,
    /// The named snapshot store (default: the library's).
    pub snapshot_dir: Option<PathBuf>,
    /// Directories whose regular files API clients may attach as disks
    /// (`--allow-disk-dir`); the state dir and capsa's cache are always allowed.
    pub allow_disk_dirs: Vec<PathBuf>,
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Another daemon answers on the socket.
    #[error("another capsad is already serving on {0}; fix: stop it, or pass --socket with another path")]
    AlreadyRunning(PathBuf),
    /// A non-socket file sits where the socket should be.
    #[error("{0} exists and is not a socket; fix: remove it, or pass --socket with another path")]
    NotASocket(PathBuf),
    /// The TCP address is not loopback.
    #[error("--listen-tcp {0} is not a loopback address; fix: use 127.0.0.1:PORT or [::1]:PORT (the API runs code in VMs: never expose it on a network)")]
    NotLoopback(SocketAddr),
    /// The socket path is longer than a Unix socket address allows.
    #[error("socket path {0} is longer than 107 bytes; fix: pass --socket with a shorter path")]
    SocketPathTooLong(PathBuf),
    /// The group does not exist.
    #[error("group {0:?} does not exist; fix: create it or pass an existing --socket-group")]
    NoSuchGroup(String),
    /// The token file is unusable.
    #[error(transparent)]
    Token(#[from] crate::auth::TokenError),
    /// The state directory is not safely the daemon's.
    #[error("state directory {0} is unsafe: {1}; fix: use a directory only capsad's user owns and can write (`mkdir -m 700 DIR`, --state-dir DIR)")]
    UnsafeStateDir(PathBuf, String),
    /// A pool configuration is unusable.
    #[error("{0}")]
    Pool(String),
    /// Host I/O failed.
    #[error("{context}: {source}")]
    Io {
        /// What capsad was doing.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StartError {
    let context = context.into();
    move |source| StartError::Io { context, source }
}

fn group_id(name: &str) -> Result<libc::gid_t, StartError> {
    if let Ok(gid) = name.parse::<libc::gid_t>() {
        return Ok(gid);
    }
    let c = std::ffi::CString::new(name).map_err(|_| StartError::NoSuchGroup(name.into()))?;
    // SAFETY: getgrnam returns a pointer to static storage or NULL; we read one field at once.
    let gr = unsafe { libc::getgrnam(c.as_ptr()) };
    if gr.is_null() {
        return Err(StartError::NoSuchGroup(name.into()));
    }
    // SAFETY: non-null pointer from getgrnam.
    Ok(unsafe { (*gr).gr_gid })
}

/// Binds the Unix socket: refuses when another daemon answers, removes a
/// stale socket file, creates it 0600 (umask) and then applies the group.
async fn bind_socket(
    path: &Path,
    group: Option<&str>,
) -> Result<tokio::net::UnixListener, StartError> {
    if path.as_os_str().len() > 107 {
        return Err(StartError::SocketPathTooLong(path.into()));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(StartError::AlreadyRunning(path.into()));
            }
            tracing::info!(socket = %path.display(), "removing a stale socket");
            std::fs::remove_file(path).map_err(io(format!("removing stale {}", path.display())))?;
        }
        Ok(_) => return Err(StartError::NotASocket(path.into())),
        Err(_) => {}
    }
    let gid = group.map(group_id).transpose()?;
    // The socket is created with the process umask: make it owner-only from
    // the first instant, so there is no window where others can connect.
    // SAFETY: umask only swaps the process's file mode mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = tokio::net::UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(io(format!("binding {}", path.display())))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(io(format!("setting the group of {}", path.display())))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .map_err(io(format!("chmod {}", path.display())))?;
    }
    Ok(listener)
}

/// Runs the daemon until SIGINT/SIGTERM, then removes its socket.
pub async fn run(cfg: Config) -> Result<(), StartError> {
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&cfg.state_dir)
            .map_err(io(format!("creating {}", cfg.state_dir.display())))?;
    }
    capsa_core::check_private_dir(&cfg.state_dir)
        .map_err(|problem| StartError::UnsafeStateDir(cfg.state_dir.clone(), problem))?;
    let socket = cfg
        .socket
        .clone()
        .unwrap_or_else(|| cfg.state_dir.join("capsad.sock"));
    // Beside the socket, where `capsa --host unix://SOCKET` looks for it.
    let token_file = cfg.token_file.clone().unwrap_or_else(|| {
        socket
            .parent()
            .unwrap_or(&cfg.state_dir)
            .join("capsad.token")
    });
    let token = crate::auth::load_or_create_token(&token_file)?;
    if let Some(addr) = cfg.listen_tcp {
        if !addr.ip().is_loopback() {
            return Err(StartError::NotLoopback(addr));
        }
    }
    let listener = bind_socket(&socket, cfg.socket_group.as_deref()).await?;

    let mut allowed = cfg.allow_disk_dirs.clone();
    allowed.push(cfg.state_dir.clone());
    if let Ok(cache) = capsa::image::default_cache_dir() {
        allowed.push(cache);
    }
    let paths = capsa_core::HostPathPolicy::new(allowed);
    tracing::info!(allowed = %paths.describe(), "host paths API clients may attach");
    let service = LocalService::new(Some(cfg.state_dir.clone()), cfg.snapshot_dir.clone())
        .with_pools(cfg.max_pool_members)
        .with_host_paths(paths);
    service.report_dead();
    // Only the daemon that owns the socket runs pools (restores members).
    service
        .start_pools(cfg.pools.clone())
        .map_err(StartError::Pool)?;
    let service: Arc<dyn Service> = Arc::new(service);
    let state = AppState::new(service.clone());
    let poller = state.spawn_event_poller();
    match service.list().await {
        Ok(l) => {
            let dead = l
                .iter()
                .filter(|s| s.state == crate::api::SandboxState::Dead)
                .count();
            tracing::info!(sandboxes = l.len(), dead, "rediscovered sandboxes");
        }
        Err(e) => tracing::warn!("listing sandboxes: {e}"),
    }
    let router = app(state, token);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shutdown = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = tokio::task::JoinSet::new();
    {
        let router = router.clone();
        let rx = stop_rx.clone();
        tasks.spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown(rx))
                .await
        });
    }
    if let Some(addr) = cfg.listen_tcp {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(io(format!("binding {addr}")))?;
        let rx = stop_rx.clone();
        tasks.spawn(async move {
            axum::serve(l, router)
                .with_graceful_shutdown(shutdown(rx))
                .await
        });
        tracing::info!(%addr, "also serving on loopback TCP");
    }
    tracing::info!(socket = %socket.display(), "capsad serving");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io("installing the SIGTERM handler"))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        r = tasks.join_next() => {
            if let Some(Ok(Err(e))) = r {
                tracing::error!("server ended: {e}");
            }
        }
    }
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    // Streams (exec, follow, events) may stay open: do not wait for them long.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    poller.abort();
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
