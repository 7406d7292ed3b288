//! Vessel's control API: one REST/JSON server per VM on a Unix socket.
//!
//! - [`types`]: the JSON types (requests, responses, [`types::ApiError`]).
//! - [`controller::VmController`]: what the VMM implements.
//! - [`server::serve`]: runs the API on a Unix socket in its own thread.
//! - [`client::Client`]: a blocking client, one method per route.
//! - [`ctl`]: `vessel ctl`, the command line client.
//!
//! The OpenAPI 3.0 document is `openapi.json` in this crate, served at `/api/v1/openapi.json`.

pub mod client;
pub mod controller;
pub mod ctl;
pub mod server;
pub mod types;

#[cfg(test)]
mod tests;

pub use controller::VmController;
pub use types::ApiError;

/// The OpenAPI 3.0 document, served as-is.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");
