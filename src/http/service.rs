//! Service routes (no auth): liveness, readiness, metrics. (The OpenAPI document is
//! served by `openapi`.)

use axum::{Json, extract::State, http::header, response::IntoResponse};
use serde_json::json;

use super::{
    error::{ApiError, Problem},
    state::AppState,
};
use crate::{db, telemetry};

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "service", responses((status = 200, description = "The process is alive")))]
pub(crate) async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// The database answers and every migration is applied.
#[utoipa::path(get, path = "/readyz", tag = "service",
    responses((status = 200, description = "Database reachable, migrations applied"), (status = 503, description = "not_ready", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn readyz(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
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
#[utoipa::path(get, path = "/metrics", tag = "service",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub(crate) async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        telemetry::render_metrics(),
    )
}
