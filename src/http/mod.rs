//! The HTTP API (axum): routes, bearer auth, body limit, problem+json everywhere.

pub mod batches;
pub mod error;
pub mod extract;
pub mod invitations;
pub mod jobs;
pub mod openapi;
pub mod service;

use std::sync::Arc;

use axum::{
    Router,
    extract::{DefaultBodyLimit, Request, State},
    http::{Method, header},
    middleware::{self, Next},
    response::Response,
    routing::{get, post, put},
};
use sqlx::PgPool;
use subtle::ConstantTimeEq;

use crate::{config::Settings, http::error::ApiError};

/// Request bodies above this are refused with 413 before any other work.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub settings: Arc<Settings>,
    /// Which parts this process runs, for `/readyz`.
    pub role: Role,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// API and workers (`serve`, `demo`).
    All,
    Api,
    Worker,
}

/// The whole router. `work` processes get only the service routes.
pub fn router(state: AppState) -> Router {
    let service = Router::new()
        .route("/healthz", get(service::healthz))
        .route("/readyz", get(service::readyz))
        .route("/metrics", get(service::metrics))
        .route("/openapi.json", get(service::openapi));
    let app = if state.role == Role::Worker {
        service
    } else {
        let v1 = Router::new()
            .route("/jobs/{job_id}", put(jobs::put_job).get(jobs::get_job))
            .route("/batches", post(batches::create).get(batches::list))
            .route("/batches/preview", post(batches::preview))
            .route("/batches/{id}", get(batches::get))
            .route("/batches/{id}/retry", post(batches::retry))
            .route("/batches/{id}/cancel", post(batches::cancel))
            .route("/batches/{id}/items", get(batches::items))
            .route("/invitations", get(invitations::list))
            .route("/invitations/redeem", post(invitations::redeem))
            .route("/invitations/{id}", get(invitations::get))
            .route("/invitations/{id}/complete", post(invitations::complete))
            .route("/invitations/{id}/revoke", post(invitations::revoke))
            .route_layer(middleware::from_fn_with_state(
                state.clone(),
                require_bearer,
            ))
            .method_not_allowed_fallback(method_not_allowed);
        service.nest("/v1", v1)
    };
    app.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on this route"))
}

/// `Authorization: Bearer <key>` with a key from `api.keys`. Every configured key is
/// compared in constant time, so timing tells nothing about how close a guess was.
async fn require_bearer(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or_default();
    let mut ok = subtle::Choice::from(0u8);
    for key in &state.settings.api.keys {
        ok |= key.expose().as_bytes().ct_eq(presented.as_bytes());
    }
    if presented.is_empty() || !bool::from(ok) {
        return Err(ApiError::Unauthorized);
    }
    Ok(next.run(request).await)
}
