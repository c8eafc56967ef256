//! The HTTP API (axum): routes, bearer auth, body limit, request ids and spans,
//! problem+json everywhere.
//!
//! Files depend one way: `router` → the resources (`attempts`, `audit`, `batches`,
//! `candidates`, `invitations`, `jobs`, `queue`, `service`, `suppressions`, `webhooks`,
//! `openapi`) → `access`, `state`, `extract`, `error`. The operators' web console
//! (`console`) sits beside the resources, over `limits`, `state` and `error`.

mod access;
mod attempts;
mod audit;
pub mod batches;
mod candidates;
mod console;
pub mod error;
pub mod extract;
pub mod invitations;
pub mod jobs;
mod limits;
pub mod openapi;
mod queue;
mod router;
mod server;
pub mod service;
mod state;
mod suppressions;
mod webhooks;

pub(crate) use router::router;
pub(crate) use server::serve;
pub(crate) use state::AppState;
pub use state::Role;
