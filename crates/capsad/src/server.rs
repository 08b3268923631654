//! Routes and handlers.
//!
//! Every handler validates its input into typed values before touching a
//! backend, and every failure (its own or axum's) leaves as an
//! [`ErrorBody`](crate::error::ErrorBody). The OpenAPI document is collected
//! from the handlers' annotations by `utoipa-axum` while the router is built,
//! so a route cannot exist without being documented.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use base64::Engine as _;
use futures::{SinkExt, StreamExt, TryStreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, oneshot};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::*;
use crate::auth::{require_token, Token};
use crate::backend::Backend;
use crate::error::{ApiError, ApiResult, ErrorBody, ErrorCode};
use crate::locks::NameLocks;

/// Body limit of the small JSON endpoints.
pub const JSON_BODY_LIMIT: usize = 64 * 1024;
/// Body limit of exec requests (they may carry stdin, base64).
pub const EXEC_BODY_LIMIT: usize = 8 * 1024 * 1024;
/// How often the state root is polled for `/v1/events`.
pub const EVENT_POLL: Duration = Duration::from_millis(500);
/// Size of each streamed chunk (exec output, downloads, console).
const CHUNK: usize = 64 * 1024;
/// Longest exec timeout accepted (a week): bounds the arithmetic downstream.
const MAX_EXEC_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    backend: Arc<dyn Backend>,
    locks: Arc<NameLocks>,
    events: broadcast::Sender<Event>,
    /// Which host files API clients may attach.
    host_paths: Arc<capsa_core::HostPathPolicy>,
}

impl AppState {
    /// State around `backend`.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        let (events, _) = broadcast::channel(1024);
        Self {
            backend,
            locks: Arc::new(NameLocks::default()),
            events,
            host_paths: Arc::new(capsa_core::HostPathPolicy::default()),
        }
    }

    /// Allows API clients to attach the host files `policy` allows (by
    /// default, none).
    pub fn with_host_paths(mut self, policy: capsa_core::HostPathPolicy) -> Self {
        self.host_paths = Arc::new(policy);
        self
    }

    fn emit(&self, ev: Event) {
        // No subscribers is not an error.
        let _ = self.events.send(ev);
    }

    /// Polls the backend every [`EVENT_POLL`] and emits state diffs, until the
    /// runtime shuts down.
    pub fn spawn_event_poller(&self) -> tokio::task::JoinHandle<()> {
        let st = self.clone();
        tokio::spawn(async move {
            let mut prev: HashMap<String, SandboxState> = HashMap::new();
            let mut tick = tokio::time::interval(EVENT_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let now = match st.backend.list().await {
                    Ok(l) => l
                        .into_iter()
                        .map(|s| (s.name, s.state))
                        .collect::<HashMap<_, _>>(),
                    Err(e) => {
                        tracing::debug!("event poll: {e}");
                        continue;
                    }
                };
                for (name, state) in &now {
                    if prev.get(name) != Some(state) {
                        st.emit(Event::State {
                            name: name.clone(),
                            state: *state,
                        });
                    }
                }
                for name in prev.keys() {
                    if !now.contains_key(name) {
                        st.emit(Event::Removed { name: name.clone() });
                    }
                }
                prev = now;
            }
        })
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "capsad",
        description = "The capsa daemon: create, run and manage sandbox VMs. Every request needs `Authorization: Bearer <token>`; every error is `{\"error\": {\"code\", \"message\", \"fix\"}}`."
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(ErrorBody, ExecEvent, Event))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

fn limited<S: Clone + Send + Sync + 'static>(
    (schemas, paths, router): utoipa_axum::router::UtoipaMethodRouter<S>,
    limit: Option<usize>,
) -> utoipa_axum::router::UtoipaMethodRouter<S> {
    let layer = match limit {
        Some(n) => DefaultBodyLimit::max(n),
        None => DefaultBodyLimit::disable(),
    };
    (schemas, paths, router.layer(layer))
}

fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health))
        .routes(routes!(list_sandboxes, create_sandbox))
        .routes(routes!(get_sandbox, delete_sandbox))
        .routes(routes!(start_sandbox))
        .routes(routes!(stop_sandbox))
        .routes(routes!(kill_sandbox))
        .routes(limited(routes!(exec), Some(EXEC_BODY_LIMIT)))
        .routes(routes!(exec_ws))
        .routes(limited(routes!(put_file, get_file), None))
        .routes(routes!(stat_file))
        .routes(routes!(list_files))
        .routes(routes!(mkdir_file))
        .routes(routes!(console))
        .routes(routes!(console_ws))
        .routes(routes!(events))
        .routes(routes!(snapshot_sandbox))
        .routes(routes!(list_snapshots))
        .routes(routes!(delete_snapshot))
        .routes(routes!(list_pools, create_pool))
        .routes(routes!(get_pool, delete_pool))
        .routes(routes!(acquire))
}

/// The OpenAPI document of the API (what `GET /openapi.json` serves).
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_router().split_for_parts().1
}

/// The complete service: routes, JSON fallbacks, auth, body limits.
pub fn app(state: AppState, token: String) -> Router {
    let (router, doc) = api_router().split_for_parts();
    let doc = Arc::new(doc.to_json().unwrap_or_else(|_| "{}".into()));
    let token = Token(Arc::new(token));
    router
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], (*doc).clone()) }
            }),
        )
        .fallback(|uri: Uri| async move { ApiError::no_route(uri.path()) })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(token, require_token))
        .with_state(state)
}

type NameParam = Result<Path<String>, PathRejection>;

fn name_of(p: NameParam) -> ApiResult<String> {
    let Path(name) = p?;
    validate_name(&name)?;
    Ok(name)
}

/// Daemon liveness and a sandbox count (needs auth like everything else).
#[utoipa::path(get, path = "/v1/health", tag = "daemon",
    responses((status = 200, body = Health), (status = 401, body = ErrorBody)))]
async fn health(State(st): State<AppState>) -> ApiResult<Json<Health>> {
    let n = st.backend.list().await?.len();
    Ok(Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        backend: st.backend.kind().into(),
        sandboxes: n,
    }))
}

/// Every sandbox, including stopped and dead ones.
#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes",
    responses((status = 200, body = Vec<SandboxInfo>), (status = 401, body = ErrorBody)))]
async fn list_sandboxes(State(st): State<AppState>) -> ApiResult<Json<Vec<SandboxInfo>>> {
    Ok(Json(st.backend.list().await?))
}

fn validate_create(req: &CreateSandboxRequest) -> ApiResult<()> {
    if let Some(n) = &req.network {
        n.validate()
            .map_err(|e| ApiError::bad_request(format!("network: {e}")))?;
    }
    if let Some(s) = &req.from_snapshot {
        validate_snapshot_name(s)?;
        if req.cpus.is_some()
            || req.memory_mib.is_some()
            || !req.disks.is_empty()
            || req.accel.is_some()
            || req.network.is_some()
        {
            return Err(ApiError::bad_request(
                "from_snapshot conflicts with cpus, memory_mib, disks, accel and network: the snapshot fixes them",
            )
            .fix("drop cpus/memory_mib/disks/accel/network, or drop from_snapshot to boot a new spec"));
        }
        if !req.start {
            return Err(ApiError::bad_request("from_snapshot with start: false")
                .fix("a restored sandbox is running from the start: drop `start: false`"));
        }
    }
    if let Some(c) = req.cpus {
        if !(1..=capsa_core::MAX_CPUS).contains(&c) {
            return Err(ApiError::bad_request(format!("cpus {c} is out of range"))
                .fix(format!("give 1 to {} vCPUs", capsa_core::MAX_CPUS)));
        }
    }
    if let Some(m) = req.memory_mib {
        if !(capsa_core::MIN_MEMORY_MIB..=capsa_core::MAX_MEMORY_MIB).contains(&m) {
            return Err(
                ApiError::bad_request(format!("memory_mib {m} is out of range"))
                    .fix("give 128 to 1048576 MiB (a guest needs at least 128) (and no more than the host has)"),
            );
        }
    }
    validate_env(&req.env)?;
    if let Some(w) = &req.workdir {
        validate_guest_path("workdir", w)?;
    }
    if req.disks.len() > MAX_DISKS {
        return Err(ApiError::bad_request(format!(
            "{} disks; at most {MAX_DISKS} are accepted",
            req.disks.len()
        )));
    }
    Ok(())
}

/// Resolves every disk path through the daemon's host-path policy: only
/// regular files below the allowed directories, symlinks resolved (and the
/// resolved path used from here on).
fn resolve_disks(
    req: &mut CreateSandboxRequest,
    policy: &capsa_core::HostPathPolicy,
) -> ApiResult<()> {
    for d in &mut req.disks {
        let real = policy.check_file(&d.path).map_err(|e| {
            ApiError::new(
                StatusCode::FORBIDDEN,
                crate::error::ErrorCode::PathNotAllowed,
                format!("disk {e}"),
            )
            .fix(format!(
                "attach a regular image file below one of the directories capsad allows ({}); \
                 the daemon's operator can add one with --allow-disk-dir DIR",
                policy.describe()
            ))
        })?;
        d.path = real.display().to_string();
    }
    Ok(())
}

fn generated_name() -> String {
    let mut b = [0u8; 4];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok();
    if !ok {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        b = n.to_le_bytes();
    }
    format!(
        "sb-{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

/// Creates a sandbox and (unless `start: false`) boots it; answers once its agent is up.
#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes",
    request_body = CreateSandboxRequest,
    responses((status = 201, body = SandboxInfo), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn create_sandbox(
    State(st): State<AppState>,
    body: Result<Json<CreateSandboxRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<SandboxInfo>)> {
    let Json(mut req) = body?;
    let name = match &req.name {
        Some(n) => n.clone(),
        None => generated_name(),
    };
    validate_name(&name)?;
    validate_create(&req)?;
    resolve_disks(&mut req, &st.host_paths)?;
    let _g = st.locks.try_lock(&name)?;
    let r = st.backend.create(&name, &req).await;
    st.emit(Event::Action {
        name: name.clone(),
        action: "create".into(),
        ok: r.is_ok(),
    });
    Ok((StatusCode::CREATED, Json(r?)))
}

/// One sandbox.
#[utoipa::path(get, path = "/v1/sandboxes/{name}", tag = "sandboxes",
    params(("name" = String, Path, description = "sandbox name")),
    responses((status = 200, body = SandboxInfo), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn get_sandbox(State(st): State<AppState>, p: NameParam) -> ApiResult<Json<SandboxInfo>> {
    let name = name_of(p)?;
    Ok(Json(st.backend.get(&name).await?))
}

/// Deletes a sandbox and its state; a running one needs `force=true` (it is killed).
#[utoipa::path(delete, path = "/v1/sandboxes/{name}", tag = "sandboxes",
    params(("name" = String, Path, description = "sandbox name"), DeleteQuery),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn delete_sandbox(
    State(st): State<AppState>,
    p: NameParam,
    q: Result<Query<DeleteQuery>, QueryRejection>,
) -> ApiResult<StatusCode> {
    let name = name_of(p)?;
    let Query(q) = q?;
    let _g = st.locks.try_lock(&name)?;
    let r = st.backend.remove(&name, q.force.unwrap_or(false)).await;
    st.emit(Event::Action {
        name,
        action: "delete".into(),
        ok: r.is_ok(),
    });
    r?;
    Ok(StatusCode::NO_CONTENT)
}

async fn lifecycle(st: &AppState, p: NameParam, action: &str) -> ApiResult<Json<SandboxInfo>> {
    let name = name_of(p)?;
    let _g = st.locks.try_lock(&name)?;
    let r = match action {
        "start" => st.backend.start(&name).await,
        "stop" => st.backend.stop(&name).await,
        _ => st.backend.kill(&name).await,
    };
    st.emit(Event::Action {
        name,
        action: action.into(),
        ok: r.is_ok(),
    });
    Ok(Json(r?))
}

/// Boots a stopped sandbox; answers once its agent is up.
#[utoipa::path(post, path = "/v1/sandboxes/{name}/start", tag = "sandboxes",
    params(("name" = String, Path, description = "sandbox name")),
    responses((status = 200, body = SandboxInfo), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn start_sandbox(State(st): State<AppState>, p: NameParam) -> ApiResult<Json<SandboxInfo>> {
    lifecycle(&st, p, "start").await
}

/// Shuts a sandbox down gracefully (killed after a grace period).
#[utoipa::path(post, path = "/v1/sandboxes/{name}/stop", tag = "sandboxes",
    params(("name" = String, Path, description = "sandbox name")),
    responses((status = 200, body = SandboxInfo), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn stop_sandbox(State(st): State<AppState>, p: NameParam) -> ApiResult<Json<SandboxInfo>> {
    lifecycle(&st, p, "stop").await
}

/// Kills a sandbox's VM at once.
#[utoipa::path(post, path = "/v1/sandboxes/{name}/kill", tag = "sandboxes",
    params(("name" = String, Path, description = "sandbox name")),
    responses((status = 200, body = SandboxInfo), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn kill_sandbox(State(st): State<AppState>, p: NameParam) -> ApiResult<Json<SandboxInfo>> {
    lifecycle(&st, p, "kill").await
}

/// Checks an exec request and turns it into a library command (+ stdin bytes).
fn command_of(req: &ExecRequest) -> ApiResult<(capsa::Command, Option<Vec<u8>>)> {
    let Some(program) = req.argv.first() else {
        return Err(ApiError::bad_request("argv is empty")
            .fix("give the program and its arguments, e.g. [\"ls\", \"-l\"]"));
    };
    if program.is_empty() {
        return Err(ApiError::bad_request("argv[0] is empty").fix("name a program"));
    }
    if req.argv.len() > MAX_ARGV || req.argv.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::bad_request(format!(
            "argv has more than {MAX_ARGV} entries or a NUL byte"
        )));
    }
    validate_env(&req.env)?;
    if let Some(c) = &req.cwd {
        validate_guest_path("cwd", c)?;
    }
    let mut cmd = capsa::Command::new(program).args(req.argv[1..].iter().cloned());
    for (k, v) in &req.env {
        cmd = cmd.env(k, v);
    }
    if let Some(c) = &req.cwd {
        cmd = cmd.current_dir(c);
    }
    if let Some(t) = req.timeout_ms {
        if t == 0 || t > MAX_EXEC_TIMEOUT_MS {
            return Err(
                ApiError::bad_request(format!("timeout_ms {t} is out of range")).fix(format!(
                    "give 1 to {MAX_EXEC_TIMEOUT_MS} ms, or leave it out"
                )),
            );
        }
        cmd = cmd.timeout(Duration::from_millis(t));
    }
    if req.tty {
        let rows = req.rows.unwrap_or(24).max(1);
        let cols = req.cols.unwrap_or(80).max(1);
        cmd = cmd.pty(rows, cols);
    }
    let stdin = match &req.stdin {
        Some(s) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| {
                    ApiError::bad_request(format!("stdin is not valid base64: {e}"))
                        .fix("encode stdin with standard base64 (with padding)")
                })?,
        ),
        None => None,
    };
    if stdin.is_some() {
        cmd = cmd.stdin_piped();
    }
    Ok((cmd, stdin))
}

fn ndjson(ev: &ExecEvent) -> Bytes {
    let mut v = serde_json::to_vec(ev).unwrap_or_else(|_| b"{\"type\":\"error\"}".to_vec());
    v.push(b'\n');
    Bytes::from(v)
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Copies one output stream into the event channel; false when the client is gone.
async fn pump(out: Option<capsa::ExecOutput>, tx: mpsc::Sender<ExecEvent>, stderr: bool) -> bool {
    let Some(mut out) = out else { return true };
    let mut buf = vec![0u8; CHUNK];
    loop {
        match out.read(&mut buf).await {
            Ok(0) => return true,
            Ok(n) => {
                let data = b64(&buf[..n]);
                let ev = if stderr {
                    ExecEvent::Stderr { data }
                } else {
                    ExecEvent::Stdout { data }
                };
                if tx.send(ev).await.is_err() {
                    return false;
                }
            }
            Err(e) => {
                tracing::debug!("exec output: {e}");
                return true;
            }
        }
    }
}

/// Drives a started exec: feeds stdin, forwards output, then the exit (or an
/// error). Returns when the exec ends or `tx` is closed (the client left; then
/// dropping the child makes the agent kill the process group).
async fn drive_exec(
    mut child: capsa::ExecChild,
    stdin: Option<Vec<u8>>,
    tx: mpsc::Sender<ExecEvent>,
) {
    if let (Some(data), Some(mut s)) = (stdin, child.stdin()) {
        tokio::spawn(async move {
            // A process may exit without reading all of stdin; not an error.
            let _ = s.write_all(&data).await;
            let _ = s.shutdown().await;
        });
    }
    let (a, b) = tokio::join!(
        pump(child.stdout(), tx.clone(), false),
        pump(child.stderr(), tx.clone(), true)
    );
    if !(a && b) {
        return;
    }
    let ev = tokio::select! {
        st = child.wait() => match st {
            Ok(s) => ExecEvent::Exit { code: s.code, signal: s.signal, timed_out: s.timed_out },
            Err(e) => {
                let e = ApiError::from_capsa("exec", &capsa::Error::Agent(e));
                ExecEvent::Error { code: e.detail.code, message: e.detail.message }
            }
        },
        _ = tx.closed() => return,
    };
    let _ = tx.send(ev).await;
}

/// Runs a command; the response is NDJSON (`application/x-ndjson`), one
/// [`ExecEvent`] per line as output happens, ending with `exit` or `error`.
#[utoipa::path(post, path = "/v1/sandboxes/{name}/exec", tag = "exec",
    params(("name" = String, Path, description = "sandbox name")),
    request_body = ExecRequest,
    responses((status = 200, description = "NDJSON stream of ExecEvent", content_type = "application/x-ndjson", body = ExecEvent),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody)))]
async fn exec(
    State(st): State<AppState>,
    p: NameParam,
    body: Result<Json<ExecRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let name = name_of(p)?;
    let Json(req) = body?;
    let (cmd, stdin) = command_of(&req)?;
    let child = st.backend.spawn(&name, &cmd).await?;
    let (tx, rx) = mpsc::channel::<ExecEvent>(16);
    tokio::spawn(drive_exec(child, stdin, tx));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|ev| (Ok::<_, Infallible>(ndjson(&ev)), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// A control message of the exec WebSocket (text frames from the client).
#[derive(Debug, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum WsControl {
    Resize { rows: u16, cols: u16 },
    Signal { signal: i32 },
    StdinEof,
}

/// Interactive exec over a WebSocket. The first client message is a text
/// frame holding an [`ExecRequest`] (its `stdin` field is ignored; stdin stays
/// open). Then binary frames are stdin, text frames are controls
/// (`{"type":"resize","rows":R,"cols":C}`, `{"type":"signal","signal":N}`,
/// `{"type":"stdin_eof"}`). The server sends text frames, each an
/// [`ExecEvent`], ending with `exit` or `error`, then closes.
#[utoipa::path(get, path = "/v1/sandboxes/{name}/exec/ws", tag = "exec",
    params(("name" = String, Path, description = "sandbox name")),
    responses((status = 101, description = "WebSocket upgrade"), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn exec_ws(
    State(st): State<AppState>,
    p: NameParam,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let name = name_of(p)?;
    st.backend.get(&name).await?;
    let ws = ws?;
    Ok(ws
        .max_message_size(EXEC_BODY_LIMIT)
        .on_upgrade(move |socket| exec_ws_session(st, name, socket)))
}

async fn ws_send(ws: &mut WebSocket, ev: &ExecEvent) -> bool {
    let text = serde_json::to_string(ev).unwrap_or_default();
    ws.send(Message::Text(text.into())).await.is_ok()
}

async fn exec_ws_session(st: AppState, name: String, mut ws: WebSocket) {
    let first = match tokio::time::timeout(Duration::from_secs(60), ws.recv()).await {
        Ok(Some(Ok(Message::Text(t)))) => t,
        _ => {
            let _ = ws_send(
                &mut ws,
                &ExecEvent::Error {
                    code: ErrorCode::BadRequest,
                    message: "the first message must be a text frame with the exec request".into(),
                },
            )
            .await;
            return;
        }
    };
    let started = async {
        let mut req: ExecRequest = serde_json::from_str(first.as_str())
            .map_err(|e| ApiError::bad_request(format!("exec request: {e}")))?;
        req.stdin = None;
        let (cmd, _) = command_of(&req)?;
        st.backend.spawn(&name, &cmd.stdin_piped()).await
    };
    let mut child = match started.await {
        Ok(c) => c,
        Err(e) => {
            let _ = ws_send(
                &mut ws,
                &ExecEvent::Error {
                    code: e.detail.code,
                    message: e.detail.message,
                },
            )
            .await;
            return;
        }
    };
    // Stdin is written by its own task, so that a command that does not read
    // its input holds up only further input, never the output going out or
    // the resizes and signals coming in.
    let mut stdin_tx = child.stdin().map(|mut s| {
        let (tx, mut rx) = mpsc::channel::<Bytes>(4);
        tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                if s.write_all(&b).await.is_err() {
                    return;
                }
            }
            // The client sent stdin_eof or left.
            let _ = s.shutdown().await;
        });
        tx
    });
    let (tx, mut rx) = mpsc::channel::<ExecEvent>(16);
    let out = child.stdout();
    let err = child.stderr();
    let pumps = {
        let tx = tx.clone();
        tokio::spawn(async move {
            tokio::join!(pump(out, tx.clone(), false), pump(err, tx, true));
        })
    };
    drop(tx);
    let mut outputs_done = false;
    loop {
        // The next client message is read only once its stdin bytes would
        // have room (back-pressure reaches the client's socket).
        let room = stdin_tx.clone().map(|t| t.reserve_owned());
        tokio::select! {
            ev = rx.recv(), if !outputs_done => match ev {
                Some(ev) => if !ws_send(&mut ws, &ev).await { break },
                None => outputs_done = true,
            },
            (permit, msg) = async {
                let permit = match room { Some(r) => r.await.ok(), None => None };
                (permit, ws.recv().await)
            } => match msg {
                Some(Ok(Message::Binary(b))) => {
                    if let Some(p) = permit { p.send(b); }
                }
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<WsControl>(t.as_str()) {
                    // A failed resize or signal is that control's problem,
                    // never the session's.
                    Ok(WsControl::Resize { rows, cols }) => {
                        if let Err(e) = child.resize(rows, cols).await {
                            tracing::debug!("exec resize: {e}");
                        }
                    }
                    Ok(WsControl::Signal { signal }) => {
                        if let Err(e) = child.signal(signal).await {
                            tracing::debug!("exec signal {signal}: {e}");
                        }
                    }
                    Ok(WsControl::StdinEof) => stdin_tx = None,
                    Err(e) => {
                        let _ = ws_send(&mut ws, &ExecEvent::Error { code: ErrorCode::BadRequest, message: format!("control message: {e}") }).await;
                    }
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            st = child.wait(), if outputs_done => {
                let ev = match st {
                    Ok(s) => ExecEvent::Exit { code: s.code, signal: s.signal, timed_out: s.timed_out },
                    Err(e) => ExecEvent::Error { code: ErrorCode::GuestError, message: e.to_string() },
                };
                let _ = ws_send(&mut ws, &ev).await;
                let _ = ws.send(Message::Close(None)).await;
                break;
            }
        }
    }
    pumps.abort();
}

fn file_args(q: Result<Query<FileQuery>, QueryRejection>) -> ApiResult<(String, u32, Option<i64>)> {
    let Query(q) = q?;
    validate_guest_path("path", &q.path)?;
    let mode = match &q.mode {
        Some(m) => parse_mode(m)?,
        None => 0o644,
    };
    if let Some(t) = q.mtime {
        if !(0..=253_402_300_799).contains(&t) {
            return Err(ApiError::bad_request(format!("mtime {t} is out of range"))
                .fix("give seconds since the epoch, 0 to 253402300799 (year 9999)"));
        }
    }
    Ok((q.path, mode, q.mtime))
}

fn fs_err(what: &str, path: &str) -> impl FnOnce(capsa::Error) -> ApiError {
    let ctx = format!("{what} {path}");
    move |e| ApiError::from_capsa(&ctx, &e)
}

/// Metadata of a guest path (a final symlink is not followed).
#[utoipa::path(get, path = "/v1/sandboxes/{name}/files/stat", tag = "files",
    params(("name" = String, Path, description = "sandbox name"), FileQuery),
    responses((status = 200, body = FileStat), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn stat_file(
    State(st): State<AppState>,
    p: NameParam,
    q: Result<Query<FileQuery>, QueryRejection>,
) -> ApiResult<Json<FileStat>> {
    use capsa::copy::GuestFs;
    let name = name_of(p)?;
    let (path, _, _) = file_args(q)?;
    let fs = st.backend.files(&name).await?;
    let m = fs.stat(&path).await.map_err(fs_err("stat", &path))?;
    Ok(Json(FileStat::of(&m)))
}

/// One page of a guest directory's entries, sorted by name.
#[utoipa::path(get, path = "/v1/sandboxes/{name}/files/list", tag = "files",
    params(("name" = String, Path, description = "sandbox name"), ListQuery),
    responses((status = 200, body = DirPage), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn list_files(
    State(st): State<AppState>,
    p: NameParam,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<DirPage>> {
    use capsa::copy::GuestFs;
    let name = name_of(p)?;
    let Query(q) = q?;
    validate_guest_path("path", &q.path)?;
    if let Some(a) = &q.after {
        if a.is_empty() || a.len() > 255 || a.contains(['/', '\0']) {
            return Err(ApiError::bad_request("after is not a file name")
                .fix("pass the last entry name of the previous page"));
        }
    }
    let fs = st.backend.files(&name).await?;
    let (entries, more) = fs
        .list_page(&q.path, q.after.as_deref())
        .await
        .map_err(fs_err("listing", &q.path))?;
    Ok(Json(DirPage {
        entries: entries
            .iter()
            .map(|e| DirEntryInfo {
                name: e.name.clone(),
                stat: FileStat::of(&e.meta),
            })
            .collect(),
        more,
    }))
}

/// Creates a guest directory and its parents (`mode` for the last, default 0755).
#[utoipa::path(post, path = "/v1/sandboxes/{name}/files/mkdir", tag = "files",
    params(("name" = String, Path, description = "sandbox name"), FileQuery),
    responses((status = 204), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn mkdir_file(
    State(st): State<AppState>,
    p: NameParam,
    q: Result<Query<FileQuery>, QueryRejection>,
) -> ApiResult<StatusCode> {
    use capsa::copy::GuestFs;
    let name = name_of(p)?;
    let Query(q) = q?;
    validate_guest_path("path", &q.path)?;
    let mode = match &q.mode {
        Some(m) => parse_mode(m)?,
        None => 0o755,
    };
    let fs = st.backend.files(&name).await?;
    fs.mkdir(&q.path, mode)
        .await
        .map_err(fs_err("creating", &q.path))?;
    Ok(StatusCode::NO_CONTENT)
}

/// Uploads the request body (streamed, any size) to a guest file; parents are created.
#[utoipa::path(put, path = "/v1/sandboxes/{name}/files", tag = "files",
    params(("name" = String, Path, description = "sandbox name"), FileQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = FileInfo), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn put_file(
    State(st): State<AppState>,
    p: NameParam,
    q: Result<Query<FileQuery>, QueryRejection>,
    body: Body,
) -> ApiResult<Json<FileInfo>> {
    use capsa::copy::GuestFs;
    let name = name_of(p)?;
    let (path, mode, mtime) = file_args(q)?;
    let mut reader =
        tokio_util::io::StreamReader::new(body.into_data_stream().map_err(io::Error::other));
    let fs = st.backend.files(&name).await?;
    let mtime = mtime.map(|s| std::time::UNIX_EPOCH + Duration::from_secs(s as u64));
    fs.write_file(&path, &mut reader, mode, mtime)
        .await
        .map_err(fs_err("writing", &path))?;
    let meta = fs.stat(&path).await.map_err(fs_err("stat", &path))?;
    Ok(Json(FileInfo {
        path,
        size: meta.size,
        mode: meta.mode,
    }))
}

/// Downloads a guest file (streamed, `application/octet-stream`).
#[utoipa::path(get, path = "/v1/sandboxes/{name}/files", tag = "files",
    params(("name" = String, Path, description = "sandbox name"), FileQuery),
    responses((status = 200, description = "the file's bytes", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn get_file(
    State(st): State<AppState>,
    p: NameParam,
    q: Result<Query<FileQuery>, QueryRejection>,
) -> ApiResult<Response> {
    use capsa::copy::GuestFs;
    let name = name_of(p)?;
    let (path, _, _) = file_args(q)?;
    let fs = st.backend.files(&name).await?;
    let (mut w, r) = tokio::io::duplex(CHUNK);
    let (res_tx, mut res_rx) = oneshot::channel();
    tokio::spawn(async move {
        let r = fs
            .read_file(&path, &mut w)
            .await
            .map_err(fs_err("reading", &path));
        let _ = res_tx.send(r);
    });
    let mut reader = tokio::io::BufReader::with_capacity(CHUNK, r);
    // Wait for the first bytes or the end, so a missing file is a 404 rather
    // than an empty 200.
    let first = {
        use tokio::io::AsyncBufReadExt;
        tokio::select! {
            biased;
            res = &mut res_rx => Some(res),
            // Data, or EOF (then the result decides).
            r = reader.fill_buf() => match r {
                Ok(b) if !b.is_empty() => None,
                _ => Some((&mut res_rx).await),
            },
        }
    };
    let pending = match first {
        None => Some(res_rx),
        Some(Ok(Ok(_))) => None,
        Some(Ok(Err(e))) => return Err(e),
        Some(Err(_)) => return Err(ApiError::internal("the file reader ended without a result")),
    };
    let stream =
        futures::stream::unfold((reader, pending), |(mut reader, mut pending)| async move {
            let mut buf = vec![0u8; CHUNK];
            match reader.read(&mut buf).await {
                Ok(0) => match pending.take()?.await {
                    Ok(Ok(_)) => None,
                    Ok(Err(e)) => Some((Err(io::Error::other(e.to_string())), (reader, None))),
                    Err(_) => Some((Err(io::Error::other("reader ended")), (reader, None))),
                },
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(Bytes::from(buf)), (reader, pending)))
                }
                Err(e) => Some((Err(e), (reader, None))),
            }
        });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// The console log (`text/plain`); with `follow=true` the response stays open
/// and streams new output until the sandbox is deleted or the client leaves.
#[utoipa::path(get, path = "/v1/sandboxes/{name}/console", tag = "console",
    params(("name" = String, Path, description = "sandbox name"), ConsoleQuery),
    responses((status = 200, description = "console output", content_type = "text/plain", body = String),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn console(
    State(st): State<AppState>,
    p: NameParam,
    q: Result<Query<ConsoleQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let name = name_of(p)?;
    let Query(q) = q?;
    let paths = st.backend.console(&name).await?;
    let file = tokio::fs::File::open(&paths.log).await.map_err(|e| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            format!("console log of {name:?}: {e}"),
        )
    })?;
    let follow = q.follow.unwrap_or(false);
    let log = paths.log.clone();
    let stream = futures::stream::unfold(file, move |mut file| {
        let log = log.clone();
        async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match file.read(&mut buf).await {
                    Ok(0) if !follow => return None,
                    Ok(0) => {
                        if tokio::fs::metadata(&log).await.is_err() {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        return Some((Ok::<_, io::Error>(Bytes::from(buf)), file));
                    }
                    Err(e) => return Some((Err(e), file)),
                }
            }
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// The live console over a WebSocket: binary frames from the server are
/// console output (history first), frames from the client are typed into the guest.
#[utoipa::path(get, path = "/v1/sandboxes/{name}/console/ws", tag = "console",
    params(("name" = String, Path, description = "sandbox name")),
    responses((status = 101, description = "WebSocket upgrade"), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn console_ws(
    State(st): State<AppState>,
    p: NameParam,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let name = name_of(p)?;
    let paths = st.backend.console(&name).await?;
    let ws = ws?;
    let sock = tokio::net::UnixStream::connect(&paths.socket)
        .await
        .map_err(|e| {
            ApiError::unavailable(format!("console socket of {name:?}: {e}"))
                .fix("is the sandbox running? start it with POST /v1/sandboxes/{name}/start")
        })?;
    Ok(ws.on_upgrade(move |socket| console_bridge(socket, sock)))
}

async fn console_bridge(ws: WebSocket, sock: tokio::net::UnixStream) {
    let (mut wtx, mut wrx) = ws.split();
    let (mut r, mut w) = sock.into_split();
    let to_ws = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if wtx
                        .send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        let _ = wtx.send(Message::Close(None)).await;
    };
    let from_ws = async {
        while let Some(Ok(msg)) = wrx.next().await {
            let ok = match msg {
                Message::Binary(b) => w.write_all(&b).await.is_ok(),
                Message::Text(t) => w.write_all(t.as_bytes()).await.is_ok(),
                Message::Close(_) => false,
                _ => true,
            };
            if !ok {
                break;
            }
        }
    };
    tokio::select! {
        _ = to_ws => {}
        _ = from_ws => {}
    }
}

/// Server-sent events: first the current state of every sandbox, then state
/// changes (polled every 500 ms) and the actions the daemon performs. Each
/// `data:` is an [`Event`] as JSON.
#[utoipa::path(get, path = "/v1/events", tag = "daemon",
    responses((status = 200, description = "text/event-stream of Event", content_type = "text/event-stream", body = Event),
        (status = 401, body = ErrorBody)))]
async fn events(State(st): State<AppState>) -> ApiResult<Response> {
    let rx = st.events.subscribe();
    let initial: Vec<Event> = st
        .backend
        .list()
        .await?
        .into_iter()
        .map(|s| Event::State {
            name: s.name,
            state: s.state,
        })
        .collect();
    let live = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(ev) => return Some((ev, rx)),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!("an events client lagged; {n} events dropped");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let stream = futures::stream::iter(initial).chain(live).map(|ev| {
        Ok::<_, Infallible>(
            axum::response::sse::Event::default()
                .data(serde_json::to_string(&ev).unwrap_or_default()),
        )
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn validate_snapshot_name(name: &str) -> ApiResult<()> {
    validate_name(name).map_err(|mut e| {
        e.detail.message = e.detail.message.replace("sandbox name", "snapshot name");
        e
    })
}

type SnapParam = Result<Path<String>, PathRejection>;

/// Snapshots a running sandbox (memory, devices, disks) into the daemon's
/// snapshot store; the sandbox keeps running.
#[utoipa::path(post, path = "/v1/sandboxes/{name}/snapshot", tag = "snapshots",
    params(("name" = String, Path, description = "sandbox name")),
    request_body = CreateSnapshotRequest,
    responses((status = 201, body = SnapshotInfo), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn snapshot_sandbox(
    State(st): State<AppState>,
    p: NameParam,
    body: Result<Json<CreateSnapshotRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<SnapshotInfo>)> {
    let name = name_of(p)?;
    let Json(req) = body?;
    validate_snapshot_name(&req.snapshot)?;
    let _g = st.locks.try_lock(&name)?;
    let r = st.backend.snapshot_create(&name, &req.snapshot).await;
    st.emit(Event::Action {
        name,
        action: "snapshot".into(),
        ok: r.is_ok(),
    });
    Ok((StatusCode::CREATED, Json(r?)))
}

/// Every named snapshot in the daemon's store.
#[utoipa::path(get, path = "/v1/snapshots", tag = "snapshots",
    responses((status = 200, body = Vec<SnapshotInfo>), (status = 401, body = ErrorBody)))]
async fn list_snapshots(State(st): State<AppState>) -> ApiResult<Json<Vec<SnapshotInfo>>> {
    Ok(Json(st.backend.snapshot_list().await?))
}

/// Deletes a named snapshot (409 while a pool restores from it).
#[utoipa::path(delete, path = "/v1/snapshots/{name}", tag = "snapshots",
    params(("name" = String, Path, description = "snapshot name")),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn delete_snapshot(State(st): State<AppState>, p: SnapParam) -> ApiResult<StatusCode> {
    let Path(name) = p?;
    validate_snapshot_name(&name)?;
    let _g = st.locks.try_lock(&format!("snapshot/{name}"))?;
    st.backend.snapshot_remove(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Every warm pool with its counters.
#[utoipa::path(get, path = "/v1/pools", tag = "pools",
    responses((status = 200, body = Vec<PoolInfo>), (status = 401, body = ErrorBody)))]
async fn list_pools(State(st): State<AppState>) -> ApiResult<Json<Vec<PoolInfo>>> {
    Ok(Json(st.backend.pool_list().await?))
}

/// Creates a warm pool; it fills in the background (first its base snapshot,
/// then one restore at a time). Saved: it survives a daemon restart.
#[utoipa::path(post, path = "/v1/pools", tag = "pools",
    request_body = CreatePoolRequest,
    responses((status = 201, body = PoolInfo), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_pool(
    State(st): State<AppState>,
    body: Result<Json<CreatePoolRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<PoolInfo>)> {
    let Json(req) = body?;
    Ok((
        StatusCode::CREATED,
        Json(st.backend.pool_create(&req).await?),
    ))
}

type PoolParam = Result<Path<String>, PathRejection>;

fn pool_of(p: PoolParam) -> ApiResult<String> {
    let Path(name) = p?;
    validate_name(&name).map_err(|mut e| {
        e.detail.message = e.detail.message.replace("sandbox name", "pool name");
        e
    })?;
    Ok(name)
}

/// One pool.
#[utoipa::path(get, path = "/v1/pools/{name}", tag = "pools",
    params(("name" = String, Path, description = "pool name")),
    responses((status = 200, body = PoolInfo), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn get_pool(State(st): State<AppState>, p: PoolParam) -> ApiResult<Json<PoolInfo>> {
    let name = pool_of(p)?;
    Ok(Json(st.backend.pool_get(&name).await?))
}

/// Deletes a pool and destroys its idle members; members already handed
/// out stay (delete them as sandboxes).
#[utoipa::path(delete, path = "/v1/pools/{name}", tag = "pools",
    params(("name" = String, Path, description = "pool name")),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn delete_pool(State(st): State<AppState>, p: PoolParam) -> ApiResult<StatusCode> {
    let name = pool_of(p)?;
    st.backend.pool_remove(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Hands out a ready member of the pool: a running sandbox, at once (the
/// pool refills in the background). It is the caller's from now on; release
/// it with `DELETE /v1/sandboxes/{name}?force=true` (destroyed, never
/// reused). With `name`, a fresh member is restored under that name instead
/// (a restore's time). Waits up to 60 s when the pool is empty (then 503).
#[utoipa::path(post, path = "/v1/pools/{name}/acquire", tag = "pools",
    params(("name" = String, Path, description = "pool name")),
    request_body = AcquireRequest,
    responses((status = 200, body = SandboxInfo), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn acquire(
    State(st): State<AppState>,
    p: PoolParam,
    body: Bytes,
) -> ApiResult<Json<SandboxInfo>> {
    let pool = pool_of(p)?;
    // The body is optional: an empty one is `{}`.
    let req: AcquireRequest = if body.iter().all(u8::is_ascii_whitespace) {
        AcquireRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!("acquire request: {e}"))
                .fix("send {} or {\"name\": \"my-box\"} (or no body)")
        })?
    };
    let _g = match &req.name {
        Some(n) => {
            validate_name(n)?;
            Some(st.locks.try_lock(n)?)
        }
        None => None,
    };
    let info = st.backend.pool_acquire(&pool, &req).await?;
    st.emit(Event::Acquired {
        pool,
        name: info.name.clone(),
    });
    Ok(Json(info))
}
