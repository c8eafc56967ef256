//! The operators' web console at `/console` (operations.md §3, "The web console"):
//! server-rendered pages (askama templates, checked at compile time) that work without
//! JavaScript, signed in with an operator the CLI created, over the same database
//! functions as the API and the CLI.
//!
//! Files depend one way: `pages`, `webhooks` → `session` → `view`.
//!
//! - Sign-in sets a session cookie (`HttpOnly`, `Secure` unless
//!   `console.insecure_cookie`, `SameSite=Strict`) whose token the database knows only
//!   by its SHA-256; sign-out deletes the session row.
//! - Every state-changing form carries a CSRF token: the session's, or before sign-in a
//!   random value also set as a cookie (double submit). Without a valid one: 403
//!   `csrf_failed`, nothing done.
//! - Every response carries a `Content-Security-Policy` that allows only this origin's
//!   script and style files (no inline script or style), and `X-Frame-Options: DENY`.
//! - Live figures: `console.js` polls the page's `/console/live/...` JSON every two
//!   seconds and writes each value into the element whose `data-live` names it.

mod pages;
mod session;
mod view;
mod webhooks;

use axum::{
    Router,
    http::{HeaderName, HeaderValue, header},
    routing::{get, post},
};
use tower_http::set_header::SetResponseHeaderLayer;

use super::state::AppState;

/// Only this origin's files; no inline script or style, no plugins, no framing, forms
/// post only here.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
    connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The console's routes, nested at `/console` by the router.
pub(crate) fn router() -> Router<AppState> {
    let headers: [(HeaderName, &'static str); 5] = [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
    ];
    let mut router = Router::new()
        .route("/", get(pages::overview))
        .route("/login", get(session::login_page).post(session::login))
        .route("/logout", post(session::logout))
        .route("/batches", get(pages::batches))
        .route("/batches/{id}", get(pages::batch))
        .route("/batches/{id}/retry", post(pages::retry))
        .route("/batches/{id}/cancel", post(pages::cancel))
        .route("/dead", get(pages::dead))
        .route("/dead/retry", post(pages::retry_dead))
        .route("/audit", get(pages::audit))
        .route("/webhooks", get(webhooks::list))
        .route("/webhooks/{id}", get(webhooks::endpoint))
        .route(
            "/webhooks/{id}/deliveries/{delivery_id}/replay",
            post(webhooks::replay),
        )
        .route("/live/overview", get(pages::live_overview))
        .route("/live/batches/{id}", get(pages::live_batch))
        .route("/static/console.css", get(pages::stylesheet))
        .route("/static/console.js", get(pages::script))
        .fallback(pages::not_found);
    for (name, value) in headers {
        router = router.layer(SetResponseHeaderLayer::overriding(
            name,
            HeaderValue::from_static(value),
        ));
    }
    router
}
