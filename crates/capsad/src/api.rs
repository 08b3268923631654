//! The wire types of the API: capsa's one set of request and response types
//! (`capsa_api::types`), which the OpenAPI document is generated from.

pub use capsa_api::types::*;
