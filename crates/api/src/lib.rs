//! Vessel's control API: one REST/JSON server per VM on a Unix socket.
//!
//! - [`types`]: the JSON types (requests, responses, [`types::ApiError`]).
//! - [`controller::VmController`]: what the VMM implements.
//! - [`server::serve`]: runs the API on a Unix socket in its own thread.
//! - [`client::Client`]: a blocking client (hyper), one method per route.
//! - [`openapi`]: the OpenAPI document, generated from the types and the routes' table,
//!   served at `/api/v1/openapi.json` (`vessel ctl openapi` prints it).
//! - `testing` (feature `testing`): a fake VM behind a real server, for clients' tests.
//!
//! `vessel ctl`, the command line client, is the `ctl` crate: the VMM that links this one
//! pulls in no clap and no progress bars.

pub mod client;
pub mod controller;
pub mod openapi;
pub mod server;
pub mod types;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(test)]
mod tests;

pub use controller::VmController;
pub use types::ApiError;
