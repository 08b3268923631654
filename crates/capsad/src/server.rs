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
use futures::{StreamExt, TryStreamExt};
use tokio::io::AsyncReadExt;
use tokio::sync::{broadcast, oneshot};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::*;
use crate::auth::{require_token, Token};
use capsa_api::{ApiError, ApiResult, ErrorBody, ErrorCode, ExecChunk, ExecControl, Service};

/// Body limit of the small JSON endpoints.
pub const JSON_BODY_LIMIT: usize = 64 * 1024;
/// Body limit of exec requests (they may carry stdin, base64).
pub const EXEC_BODY_LIMIT: usize = 8 * 1024 * 1024;
/// How often the state root is polled for `/v1/events`.
pub const EVENT_POLL: Duration = Duration::from_millis(500);
/// Size of each streamed chunk (downloads).
const CHUNK: usize = 64 * 1024;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    service: Arc<dyn Service>,
    events: broadcast::Sender<Event>,
}

impl AppState {
    /// State around `service` (the local one, with the daemon's host-path
    /// policy and pools).
    pub fn new(service: Arc<dyn Service>) -> Self {
        let (events, _) = broadcast::channel(1024);
        Self { service, events }
    }

    fn emit(&self, ev: Event) {
        // No subscribers is not an error.
        let _ = self.events.send(ev);
    }

    /// Emits the network decisions made since the last poll by each running
    /// sandbox with a network (a sandbox first seen only sets the mark: its
    /// backlog is in its log). Bounded by the log's own size.
    async fn emit_network_decisions(
        &self,
        list: &[SandboxInfo],
        seen: &mut HashMap<String, (u64, usize)>,
    ) {
        for s in list {
            let networked = s.state == SandboxState::Running
                && s.spec
                    .as_ref()
                    .is_some_and(|v| v.get("network").is_some_and(|n| !n.is_null()));
            if !networked {
                continue;
            }
            let Ok(log) = self.service.network_log(&s.name).await else {
                continue;
            };
            let newest = log.decisions.iter().map(|d| d.at_ms).max().unwrap_or(0);
            let at_newest = log.decisions.iter().filter(|d| d.at_ms == newest).count();
            let Some(&(mark, at_mark)) = seen.get(&s.name) else {
                seen.insert(s.name.clone(), (newest, at_newest));
                continue;
            };
            // Of the decisions at the mark's millisecond, the first `at_mark`
            // were emitted already.
            let mut at_mark_seen = 0;
            for d in log.decisions {
                let fresh = match d.at_ms.cmp(&mark) {
                    std::cmp::Ordering::Greater => true,
                    std::cmp::Ordering::Equal => {
                        at_mark_seen += 1;
                        at_mark_seen > at_mark
                    }
                    std::cmp::Ordering::Less => false,
                };
                if fresh {
                    self.emit(Event::Network {
                        name: s.name.clone(),
                        decision: d,
                    });
                }
            }
            seen.insert(s.name.clone(), (newest.max(mark), at_newest));
        }
    }

    /// Polls the service every [`EVENT_POLL`] and emits state diffs, until the
    /// runtime shuts down.
    pub fn spawn_event_poller(&self) -> tokio::task::JoinHandle<()> {
        let st = self.clone();
        tokio::spawn(async move {
            let mut prev: HashMap<String, SandboxState> = HashMap::new();
            // Per sandbox: the newest decision time emitted, and how many at it.
            let mut seen: HashMap<String, (u64, usize)> = HashMap::new();
            let mut tick = tokio::time::interval(EVENT_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let list = match st.service.list().await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::debug!("event poll: {e}");
                        continue;
                    }
                };
                if st.events.receiver_count() > 0 {
                    st.emit_network_decisions(&list, &mut seen).await;
                }
                seen.retain(|name, _| list.iter().any(|s| &s.name == name));
                let now = list
                    .into_iter()
                    .map(|s| (s.name, s.state))
                    .collect::<HashMap<_, _>>();
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
        .routes(routes!(list_shares, add_share, remove_share))
        .routes(routes!(list_ports, add_port, remove_port))
        .routes(routes!(list_snapshots))
        .routes(routes!(delete_snapshot))
        .routes(routes!(list_pools, create_pool))
        .routes(routes!(get_pool, delete_pool))
        .routes(routes!(acquire))
        .routes(routes!(get_network, set_network))
        .routes(routes!(network_log))
        .routes(routes!(screen_info))
        .routes(routes!(screenshot))
        .routes(routes!(screen_actions))
        .routes(routes!(screen_vnc))
        .routes(routes!(screen_view))
        .routes(routes!(list_images))
        .routes(routes!(pull_image))
        .routes(routes!(get_image, delete_image))
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
        .route("/v1/viewer/{*path}", axum::routing::get(viewer_asset))
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
    Ok(Json(st.service.health().await?))
}

/// Every sandbox, including stopped and dead ones.
#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes",
    responses((status = 200, body = Vec<SandboxInfo>), (status = 401, body = ErrorBody)))]
async fn list_sandboxes(State(st): State<AppState>) -> ApiResult<Json<Vec<SandboxInfo>>> {
    Ok(Json(st.service.list().await?))
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
    let Json(req) = body?;
    let asked = req.name.clone();
    let r = st.service.create(req).await;
    if let Some(name) = r.as_ref().ok().map(|i| i.name.clone()).or(asked) {
        st.emit(Event::Action {
            name,
            action: "create".into(),
            ok: r.is_ok(),
        });
    }
    Ok((StatusCode::CREATED, Json(r?)))
}

/// One sandbox.
#[utoipa::path(get, path = "/v1/sandboxes/{name}", tag = "sandboxes",
    params(("name" = String, Path, description = "sandbox name")),
    responses((status = 200, body = SandboxInfo), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn get_sandbox(State(st): State<AppState>, p: NameParam) -> ApiResult<Json<SandboxInfo>> {
    let name = name_of(p)?;
    Ok(Json(st.service.get(&name).await?))
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
    let r = st.service.remove(&name, q.force.unwrap_or(false)).await;
    st.emit(Event::Action {
        name,
        action: "delete".into(),
        ok: r.is_ok(),
    });
    r?;
    Ok(StatusCode::NO_CONTENT)
}

async fn lifecycle(
    st: &AppState,
    p: NameParam,
    action: &str,
    grace: Option<Duration>,
) -> ApiResult<Json<SandboxInfo>> {
    let name = name_of(p)?;
    let r = match action {
        "start" => st.service.start(&name).await,
        "stop" => st.service.stop(&name, grace).await,
        _ => st.service.kill(&name).await,
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
    lifecycle(&st, p, "start", None).await
}

/// Shuts a sandbox down gracefully (killed after a grace period).
#[utoipa::path(post, path = "/v1/sandboxes/{name}/stop", tag = "sandboxes",
    params(("name" = String, Path, description = "sandbox name"), StopQuery),
    responses((status = 200, body = SandboxInfo), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn stop_sandbox(
    State(st): State<AppState>,
    p: NameParam,
    q: Result<Query<StopQuery>, QueryRejection>,
) -> ApiResult<Json<SandboxInfo>> {
    let Query(q) = q?;
    let grace = match q.grace_secs {
        Some(g) if !(g.is_finite() && (0.0..=3600.0).contains(&g)) => {
            return Err(
                ApiError::bad_request(format!("grace_secs {g} is out of range"))
                    .fix("give 0 to 3600 seconds, or leave it out"),
            )
        }
        Some(g) => Some(Duration::from_secs_f64(g)),
        None => None,
    };
    lifecycle(&st, p, "stop", grace).await
}

/// Kills a sandbox's VM at once.
#[utoipa::path(post, path = "/v1/sandboxes/{name}/kill", tag = "sandboxes",
    params(("name" = String, Path, description = "sandbox name")),
    responses((status = 200, body = SandboxInfo), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn kill_sandbox(State(st): State<AppState>, p: NameParam) -> ApiResult<Json<SandboxInfo>> {
    lifecycle(&st, p, "kill", None).await
}

fn ndjson(ev: &ExecEvent) -> Bytes {
    let mut v = serde_json::to_vec(ev).unwrap_or_else(|_| b"{\"type\":\"error\"}".to_vec());
    v.push(b'\n');
    Bytes::from(v)
}

/// The wire form of one item of an exec session.
fn event_of(c: ExecChunk) -> ExecEvent {
    let b64 = |d: &[u8]| base64::engine::general_purpose::STANDARD.encode(d);
    match c {
        ExecChunk::Stdout(d) => ExecEvent::Stdout { data: b64(&d) },
        ExecChunk::Stderr(d) => ExecEvent::Stderr { data: b64(&d) },
        ExecChunk::Exit(s) => ExecEvent::Exit {
            code: s.code,
            signal: s.signal,
            timed_out: s.timed_out,
        },
        ExecChunk::Error(e) => ExecEvent::Error {
            code: e.detail.code,
            message: e.detail.message,
        },
    }
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
    let Json(mut req) = body?;
    req.interactive = false;
    let session = st.service.exec(&name, req).await?;
    // The session lives in the stream: a client that leaves drops it, which
    // ends the command.
    let stream = futures::stream::unfold(session, |mut s| async move {
        s.output
            .recv()
            .await
            .map(|c| (Ok::<_, Infallible>(ndjson(&event_of(c))), s))
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
    st.service.get(&name).await?;
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
        req.interactive = true;
        st.service.exec(&name, req).await
    };
    let mut session = match started.await {
        Ok(s) => s,
        Err(e) => {
            let _ = ws_send(&mut ws, &event_of(ExecChunk::Error(e))).await;
            return;
        }
    };
    let Some(control) = session.control.take() else {
        return;
    };
    loop {
        // The next client message is read only once its input would have
        // room (back-pressure reaches the client's socket).
        tokio::select! {
            c = session.output.recv() => match c {
                Some(c) => {
                    let end = matches!(c, ExecChunk::Exit(_) | ExecChunk::Error(_));
                    if !ws_send(&mut ws, &event_of(c)).await {
                        break;
                    }
                    if end {
                        let _ = ws.send(Message::Close(None)).await;
                        break;
                    }
                }
                None => break,
            },
            (permit, msg) = async {
                let permit = control.reserve().await.ok();
                (permit, ws.recv().await)
            } => {
                let ctl = match msg {
                    Some(Ok(Message::Binary(b))) => Some(ExecControl::Stdin(b)),
                    Some(Ok(Message::Text(t))) => match serde_json::from_str::<WsControl>(t.as_str()) {
                        Ok(WsControl::Resize { rows, cols }) => Some(ExecControl::Resize { rows, cols }),
                        Ok(WsControl::Signal { signal }) => Some(ExecControl::Signal(signal)),
                        Ok(WsControl::StdinEof) => Some(ExecControl::StdinEof),
                        Err(e) => {
                            let ev = ExecEvent::Error {
                                code: ErrorCode::BadRequest,
                                message: format!("control message: {e}"),
                            };
                            let _ = ws_send(&mut ws, &ev).await;
                            None
                        }
                    },
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => None,
                };
                if let (Some(p), Some(c)) = (permit, ctl) {
                    p.send(c);
                }
            },
        }
    }
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
    let name = name_of(p)?;
    let (path, _, _) = file_args(q)?;
    let fs = st.service.files(&name).await?;
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
    let name = name_of(p)?;
    let Query(q) = q?;
    validate_guest_path("path", &q.path)?;
    if let Some(a) = &q.after {
        if a.is_empty() || a.len() > 255 || a.contains(['/', '\0']) {
            return Err(ApiError::bad_request("after is not a file name")
                .fix("pass the last entry name of the previous page"));
        }
    }
    let fs = st.service.files(&name).await?;
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
    let name = name_of(p)?;
    let Query(q) = q?;
    validate_guest_path("path", &q.path)?;
    let mode = match &q.mode {
        Some(m) => parse_mode(m)?,
        None => 0o755,
    };
    let fs = st.service.files(&name).await?;
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
    let name = name_of(p)?;
    let (path, mode, mtime) = file_args(q)?;
    let mut reader =
        tokio_util::io::StreamReader::new(body.into_data_stream().map_err(io::Error::other));
    let fs = st.service.files(&name).await?;
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
    let name = name_of(p)?;
    let (path, _, _) = file_args(q)?;
    let fs = st.service.files(&name).await?;
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
    let stream = st
        .service
        .console_log(&name, q.follow.unwrap_or(false))
        .await?
        .map(|r| r.map_err(|e| io::Error::other(e.to_string())));
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
    let ws = ws?;
    let console = st.service.console_attach(&name).await?;
    Ok(ws.on_upgrade(move |socket| console_bridge(socket, console)))
}

async fn console_bridge(ws: WebSocket, console: capsa_api::ConsoleSession) {
    capsa_api::viewer::web::bridge(ws, console).await
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
        .service
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
    let r = st.service.snapshot_create(&name, &req.snapshot).await;
    st.emit(Event::Action {
        name,
        action: "snapshot".into(),
        ok: r.is_ok(),
    });
    Ok((StatusCode::CREATED, Json(r?)))
}

/// The shared directories attached to a running sandbox.
#[utoipa::path(get, path = "/v1/sandboxes/{name}/shares", tag = "shares",
    params(("name" = String, Path, description = "sandbox name")),
    responses((status = 200, body = Vec<ShareRequest>), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn list_shares(
    State(st): State<AppState>,
    p: NameParam,
) -> ApiResult<Json<Vec<ShareRequest>>> {
    let name = name_of(p)?;
    Ok(Json(st.service.share_list(&name).await?))
}

/// Attaches a host directory (below the allow-list) to a running sandbox and
/// mounts it (virtio-fs hot-plug; works on restored and pool sandboxes).
/// Answers the sandbox's shares.
#[utoipa::path(post, path = "/v1/sandboxes/{name}/shares", tag = "shares",
    params(("name" = String, Path, description = "sandbox name")),
    request_body = ShareRequest,
    responses((status = 201, body = Vec<ShareRequest>), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn add_share(
    State(st): State<AppState>,
    p: NameParam,
    body: Result<Json<ShareRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Vec<ShareRequest>>)> {
    let name = name_of(p)?;
    let Json(req) = body?;
    let r = st.service.share_add(&name, req).await;
    st.emit(Event::Action {
        name,
        action: "share_add".into(),
        ok: r.is_ok(),
    });
    Ok((StatusCode::CREATED, Json(r?)))
}

/// Unmounts and detaches the share at `guest`.
#[utoipa::path(delete, path = "/v1/sandboxes/{name}/shares", tag = "shares",
    params(("name" = String, Path, description = "sandbox name"), ShareQuery),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn remove_share(
    State(st): State<AppState>,
    p: NameParam,
    q: Result<Query<ShareQuery>, QueryRejection>,
) -> ApiResult<StatusCode> {
    let name = name_of(p)?;
    let Query(q) = q?;
    let r = st.service.share_remove(&name, &q.guest).await;
    st.emit(Event::Action {
        name,
        action: "share_rm".into(),
        ok: r.is_ok(),
    });
    r?;
    Ok(StatusCode::NO_CONTENT)
}

/// The host ports forwarded into a running sandbox.
#[utoipa::path(get, path = "/v1/sandboxes/{name}/ports", tag = "network",
    params(("name" = String, Path, description = "sandbox name")),
    responses((status = 200, body = Vec<PortForwardBody>), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn list_ports(
    State(st): State<AppState>,
    p: NameParam,
) -> ApiResult<Json<Vec<PortForwardBody>>> {
    let name = name_of(p)?;
    Ok(Json(st.service.port_list(&name).await?))
}

/// Forwards a host port (on 127.0.0.1 unless `host_ip` says otherwise) into a
/// running sandbox from now on; works on restored and pooled sandboxes.
/// Answers the sandbox's forwards.
#[utoipa::path(post, path = "/v1/sandboxes/{name}/ports", tag = "network",
    params(("name" = String, Path, description = "sandbox name")),
    request_body = PortForwardBody,
    responses((status = 201, body = Vec<PortForwardBody>), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn add_port(
    State(st): State<AppState>,
    p: NameParam,
    body: Result<Json<PortForwardBody>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Vec<PortForwardBody>>)> {
    let name = name_of(p)?;
    let Json(req) = body?;
    let r = st.service.port_add(&name, req).await;
    st.emit(Event::Action {
        name,
        action: "port_add".into(),
        ok: r.is_ok(),
    });
    Ok((StatusCode::CREATED, Json(r?)))
}

/// Stops forwarding a host port into a sandbox.
#[utoipa::path(delete, path = "/v1/sandboxes/{name}/ports", tag = "network",
    params(("name" = String, Path, description = "sandbox name"), PortQuery),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn remove_port(
    State(st): State<AppState>,
    p: NameParam,
    q: Result<Query<PortQuery>, QueryRejection>,
) -> ApiResult<StatusCode> {
    let name = name_of(p)?;
    let Query(q) = q?;
    let r = st.service.port_remove(&name, q).await;
    st.emit(Event::Action {
        name,
        action: "port_rm".into(),
        ok: r.is_ok(),
    });
    r?;
    Ok(StatusCode::NO_CONTENT)
}

/// Every named snapshot in the daemon's store.
#[utoipa::path(get, path = "/v1/snapshots", tag = "snapshots",
    responses((status = 200, body = Vec<SnapshotInfo>), (status = 401, body = ErrorBody)))]
async fn list_snapshots(State(st): State<AppState>) -> ApiResult<Json<Vec<SnapshotInfo>>> {
    Ok(Json(st.service.snapshot_list().await?))
}

/// Deletes a named snapshot (409 while a pool restores from it).
#[utoipa::path(delete, path = "/v1/snapshots/{name}", tag = "snapshots",
    params(("name" = String, Path, description = "snapshot name")),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn delete_snapshot(State(st): State<AppState>, p: SnapParam) -> ApiResult<StatusCode> {
    let Path(name) = p?;
    st.service.snapshot_remove(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Every warm pool with its counters.
#[utoipa::path(get, path = "/v1/pools", tag = "pools",
    responses((status = 200, body = Vec<PoolInfo>), (status = 401, body = ErrorBody)))]
async fn list_pools(State(st): State<AppState>) -> ApiResult<Json<Vec<PoolInfo>>> {
    Ok(Json(st.service.pool_list().await?))
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
        Json(st.service.pool_create(req).await?),
    ))
}

type PoolParam = Result<Path<String>, PathRejection>;

fn pool_of(p: PoolParam) -> ApiResult<String> {
    let Path(name) = p?;
    Ok(name)
}

/// One pool.
#[utoipa::path(get, path = "/v1/pools/{name}", tag = "pools",
    params(("name" = String, Path, description = "pool name")),
    responses((status = 200, body = PoolInfo), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn get_pool(State(st): State<AppState>, p: PoolParam) -> ApiResult<Json<PoolInfo>> {
    let name = pool_of(p)?;
    Ok(Json(st.service.pool_get(&name).await?))
}

/// Deletes a pool and destroys its idle members; members already handed
/// out stay (delete them as sandboxes).
#[utoipa::path(delete, path = "/v1/pools/{name}", tag = "pools",
    params(("name" = String, Path, description = "pool name")),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn delete_pool(State(st): State<AppState>, p: PoolParam) -> ApiResult<StatusCode> {
    let name = pool_of(p)?;
    st.service.pool_remove(&name).await?;
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
    let info = st.service.pool_acquire(&pool, req).await?;
    st.emit(Event::Acquired {
        pool,
        name: info.name.clone(),
    });
    Ok(Json(info))
}

/// Every image in the daemon's image store.
#[utoipa::path(get, path = "/v1/images", tag = "images",
    responses((status = 200, body = Vec<ImageInfo>), (status = 401, body = ErrorBody)))]
async fn list_images(State(st): State<AppState>) -> ApiResult<Json<Vec<ImageInfo>>> {
    Ok(Json(st.service.image_list().await?))
}

/// One image, by name (`repo:tag`), digest, or unique digest prefix.
#[utoipa::path(get, path = "/v1/images/one", tag = "images",
    params(ImageQuery),
    responses((status = 200, body = ImageInfo), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn get_image(
    State(st): State<AppState>,
    q: Result<Query<ImageQuery>, QueryRejection>,
) -> ApiResult<Json<ImageInfo>> {
    let Query(q) = q?;
    Ok(Json(st.service.image_get(&q.image).await?))
}

/// Removes an image from the store (its blobs stay until a prune); answers
/// the removed image.
#[utoipa::path(delete, path = "/v1/images/one", tag = "images",
    params(ImageQuery),
    responses((status = 200, body = ImageInfo), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn delete_image(
    State(st): State<AppState>,
    q: Result<Query<ImageQuery>, QueryRejection>,
) -> ApiResult<Json<ImageInfo>> {
    let Query(q) = q?;
    Ok(Json(st.service.image_remove(&q.image).await?))
}

/// Pulls an image from an OCI registry into the daemon's store and converts
/// it to a root filesystem. The response is NDJSON (`application/x-ndjson`),
/// one [`PullEvent`] per line as the pull goes, ending with `done` (the
/// image) or `error`.
#[utoipa::path(post, path = "/v1/images/pull", tag = "images",
    request_body = PullRequest,
    responses((status = 200, description = "NDJSON stream of PullEvent", content_type = "application/x-ndjson", body = PullEvent),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn pull_image(
    State(st): State<AppState>,
    body: Result<Json<PullRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(req) = body?;
    let rx = st.service.image_pull(req).await?;
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|ev| {
            let mut v =
                serde_json::to_vec(&ev).unwrap_or_else(|_| b"{\"type\":\"error\"}".to_vec());
            v.push(b'\n');
            (Ok::<_, Infallible>(Bytes::from(v)), rx)
        })
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// The network policy in force on a running sandbox.
#[utoipa::path(get, path = "/v1/sandboxes/{name}/network", tag = "network",
    params(("name" = String, Path, description = "sandbox name")),
    responses((status = 200, body = NetworkPolicyBody), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn get_network(
    State(st): State<AppState>,
    p: NameParam,
) -> ApiResult<Json<NetworkPolicyBody>> {
    let name = name_of(p)?;
    Ok(Json(st.service.network_policy(&name).await?))
}

/// Replaces a running sandbox's network policy; new connections follow it at
/// once (so a pooled sandbox is acquired, then given its policy).
#[utoipa::path(put, path = "/v1/sandboxes/{name}/network", tag = "network",
    params(("name" = String, Path, description = "sandbox name")),
    request_body = NetworkPolicyBody,
    responses((status = 200, body = NetworkPolicyBody), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn set_network(
    State(st): State<AppState>,
    p: NameParam,
    body: Result<Json<NetworkPolicyBody>, JsonRejection>,
) -> ApiResult<Json<NetworkPolicyBody>> {
    let name = name_of(p)?;
    let Json(body) = body?;
    st.service.set_network_policy(&name, body).await?;
    Ok(Json(st.service.network_policy(&name).await?))
}

/// The display of a sandbox (409 for a headless one).
#[utoipa::path(get, path = "/v1/sandboxes/{name}/screen", tag = "screen",
    params(("name" = String, Path, description = "sandbox name")),
    responses((status = 200, body = ScreenInfo), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn screen_info(State(st): State<AppState>, p: NameParam) -> ApiResult<Json<ScreenInfo>> {
    let name = name_of(p)?;
    Ok(Json(st.service.screen_info(&name).await?))
}

/// A screenshot of a running sandbox: JSON with the PNG in base64 (`data`),
/// its size, and the `scale` and region origin that map image pixels back to
/// screen pixels (for the actions endpoint).
#[utoipa::path(post, path = "/v1/sandboxes/{name}/screen/screenshot", tag = "screen",
    params(("name" = String, Path, description = "sandbox name")),
    request_body = ScreenshotRequest,
    responses((status = 200, body = ScreenshotBody), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 502, body = ErrorBody)))]
async fn screenshot(
    State(st): State<AppState>,
    p: NameParam,
    body: Result<Json<ScreenshotRequest>, JsonRejection>,
) -> ApiResult<Json<ScreenshotBody>> {
    let name = name_of(p)?;
    let Json(body) = body?;
    Ok(Json(st.service.screenshot(&name, body).await?))
}

/// Performs a batch of pointer and keyboard actions on a running sandbox's
/// screen (checked as a whole before anything is sent), optionally returning
/// a screenshot taken `screenshot_after_ms` after the last one.
#[utoipa::path(post, path = "/v1/sandboxes/{name}/screen/actions", tag = "screen",
    params(("name" = String, Path, description = "sandbox name")),
    request_body = ScreenActionsRequest,
    responses((status = 200, body = ScreenActionsResponse), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn screen_actions(
    State(st): State<AppState>,
    p: NameParam,
    body: Result<Json<ScreenActionsRequest>, JsonRejection>,
) -> ApiResult<Json<ScreenActionsResponse>> {
    let name = name_of(p)?;
    let Json(body) = body?;
    Ok(Json(st.service.screen_actions(&name, body).await?))
}

/// A VNC viewer of the sandbox's screen over a WebSocket: binary frames
/// carry the RFB stream of QEMU's VNC server both ways (noVNC speaks it;
/// the `binary` subprotocol is accepted). View-only unless `input=true`:
/// the daemon then drops the viewer's key, pointer and clipboard messages.
#[utoipa::path(get, path = "/v1/sandboxes/{name}/screen/vnc", tag = "screen",
    params(("name" = String, Path, description = "sandbox name"), ScreenViewQuery),
    responses((status = 101, description = "WebSocket upgrade"), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn screen_vnc(
    State(st): State<AppState>,
    p: NameParam,
    q: Result<Query<ScreenViewQuery>, QueryRejection>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let name = name_of(p)?;
    let Query(q) = q?;
    let ws = ws?.protocols(["binary"]);
    let session = st
        .service
        .screen_vnc(&name, q.input.unwrap_or(false))
        .await?;
    Ok(ws.on_upgrade(move |socket| console_bridge(socket, session)))
}

/// A browser viewer (noVNC) of the sandbox's screen: an HTML page whose
/// script connects to `screen/vnc` (with the same `input`). Its assets are
/// under `/v1/viewer/`. Like every route it needs the bearer token, which a
/// browser does not send by itself: put an authenticating proxy in front,
/// or use `capsa screen view`, which serves the same page on 127.0.0.1.
#[utoipa::path(get, path = "/v1/sandboxes/{name}/screen/view", tag = "screen",
    params(("name" = String, Path, description = "sandbox name"), ScreenViewQuery),
    responses((status = 200, description = "the viewer page", content_type = "text/html", body = String),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn screen_view(
    State(st): State<AppState>,
    p: NameParam,
    q: Result<Query<ScreenViewQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let name = name_of(p)?;
    let Query(q) = q?;
    st.service.screen_info(&name).await?;
    let input = q.input.unwrap_or(false);
    let ws = format!("/v1/sandboxes/{name}/screen/vnc?input={input}");
    Ok(capsa_api::viewer::web::page(
        &capsa_api::viewer::web::Page {
            name: &name,
            assets: "/v1/viewer/",
            ws: &ws,
            view_only: !input,
        },
    ))
}

/// The viewer page's assets (vendored noVNC, MPL-2.0, and its script);
/// static files, so outside the OpenAPI document like `/openapi.json`.
async fn viewer_asset(Path(path): Path<String>) -> Response {
    capsa_api::viewer::web::asset_response(&path)
        .unwrap_or_else(|| ApiError::no_route(&format!("/v1/viewer/{path}")).into_response())
}

/// A running sandbox's latest network decisions (allowed and denied, each
/// with its reason), oldest first.
#[utoipa::path(get, path = "/v1/sandboxes/{name}/network/log", tag = "network",
    params(("name" = String, Path, description = "sandbox name")),
    responses((status = 200, body = NetworkLog), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn network_log(State(st): State<AppState>, p: NameParam) -> ApiResult<Json<NetworkLog>> {
    let name = name_of(p)?;
    Ok(Json(st.service.network_log(&name).await?))
}
