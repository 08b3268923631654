//! capsad: the capsa daemon.
//!
//! It serves an HTTP+JSON API on a Unix socket (and optionally on loopback
//! TCP) to create, run and manage sandboxes: lifecycle, streamed exec,
//! streamed file transfer, console, events. Each handler parses its request
//! into `capsa_api` types, calls the local [`capsa_api::Service`] and
//! serializes the answer; the verbs themselves live in `capsa_api::local`.
//! Sandboxes are kept by their per-VM monitors under the state root, so the
//! daemon holds no state a restart would lose.
//!
//! Its client is the `capsa-client` crate.
#![deny(missing_docs)]

pub mod api;
pub mod auth;
pub mod daemon;
pub mod server;

pub use capsa_api::{ApiError, ErrorBody, ErrorCode, ErrorDetail};
/// The error type and its helpers.
pub mod error {
    pub use capsa_api::error::*;
}
