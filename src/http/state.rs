//! What every handler shares, and which parts a process runs.

use std::sync::Arc;

use sqlx::PgPool;

use super::limits::Limits;
use crate::config::Settings;

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) pool: PgPool,
    pub(crate) settings: Arc<Settings>,
    /// Which parts this process runs, for `/readyz`.
    pub(crate) role: Role,
    /// The per-IP abuse limits of this process.
    pub(crate) limits: Arc<Limits>,
}

impl AppState {
    pub(crate) fn new(pool: PgPool, settings: Arc<Settings>, role: Role) -> Self {
        let limits = Arc::new(Limits::new(&settings.limits));
        Self {
            pool,
            settings,
            role,
            limits,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// API and workers (`serve`, `demo`).
    All,
    Api,
    Worker,
}
