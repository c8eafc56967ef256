//! What every console page shares: the signed-in header, rendering a template, and the
//! console's error pages (HTML, each with a stable code, like the API's problems).

use askama::Template;
use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{Html, IntoResponse, Redirect, Response},
};

use crate::{
    db::console::Session,
    domain::{access::OperatorRole, email},
    http::error::ApiError,
};

/// Who is signed in, as the page header shows it, and what their forms carry.
pub(super) struct Header {
    pub(super) name: String,
    pub(super) role: &'static str,
    pub(super) csrf: String,
    /// May act (retry, cancel, re-enqueue): the `operator` role.
    pub(super) can_act: bool,
}

impl Header {
    pub(super) fn of(session: &Session) -> Self {
        Header {
            name: session.name.clone(),
            role: session.role.as_str(),
            csrf: session.csrf_token.clone(),
            can_act: session.role == OperatorRole::Operator,
        }
    }

    /// An address as this operator may see it: whole for operators, masked for viewers.
    pub(super) fn address(&self, address: &str) -> String {
        if self.can_act {
            address.to_owned()
        } else {
            email::mask(address)
        }
    }

    /// A server's reply or error text as this operator may see it: addresses quoted in
    /// it are masked for viewers.
    pub(super) fn reply(&self, text: &str) -> String {
        if self.can_act {
            text.to_owned()
        } else {
            email::mask_addresses(text)
        }
    }
}

/// A rendered page (200).
pub(super) fn page(template: &impl Template) -> Response {
    match template.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => Failure::Internal(e.to_string()).into_response(),
    }
}

/// Why a console request got no page.
#[derive(Debug)]
pub(super) enum Failure {
    /// No live session: to the sign-in page.
    SignedOut,
    NotFound,
    /// A viewer asked for an operator's action.
    Forbidden,
    /// A state-changing form without a valid CSRF token.
    CsrfFailed,
    RateLimited {
        retry_after_secs: u64,
    },
    Internal(String),
}

#[derive(Template)]
#[template(path = "console/error.html")]
struct ErrorPage {
    status: u16,
    code: &'static str,
    message: &'static str,
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let retry_after = match &self {
            Failure::RateLimited { retry_after_secs } => Some(*retry_after_secs),
            _ => None,
        };
        let (status, code, message) = match self {
            Failure::SignedOut => return Redirect::to("/console/login").into_response(),
            Failure::NotFound => (StatusCode::NOT_FOUND, "not_found", "There is no such page."),
            Failure::Forbidden => (
                StatusCode::FORBIDDEN,
                "forbidden",
                "Your role (viewer) may look but not act; ask an operator.",
            ),
            Failure::CsrfFailed => (
                StatusCode::FORBIDDEN,
                "csrf_failed",
                "This form is stale or did not come from the console: nothing was done. \
                 Go back, reload the page and try again.",
            ),
            Failure::RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "Too many failed sign-ins from this address; wait a minute.",
            ),
            Failure::Internal(why) => {
                tracing::error!(error = %why, "console request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "Something went wrong on our side; the log has the details.",
                )
            }
        };
        let body = ErrorPage {
            status: status.as_u16(),
            code,
            message,
        }
        .render()
        .unwrap_or_else(|_| code.to_owned());
        let mut response = (status, Html(body)).into_response();
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        Failure::Internal(e.to_string())
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Internal(format!("{e:#}"))
    }
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::RateLimited {
                retry_after_secs, ..
            } => Failure::RateLimited { retry_after_secs },
            ApiError::NotFound(_) => Failure::NotFound,
            other => Failure::Internal(other.to_string()),
        }
    }
}
