//! The one error type of the HTTP boundary: every variant is a problem+json (RFC 9457)
//! response with a stable `code`. Server faults answer 500 with no internal detail.

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or wrong bearer key")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Validation(String),
    #[error(
        "{count} candidates exceed the limit of {max} per batch; send them as {batches} batches."
    )]
    BatchTooLarge {
        count: usize,
        max: usize,
        batches: usize,
    },
    #[error("the batch has no candidates")]
    EmptyBatch,
    #[error("expected_count is {expected} but the request lists {actual} candidates")]
    CountMismatch { expected: i64, actual: usize },
    #[error("candidate ids appear more than once: {}", .0.join(", "))]
    DuplicateCandidates(Vec<String>),
    #[error("duration_minutes {got} is not one of the allowed durations: {allowed}")]
    InvalidDuration { got: i64, allowed: String },
    #[error("no job with id {0}")]
    JobNotFound(String),
    #[error("job {0} is closed: nothing was enqueued")]
    JobClosed(String),
    #[error("this Idempotency-Key was used with a different request body")]
    IdempotencyKeyReused,
    #[error("only failed items can be retried; not failed: {}", .0.join(", "))]
    NotRetryable(Vec<String>),
    #[error("{0}")]
    InvalidTransition(String),
    #[error("no invitation has this token")]
    TokenInvalid,
    #[error("this link was already used")]
    TokenUsed,
    #[error("this link expired or was revoked")]
    TokenExpired,
    #[error("the request body is larger than 1 MiB")]
    PayloadTooLarge,
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("service not ready: {0}")]
    NotReady(String),
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Internal(e.into())
    }
}

impl ApiError {
    /// Status, stable code and title.
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        use ApiError::*;
        match self {
            Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized"),
            NotFound(_) => (StatusCode::NOT_FOUND, "not_found", "Not found"),
            MethodNotAllowed(_) => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "Method not allowed",
            ),
            Validation(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation_failed",
                "Validation failed",
            ),
            BatchTooLarge { .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "batch_too_large",
                "Batch too large",
            ),
            EmptyBatch => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "empty_batch",
                "Empty batch",
            ),
            CountMismatch { .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "count_mismatch",
                "Count mismatch",
            ),
            DuplicateCandidates(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "duplicate_candidates",
                "Duplicate candidates",
            ),
            InvalidDuration { .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_duration",
                "Invalid duration",
            ),
            JobNotFound(_) => (StatusCode::NOT_FOUND, "job_not_found", "Job not found"),
            JobClosed(_) => (StatusCode::CONFLICT, "job_closed", "Job closed"),
            IdempotencyKeyReused => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "Idempotency key reused",
            ),
            NotRetryable(_) => (StatusCode::CONFLICT, "not_retryable", "Not retryable"),
            InvalidTransition(_) => (
                StatusCode::CONFLICT,
                "invalid_transition",
                "Invalid transition",
            ),
            TokenInvalid => (StatusCode::NOT_FOUND, "token_invalid", "Token invalid"),
            TokenUsed => (StatusCode::GONE, "token_used", "Token used"),
            TokenExpired => (StatusCode::GONE, "token_expired", "Token expired"),
            PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "Payload too large",
            ),
            UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Unsupported media type",
            ),
            NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready", "Not ready"),
            Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal server error",
            ),
        }
    }
}

/// The problem+json body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    /// Stable, machine-readable: switch on this, not on `title` or `detail`.
    pub code: String,
    pub detail: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, title) = self.parts();
        let detail = match &self {
            ApiError::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "request failed");
                "The server could not complete the request.".to_owned()
            }
            other => other.to_string(),
        };
        let problem = Problem {
            type_: format!(
                "https://invite-worker.dev/problems/{}",
                code.replace('_', "-")
            ),
            title: title.to_owned(),
            status: status.as_u16(),
            code: code.to_owned(),
            detail,
        };
        let mut response = (status, axum::Json(problem)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
