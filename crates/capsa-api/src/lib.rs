//! capsa's one service interface.
//!
//! Every face (the library's users, capsad's HTTP API, the CLI) turns its
//! input into the types in [`types`] and calls a [`Service`]:
//!
//! - [`local::LocalService`] acts on the library's registry (per-VM
//!   monitors, the snapshot store, warm pools);
//! - `capsa_client::RemoteService` sends the same calls to a capsad, whose
//!   handlers call a `LocalService`.
//!
//! So a verb is implemented once (in `local`), and validation lives once
//! (in capsa-core's types and in [`types`]' checks).
#![deny(missing_docs)]

pub mod error;
pub mod local;
pub mod service;
pub mod types;
pub mod viewer;

pub use error::{ApiError, ApiResult, ErrorBody, ErrorCode, ErrorDetail, StatusCode};
pub use service::{ConsoleSession, ExecChunk, ExecControl, ExecSession, Files, Service};
