//! capsad: the capsa daemon.
//!
//! It serves an HTTP+JSON API on a Unix socket (and optionally on loopback
//! TCP) to create, run and manage sandboxes: lifecycle, streamed exec,
//! streamed file transfer, console, events. Sandboxes are kept by their
//! per-VM monitors under the state root, so the daemon holds no state a
//! restart would lose; it rediscovers everything from the state root.
//!
//! [`client::Client`] is the typed client the CLI uses.
#![deny(missing_docs)]

pub mod api;
pub mod auth;
pub mod backend;
pub mod client;
pub mod daemon;
pub mod error;
pub mod locks;
pub mod server;

pub use error::{ApiError, ErrorBody, ErrorCode, ErrorDetail};
