//! The one error type of the HTTP boundary: every variant is a problem+json (RFC 9457)
//! response with a stable `code`. Server faults answer 500 with no internal detail.

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("missing or wrong bearer key")]
    Unauthorized,
    #[error("this key lacks the scope {scope}, which {route} needs")]
    Forbidden {
        scope: crate::domain::access::Scope,
        route: String,
    },
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
    #[error("too many {what} from this address; try again in {retry_after_secs} s")]
    RateLimited { what: String, retry_after_secs: u64 },
    #[error("the request was not completed in time")]
    RequestTimeout,
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

macro_rules! error_codes {
    ($($variant:ident = $text:literal),+ $(,)?) => {
        /// Every stable error `code` the API answers with.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum ErrorCode {
            $($variant),+
        }

        impl ErrorCode {
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $text),+
                }
            }
        }
    };
}

error_codes! {
    Unauthorized = "unauthorized",
    Forbidden = "forbidden",
    NotFound = "not_found",
    MethodNotAllowed = "method_not_allowed",
    ValidationFailed = "validation_failed",
    BatchTooLarge = "batch_too_large",
    EmptyBatch = "empty_batch",
    CountMismatch = "count_mismatch",
    DuplicateCandidates = "duplicate_candidates",
    InvalidDuration = "invalid_duration",
    JobNotFound = "job_not_found",
    JobClosed = "job_closed",
    IdempotencyKeyReused = "idempotency_key_reused",
    NotRetryable = "not_retryable",
    InvalidTransition = "invalid_transition",
    TokenInvalid = "token_invalid",
    TokenUsed = "token_used",
    TokenExpired = "token_expired",
    PayloadTooLarge = "payload_too_large",
    UnsupportedMediaType = "unsupported_media_type",
    RateLimited = "rate_limited",
    RequestTimeout = "request_timeout",
    NotReady = "not_ready",
    Internal = "internal",
}

impl ApiError {
    /// Status, stable code and title.
    fn parts(&self) -> (StatusCode, ErrorCode, &'static str) {
        use ApiError as E;
        use ErrorCode as C;
        use StatusCode as S;
        match self {
            E::Unauthorized => (S::UNAUTHORIZED, C::Unauthorized, "Unauthorized"),
            E::Forbidden { .. } => (S::FORBIDDEN, C::Forbidden, "Forbidden"),
            E::NotFound(_) => (S::NOT_FOUND, C::NotFound, "Not found"),
            E::MethodNotAllowed(_) => (
                S::METHOD_NOT_ALLOWED,
                C::MethodNotAllowed,
                "Method not allowed",
            ),
            E::Validation(_) => (
                S::UNPROCESSABLE_ENTITY,
                C::ValidationFailed,
                "Validation failed",
            ),
            E::BatchTooLarge { .. } => {
                (S::UNPROCESSABLE_ENTITY, C::BatchTooLarge, "Batch too large")
            }
            E::EmptyBatch => (S::UNPROCESSABLE_ENTITY, C::EmptyBatch, "Empty batch"),
            E::CountMismatch { .. } => {
                (S::UNPROCESSABLE_ENTITY, C::CountMismatch, "Count mismatch")
            }
            E::DuplicateCandidates(_) => (
                S::UNPROCESSABLE_ENTITY,
                C::DuplicateCandidates,
                "Duplicate candidates",
            ),
            E::InvalidDuration { .. } => (
                S::UNPROCESSABLE_ENTITY,
                C::InvalidDuration,
                "Invalid duration",
            ),
            E::JobNotFound(_) => (S::NOT_FOUND, C::JobNotFound, "Job not found"),
            E::JobClosed(_) => (S::CONFLICT, C::JobClosed, "Job closed"),
            E::IdempotencyKeyReused => (
                S::UNPROCESSABLE_ENTITY,
                C::IdempotencyKeyReused,
                "Idempotency key reused",
            ),
            E::NotRetryable(_) => (S::CONFLICT, C::NotRetryable, "Not retryable"),
            E::InvalidTransition(_) => (S::CONFLICT, C::InvalidTransition, "Invalid transition"),
            E::TokenInvalid => (S::NOT_FOUND, C::TokenInvalid, "Token invalid"),
            E::TokenUsed => (S::GONE, C::TokenUsed, "Token used"),
            E::TokenExpired => (S::GONE, C::TokenExpired, "Token expired"),
            E::PayloadTooLarge => (
                S::PAYLOAD_TOO_LARGE,
                C::PayloadTooLarge,
                "Payload too large",
            ),
            E::UnsupportedMediaType(_) => (
                S::UNSUPPORTED_MEDIA_TYPE,
                C::UnsupportedMediaType,
                "Unsupported media type",
            ),
            E::RateLimited { .. } => (S::TOO_MANY_REQUESTS, C::RateLimited, "Rate limited"),
            E::RequestTimeout => (S::REQUEST_TIMEOUT, C::RequestTimeout, "Request timeout"),
            E::NotReady(_) => (S::SERVICE_UNAVAILABLE, C::NotReady, "Not ready"),
            E::Internal(_) => (
                S::INTERNAL_SERVER_ERROR,
                C::Internal,
                "Internal server error",
            ),
        }
    }
}

/// The problem+json body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Problem {
    #[serde(rename = "type")]
    pub(crate) type_: String,
    pub(crate) title: String,
    pub(crate) status: u16,
    /// Stable, machine-readable: switch on this, not on `title` or `detail`.
    pub(crate) code: ErrorCode,
    pub(crate) detail: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, title) = self.parts();
        let retry_after = match &self {
            ApiError::RateLimited {
                retry_after_secs, ..
            } => Some(HeaderValue::from(*retry_after_secs)),
            _ => None,
        };
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
                code.as_str().replace('_', "-")
            ),
            title: title.to_owned(),
            status: status.as_u16(),
            code,
            detail,
        };
        let mut response = (status, axum::Json(problem)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if code == ErrorCode::Unauthorized {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, seconds);
        }
        response
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;
