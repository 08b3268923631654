//! Bearer-token authentication.
//!
//! The token lives in a file only its owner may read; a token file readable
//! by group or others is refused rather than silently trusted, since anyone
//! who can read it can run code in every sandbox.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// Longest token accepted from the file (the generated one is 64 hex characters).
const MAX_TOKEN_LEN: usize = 4096;

/// Errors loading or creating the token file.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token file is readable by group or others.
    #[error(
        "token file {path} has mode {mode:04o}, readable by group or others; fix: chmod 600 {path}"
    )]
    TooOpen {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The token file holds no usable token.
    #[error("token file {path} {problem}; fix: put one line of printable ASCII (e.g. `openssl rand -hex 32`) in it, or delete it so capsad generates one")]
    Bad {
        /// The file.
        path: String,
        /// What is wrong with its content.
        problem: &'static str,
    },
    /// Reading or creating the file failed.
    #[error("token file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Reads the token from `path`, creating it (0600, 32 random bytes as hex) if missing.
pub fn load_or_create_token(path: &Path) -> Result<String, TokenError> {
    let p = path.display().to_string();
    let io = |source| TokenError::Io {
        path: p.clone(),
        source,
    };
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(TokenError::TooOpen { path: p, mode });
            }
            if meta.len() > MAX_TOKEN_LEN as u64 {
                return Err(TokenError::Bad {
                    path: p,
                    problem: "is too large",
                });
            }
            let raw = std::fs::read_to_string(path).map_err(io)?;
            let token = raw.trim();
            if token.is_empty() {
                return Err(TokenError::Bad {
                    path: p,
                    problem: "is empty",
                });
            }
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(TokenError::Bad {
                    path: p,
                    problem: "contains whitespace or non-printable characters",
                });
            }
            Ok(token.to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = capsa_api::viewer::random_token().map_err(io)?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            writeln!(f, "{token}").map_err(io)?;
            tracing::info!(path = %path.display(), "generated a new API token");
            Ok(token)
        }
        Err(e) => Err(io(e)),
    }
}

/// Compares without an early exit, so timing does not reveal a prefix match.
pub use capsa_api::viewer::constant_time_eq;

/// The expected token, shared by the middleware.
#[derive(Clone)]
pub struct Token(pub std::sync::Arc<String>);

/// Middleware: every request needs `Authorization: Bearer <token>`.
pub async fn require_token(State(token): State<Token>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), token.0.as_bytes()));
    if ok {
        next.run(req).await
    } else {
        let msg = if req.headers().contains_key(AUTHORIZATION) {
            "the bearer token is wrong"
        } else {
            "this request has no `Authorization: Bearer` header"
        };
        ApiError::unauthorized(msg).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let t = load_or_create_token(&p).unwrap();
        assert_eq!(t.len(), 64);
        assert_eq!(load_or_create_token(&p).unwrap(), t);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = load_or_create_token(&p).unwrap_err();
        assert!(matches!(e, TokenError::TooOpen { .. }), "{e}");
    }

    #[test]
    fn ct_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
