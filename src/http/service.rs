//! Service routes (no auth): liveness, readiness, metrics.

use axum::{Json, extract::State, http::header, response::IntoResponse};
use serde_json::json;

use crate::{
    db,
    http::{AppState, error::ApiError},
    telemetry,
};

/// The process is alive.
pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// The database answers and every migration is applied.
pub async fn readyz(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    if sqlx::query("SELECT 1").execute(&state.pool).await.is_err() {
        return Err(ApiError::NotReady("the database does not answer".into()));
    }
    if !db::migrations_applied(&state.pool).await {
        return Err(ApiError::NotReady(
            "migrations are not applied: run `invite-worker migrate`".into(),
        ));
    }
    Ok(Json(json!({"status": "ready"})))
}

/// Prometheus text format.
pub async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        telemetry::render_metrics(),
    )
}
