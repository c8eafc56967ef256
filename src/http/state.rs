//! What every handler shares, and which parts a process runs.

use std::sync::Arc;

use sqlx::PgPool;

use crate::config::Settings;

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) pool: PgPool,
    pub(crate) settings: Arc<Settings>,
    /// Which parts this process runs, for `/readyz`.
    pub(crate) role: Role,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// API and workers (`serve`, `demo`).
    All,
    Api,
    Worker,
}
