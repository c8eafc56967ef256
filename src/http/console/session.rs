//! Signing in and out, the session cookie, and the CSRF token every form carries.

use std::sync::LazyLock;

use askama::Template;
use axum::{
    Form,
    extract::{FromRequestParts, State},
    http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts},
    response::{IntoResponse, Redirect, Response},
};
use cookie::{Cookie, SameSite};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::view::{Failure, Header, page};
use crate::{
    config::generate_secret,
    db::{self, console::Session},
    domain::access::{hash_password, verify_password},
    http::{error::ApiError, limits::ClientIp, state::AppState},
};

/// The session cookie: a random token, known to the database by its SHA-256.
const SESSION_COOKIE: &str = "iw_session";
/// Before sign-in, the sign-in form's CSRF token (double submit: cookie and field).
const LOGIN_COOKIE: &str = "iw_login";
/// The longest name or password a sign-in reads (argon2 hashes what it is given).
const MAX_FIELD: usize = 1024;

/// A signed-in operator (an extractor: without a live session, the sign-in page).
pub(super) struct SignedIn {
    pub(super) session: Session,
    token_sha256: [u8; 32],
}

impl SignedIn {
    pub(super) fn header(&self) -> Header {
        Header::of(&self.session)
    }

    /// Checks a form's CSRF token against the session's, in constant time.
    pub(super) fn check_csrf(&self, presented: Option<&str>) -> Result<(), Failure> {
        same_token(presented, &self.session.csrf_token)
    }

    /// Checks the CSRF token and that the operator may act (not a viewer).
    pub(super) fn may_act(&self, presented: Option<&str>) -> Result<(), Failure> {
        self.check_csrf(presented)?;
        if self.header().can_act {
            Ok(())
        } else {
            Err(Failure::Forbidden)
        }
    }
}

impl FromRequestParts<AppState> for SignedIn {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Failure> {
        let token = cookie_value(&parts.headers, SESSION_COOKIE).ok_or(Failure::SignedOut)?;
        let token_sha256: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let session = db::console::session(&state.pool, &token_sha256)
            .await?
            .ok_or(Failure::SignedOut)?;
        Ok(SignedIn {
            session,
            token_sha256,
        })
    }
}

/// A form the console posts, or 403 `csrf_failed` when the body is no such form: a
/// request that is not the console's own form cannot carry a valid token.
pub(super) struct ConsoleForm<T>(pub(super) T);

impl<T, S> axum::extract::FromRequest<S> for ConsoleForm<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Failure;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Failure> {
        match Form::<T>::from_request(req, state).await {
            Ok(Form(form)) => Ok(ConsoleForm(form)),
            Err(_) => Err(Failure::CsrfFailed),
        }
    }
}

/// The value of the cookie `name` in the request's `Cookie` headers.
fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .map(|c| c.value().to_owned())
}

fn same_token(presented: Option<&str>, expected: &str) -> Result<(), Failure> {
    match presented {
        Some(p) if !expected.is_empty() && bool::from(p.as_bytes().ct_eq(expected.as_bytes())) => {
            Ok(())
        }
        _ => Err(Failure::CsrfFailed),
    }
}

/// A `Set-Cookie` value for the console's paths: `HttpOnly`, `SameSite=Strict`, and
/// `Secure` unless `console.insecure_cookie`. `max_age_secs` 0 deletes the cookie.
fn set_cookie(state: &AppState, name: &str, value: &str, max_age_secs: i64) -> HeaderValue {
    let cookie = Cookie::build((name, value))
        .path("/console")
        .http_only(true)
        .secure(!state.settings.console.insecure_cookie)
        .same_site(SameSite::Strict)
        .max_age(cookie::time::Duration::seconds(max_age_secs))
        .build();
    // A cookie made of our own names and base64url values is a valid header value.
    HeaderValue::from_str(&cookie.to_string()).unwrap_or(HeaderValue::from_static(""))
}

#[derive(Template)]
#[template(path = "console/login.html")]
struct LoginPage {
    csrf: String,
    error: Option<&'static str>,
    name: String,
}

/// The sign-in page (to the overview when already signed in), with a fresh form token.
pub(super) async fn login_page(
    State(state): State<AppState>,
    signed_in: Result<SignedIn, Failure>,
) -> Response {
    if signed_in.is_ok() {
        return Redirect::to("/console").into_response();
    }
    login_form(&state, StatusCode::OK, None, String::new())
}

fn login_form(
    state: &AppState,
    status: StatusCode,
    error: Option<&'static str>,
    name: String,
) -> Response {
    let csrf = generate_secret();
    let mut response = page(&LoginPage {
        csrf: csrf.clone(),
        error,
        name,
    });
    *response.status_mut() = status;
    response.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(state, LOGIN_COOKIE, &csrf, 3600),
    );
    response
}

#[derive(Deserialize)]
pub(super) struct LoginForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    password: String,
    csrf: Option<String>,
}

/// A hash no password matches, checked when the name is unknown so that a wrong name
/// takes as long as a wrong password.
static NO_OPERATOR: LazyLock<String> =
    LazyLock::new(|| hash_password(&generate_secret()).unwrap_or_default());

/// Signs in: the form's token must match the sign-in cookie; a wrong name or password
/// counts toward `limits.auth_failures_per_minute` like a wrong API key.
pub(super) async fn login(
    State(state): State<AppState>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    ConsoleForm(form): ConsoleForm<LoginForm>,
) -> Result<Response, Failure> {
    let cookie = cookie_value(&headers, LOGIN_COOKIE).unwrap_or_default();
    same_token(form.csrf.as_deref(), &cookie)?;
    state.limits.refuse_if_blocked(client)?;
    let too_long = form.name.len() > MAX_FIELD || form.password.len() > MAX_FIELD;
    let operator = if too_long {
        None
    } else {
        db::console::credentials(&state.pool, &form.name).await?
    };
    let phc = operator
        .as_ref()
        .map_or_else(|| NO_OPERATOR.clone(), |o| o.password_hash.clone());
    let password = form.password;
    // argon2 takes tens of milliseconds of CPU: off the async threads.
    let verified = tokio::task::spawn_blocking(move || verify_password(&password, &phc))
        .await
        .unwrap_or(false);
    let Some(operator) = operator.filter(|_| verified && !too_long) else {
        return match state.limits.auth_failed(client) {
            ApiError::Unauthorized => {
                let name = if too_long { String::new() } else { form.name };
                Ok(login_form(
                    &state,
                    StatusCode::UNAUTHORIZED,
                    Some("Wrong name or password."),
                    name,
                ))
            }
            limited => Err(limited.into()),
        };
    };
    let token = generate_secret();
    let token_sha256: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let hours = state.settings.console.session_hours;
    let expires_at = chrono::Utc::now() + chrono::Duration::hours(i64::from(hours));
    db::console::start_session(
        &state.pool,
        &token_sha256,
        operator.id,
        &generate_secret(),
        expires_at,
    )
    .await?;
    tracing::info!("console sign-in");
    let mut response = Redirect::to("/console").into_response();
    let headers = response.headers_mut();
    let max_age = i64::from(hours) * 3600;
    headers.append(
        header::SET_COOKIE,
        set_cookie(&state, SESSION_COOKIE, &token, max_age),
    );
    headers.append(header::SET_COOKIE, set_cookie(&state, LOGIN_COOKIE, "", 0));
    Ok(response)
}

#[derive(Deserialize)]
pub(super) struct CsrfOnly {
    csrf: Option<String>,
}

/// Signs out: the session ends in the database, the cookie is dropped.
pub(super) async fn logout(
    State(state): State<AppState>,
    signed_in: SignedIn,
    ConsoleForm(form): ConsoleForm<CsrfOnly>,
) -> Result<Response, Failure> {
    signed_in.check_csrf(form.csrf.as_deref())?;
    db::console::end_session(&state.pool, &signed_in.token_sha256).await?;
    let mut response = Redirect::to("/console/login").into_response();
    response.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(&state, SESSION_COOKIE, "", 0),
    );
    Ok(response)
}
