//! Vessel's control API: one REST/JSON server per VM on a Unix socket.
//!
//! - [`types`]: the JSON types (requests, responses, [`types::ApiError`]).
//! - [`controller::VmController`]: what the VMM implements.
//! - [`server::serve`]: runs the API on a Unix socket in its own thread.
//! - [`client::Client`]: a blocking client, one method per route.
//! - [`ctl`]: `vessel ctl`, the command line client.
//!
//! - [`openapi`]: the OpenAPI document, generated from the types and the routes' table,
//!   served at `/api/v1/openapi.json` (`vessel ctl openapi` prints it).

pub mod client;
pub mod controller;
pub mod ctl;
pub mod openapi;
pub mod server;
pub mod types;

#[cfg(test)]
mod tests;

pub use controller::VmController;
pub use types::ApiError;
