//! capsad's client.
//!
//! [`Client`] is the typed HTTP client (hyper 1 over a Unix socket or
//! loopback TCP); [`RemoteService`] implements [`capsa_api::Service`] on it,
//! so code written against the service runs the same on a capsad as on the
//! local registry. No server code (axum, utoipa) is linked.
#![deny(missing_docs)]

mod http;
mod remote;
mod ws;

pub use http::{BoxStream, Client, ClientError, ExecChunk, ExecResult, Result};
pub use remote::{default_token_file, RemoteService};
pub use ws::{ConsoleInput, ExecInput};
