//! The one error shape every endpoint answers with.
//!
//! Clients (the CLI, scripts, the fuzzer) match on `error.code`, which is
//! stable; `message` names the problem and `fix` says what to do about it.
//! axum's own rejections (bad JSON, bad path or query, unknown route, wrong
//! method, oversize body) are converted into the same shape, so no endpoint
//! ever answers with a plain-text body.

pub use http::StatusCode;
use serde::{Deserialize, Serialize};

/// Stable machine-readable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed (bad JSON, unknown field, bad value).
    BadRequest,
    /// A sandbox name breaks the naming rules.
    InvalidName,
    /// A guest path is not absolute or contains `..`.
    InvalidPath,
    /// No or a wrong bearer token.
    Unauthorized,
    /// The command's program does not exist in the sandbox (a shell's 127).
    CommandNotFound,
    /// The command's program exists but cannot be executed (a shell's 126).
    CommandNotExecutable,
    /// A host path the daemon's policy does not let API clients use
    /// (outside `--allow-disk-dir`, a device, a symlink leading out).
    PathNotAllowed,
    /// The sandbox, file or route does not exist.
    NotFound,
    /// The method is not allowed on this route.
    MethodNotAllowed,
    /// The name is taken, an operation on it is in progress, or its state forbids the action.
    Conflict,
    /// The body is larger than this endpoint accepts.
    PayloadTooLarge,
    /// The body is not `application/json` where JSON is expected.
    UnsupportedMediaType,
    /// The guest refused the operation (permission denied, busy).
    GuestError,
    /// The operation did not finish in time.
    Timeout,
    /// The request is well-formed but asks for something this host or backend
    /// cannot do (e.g. a forced accelerator that does not work here).
    Unsupported,
    /// The daemon cannot serve this now (e.g. a feature missing on this host).
    Unavailable,
    /// A bug or an unexpected host failure; the message has details.
    Internal,
}

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong and how to fix it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ErrorDetail {
    /// Stable code to match on.
    pub code: ErrorCode,
    /// Human-readable description naming the problem.
    pub message: String,
    /// What to do about it, when there is something to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// An error as a handler returns it: status + body.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// The body.
    pub detail: ErrorDetail,
}

/// Result alias for handlers.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// An error with an explicit status and code.
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            detail: ErrorDetail {
                code,
                message: message.into(),
                fix: None,
            },
        }
    }

    /// Adds the fix hint.
    pub fn fix(mut self, fix: impl Into<String>) -> Self {
        self.detail.fix = Some(fix.into());
        self
    }

    /// 400 bad_request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
    }

    /// 404 not_found for a sandbox.
    pub fn no_sandbox(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            format!("no sandbox named {name:?}"),
        )
        .fix("list sandboxes with `capsa ps` (GET /v1/sandboxes), or create it (`capsa create`, POST /v1/sandboxes)")
    }

    /// 404 not_found for something other than a sandbox.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
    }

    /// 409 conflict.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, ErrorCode::Conflict, message)
    }

    /// 500 internal.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            message,
        )
    }

    /// 422 unsupported: valid, but not possible on this host.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::Unsupported,
            message,
        )
    }

    /// 503 unavailable.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            message,
        )
    }

    /// 401 unauthorized.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message).fix(
            "send `Authorization: Bearer <token>` with the token from capsad's token file \
             (default <state dir>/capsad.token)",
        )
    }

    /// 404 for an unknown route.
    pub fn no_route(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            format!("no route {path:?}"),
        )
        .fix("see GET /openapi.json for the routes capsad serves")
    }

    /// 405 for a known route with the wrong method.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::MethodNotAllowed,
            "this method is not allowed on this route",
        )
        .fix("see GET /openapi.json for the methods each route accepts")
    }

    /// Maps an error from starting a command: a missing or non-executable
    /// program gets its own code (clients exit 127 or 126 on it, as shells
    /// do); anything else as [`ApiError::from_capsa`].
    pub fn from_spawn(e: &capsa::Error) -> Self {
        let message = format!("starting the command: {e}");
        match e.spawn_exit_code() {
            Some(127) => Self::new(StatusCode::NOT_FOUND, ErrorCode::CommandNotFound, message)
                .fix("check the program's name, or give its absolute path (PATH is the guest's)"),
            Some(_) => Self::new(StatusCode::CONFLICT, ErrorCode::CommandNotExecutable, message)
                .fix("make the file executable in the sandbox (chmod +x), or run it through its interpreter"),
            None => Self::from_capsa("starting the command", e),
        }
    }

    /// Maps a library error to the closest HTTP error.
    pub fn from_capsa(context: &str, e: &capsa::Error) -> Self {
        use capsa::{AgentClientError, Error as E, ErrorKind as K};
        let message = format!("{context}: {e}");
        let fix = e.fix();
        let err = match e {
            E::Core(capsa_core::Error::InvalidSpec { .. })
            | E::Core(capsa_core::Error::Disk { .. })
            | E::Core(capsa_core::Error::Cmdline(_))
            | E::InvalidArgument(_) => ApiError::bad_request(message),
            E::Core(capsa_core::Error::Unsupported { .. }) => ApiError::unsupported(message),
            E::Screen(capsa::ScreenError::NoDisplay) => ApiError::conflict(message),
            E::Screen(capsa::ScreenError::BadFrame(_) | capsa::ScreenError::Encode(_)) => {
                ApiError::new(StatusCode::BAD_GATEWAY, ErrorCode::GuestError, message)
            }
            E::Screen(_) => ApiError::bad_request(message),
            E::Agent(AgentClientError::InvalidRequest(_)) => ApiError::bad_request(message),
            E::GuestInput(_) => {
                ApiError::new(StatusCode::BAD_GATEWAY, ErrorCode::GuestError, message)
            }
            E::Agent(AgentClientError::Timeout { .. }) | E::ConsoleTimeout { .. } => {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, ErrorCode::Timeout, message)
            }
            E::Agent(a) => match a.remote_kind() {
                Some(K::NotFound) => {
                    ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
                }
                Some(K::InvalidInput) => ApiError::bad_request(message),
                Some(K::AlreadyExists) => ApiError::conflict(message),
                Some(K::PermissionDenied) | Some(K::Busy) | Some(K::Io) => {
                    ApiError::new(StatusCode::CONFLICT, ErrorCode::GuestError, message)
                }
                Some(_) => ApiError::new(StatusCode::BAD_GATEWAY, ErrorCode::GuestError, message),
                // The sandbox is recorded running but its agent does not
                // answer: a state of that sandbox (booting, shutting down,
                // broken guest), not a daemon failure.
                None => ApiError::new(StatusCode::CONFLICT, ErrorCode::Unavailable, message)
                    .fix("the sandbox's guest agent does not answer: check its state and console; stop and start it again"),
            },
            E::Vmm(v) => {
                use capsa_vmm::VmmError as V;
                match v {
                    V::InvalidName { .. } | V::PathTooLong { .. } => ApiError::new(
                        StatusCode::BAD_REQUEST,
                        ErrorCode::InvalidName,
                        message,
                    ),
                    V::NotFound { .. } => {
                        ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
                            .fix("`capsa ps` (GET /v1/sandboxes) lists the sandboxes")
                    }
                    V::AlreadyExists { .. }
                    | V::Dead { .. }
                    | V::Stopped { .. }
                    | V::Running { .. } => ApiError::conflict(message),
                    V::MonitorNotFound { .. } => ApiError::unavailable(message),
                    V::Core(
                        capsa_core::Error::InvalidSpec { .. }
                        | capsa_core::Error::Disk { .. }
                        | capsa_core::Error::Cmdline(_),
                    ) => ApiError::bad_request(message),
                    V::Core(capsa_core::Error::Unsupported { .. }) => {
                        ApiError::unsupported(message)
                    }
                    _ => ApiError::internal(message),
                }
            }
            E::SnapshotNotFound { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message).fix(
                    "`capsa snapshot ls` (GET /v1/snapshots) lists the snapshots; \
                     `capsa snapshot create` (POST /v1/sandboxes/{name}/snapshot) makes one",
                )
            }
            E::SnapshotExists { .. } => ApiError::conflict(message)
                .fix("pick another snapshot name, or remove the old one first (`capsa snapshot rm NAME`, DELETE /v1/snapshots/{name})"),
            E::SnapshotName { .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidName, message)
                    .fix("use 1-63 characters [a-z0-9][a-z0-9_.-]*")
            }
            E::Core(capsa_core::Error::SnapshotMismatch { .. })
            | E::Core(capsa_core::Error::Snapshot { .. }) => ApiError::conflict(message),
            E::ConsoleClosed { .. } | E::NoConsole | E::NoVsock | E::Vsock { .. } => {
                ApiError::unavailable(message)
            }
            // The image store's own mapping (unknown image: 404, bad reference: 400, ...).
            E::Oci(o) => {
                let mut err = crate::local::images::oci_status(o, message);
                if err.detail.fix.is_none() {
                    err.detail.fix = fix.clone();
                }
                return err;
            }
            _ => ApiError::internal(message),
        };
        match fix {
            Some(f) => err.fix(f),
            None => err,
        }
    }
}

/// A refusal of capsa-core's checks (limits, names, specs) as a 400 with its fix.
pub fn core_err(e: capsa_core::Error) -> ApiError {
    ApiError::from_capsa("invalid request", &capsa::Error::Core(e))
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The message names the problem; the fix travels apart (`detail.fix`).
        f.write_str(&self.detail.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(feature = "axum")]
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};

#[cfg(feature = "axum")]
impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, message = %self.detail.message, "request failed");
        }
        axum::response::IntoResponse::into_response((
            self.status,
            axum::Json(ErrorBody { error: self.detail }),
        ))
    }
}

#[cfg(feature = "axum")]
impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = r.status();
        let text = r.body_text();
        match r {
            JsonRejection::MissingJsonContentType(_) => Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorCode::UnsupportedMediaType,
                text,
            )
            .fix("send the body with `Content-Type: application/json`"),
            JsonRejection::BytesRejection(_) if status == StatusCode::PAYLOAD_TOO_LARGE => {
                too_large(text)
            }
            _ if status == StatusCode::PAYLOAD_TOO_LARGE => too_large(text),
            JsonRejection::JsonDataError(_) => Self::bad_request(text)
                .fix("check field names and types against GET /openapi.json (unknown fields are refused)"),
            JsonRejection::JsonSyntaxError(_) => {
                Self::bad_request(text).fix("send a well-formed JSON object")
            }
            _ => Self::bad_request(text),
        }
    }
}

#[cfg(feature = "axum")]
fn too_large(text: String) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::PayloadTooLarge,
        text,
    )
    .fix("send a smaller body; upload files with PUT /v1/sandboxes/{name}/files, which streams")
}

#[cfg(feature = "axum")]
impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        Self::bad_request(r.body_text())
    }
}

#[cfg(feature = "axum")]
impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        Self::bad_request(r.body_text()).fix("check the query parameters against GET /openapi.json")
    }
}

#[cfg(feature = "axum")]
impl From<axum::extract::ws::rejection::WebSocketUpgradeRejection> for ApiError {
    fn from(r: axum::extract::ws::rejection::WebSocketUpgradeRejection) -> Self {
        Self::bad_request(r.body_text()).fix("connect with a WebSocket client")
    }
}
