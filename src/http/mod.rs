//! The HTTP API (axum): routes, bearer auth, body limit, request ids and spans,
//! problem+json everywhere.
//!
//! Files depend one way: `router` → the resources (`batches`, `invitations`, `jobs`,
//! `service`, `suppressions`, `openapi`) → `state`, `extract`, `error`.

pub mod batches;
pub mod error;
pub mod extract;
pub mod invitations;
pub mod jobs;
mod limits;
pub mod openapi;
mod router;
mod server;
pub mod service;
mod state;
mod suppressions;

pub(crate) use router::router;
pub(crate) use server::serve;
pub(crate) use state::AppState;
pub use state::Role;
