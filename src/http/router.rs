//! The whole router: the routes, what runs around every request (request id, span,
//! body limit), bearer authentication before routing and each route's scope, and the
//! answers for unknown routes.

use axum::{
    Router,
    extract::{DefaultBodyLimit, MatchedPath, Request, State},
    http::{Method, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get, post, put},
};
use tower::ServiceBuilder;
use tower_http::{
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    timeout::TimeoutLayer,
    trace::TraceLayer,
};

use super::{
    access::{self, Caller},
    attempts, audit, batches, candidates, console,
    error::ApiError,
    extract::REQUEST_ID,
    invitations, jobs,
    limits::client_ip,
    openapi, queue, service,
    state::{AppState, Role},
    suppressions, webhooks,
};

/// Request bodies above this are refused with 413 before any other work.
pub(crate) const BODY_LIMIT: usize = 1024 * 1024;

/// The whole router. `work` processes get only `/healthz`, `/readyz` and `/metrics`.
pub(crate) fn router(state: AppState) -> Router {
    let service = Router::new()
        .route("/healthz", get(service::healthz))
        .route("/readyz", get(service::readyz))
        .route("/metrics", get(service::metrics));
    let app = if state.role == Role::Worker {
        service
    } else {
        let service = service.route("/openapi.json", get(openapi::serve));
        let v1 = Router::new()
            .route("/jobs/{job_id}", put(jobs::put_job).get(jobs::get_job))
            .route("/batches", post(batches::create).get(batches::list))
            .route("/batches/preview", post(batches::preview))
            .route("/batches/{id}", get(batches::get))
            .route("/batches/{id}/retry", post(batches::retry))
            .route("/batches/{id}/cancel", post(batches::cancel))
            .route("/batches/{id}/items", get(batches::items))
            .route("/batches/{id}/failures", get(batches::failures))
            .route(
                "/batches/{id}/items/{candidate_id}/attempts",
                get(attempts::list),
            )
            .route("/candidates/{candidate_id}", delete(candidates::erase))
            .route("/invitations", get(invitations::list))
            .route(
                "/invitations/redeem",
                post(invitations::redeem)
                    .route_layer(middleware::from_fn_with_state(state.clone(), limit_redeems)),
            )
            .route("/invitations/{id}", get(invitations::get))
            .route("/invitations/{id}/complete", post(invitations::complete))
            .route("/invitations/{id}/revoke", post(invitations::revoke))
            .route("/suppressions", get(suppressions::list))
            .route("/suppressions/{email}", delete(suppressions::delete))
            .route("/audit", get(audit::list))
            .route("/queue", get(queue::overview))
            .route("/queue/dead", get(queue::dead))
            .route("/queue/dead/retry", post(queue::retry_dead))
            .route("/webhooks", post(webhooks::create).get(webhooks::list))
            .route(
                "/webhooks/{id}",
                get(webhooks::get).delete(webhooks::delete),
            )
            .route(
                "/webhooks/{id}/rotate-secret",
                post(webhooks::rotate_secret),
            )
            .route("/webhooks/{id}/deliveries", get(webhooks::deliveries))
            .route(
                "/webhooks/{id}/deliveries/{delivery_id}/replay",
                post(webhooks::replay),
            )
            // Each route's scope (`access::ROUTE_SCOPES`), for the caller found below.
            .route_layer(middleware::from_fn(access::authorize))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            // Around every /v1 request, unknown routes included: a path tells nothing
            // to a caller without a valid key.
            .layer(middleware::from_fn_with_state(
                state.clone(),
                require_bearer,
            ));
        let app = service.nest("/v1", v1);
        if state.settings.console.enabled {
            app.nest("/console", console::router()).route(
                "/console/",
                get(|| async { axum::response::Redirect::to("/console") }),
            )
        } else {
            app
        }
    };
    let request_timeout = state.settings.http.request_timeout();
    app.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(TraceLayer::new_for_http().make_span_with(request_span))
                .layer(PropagateRequestIdLayer::new(REQUEST_ID))
                .layer(middleware::map_response(timeout_problem))
                // `http.request_timeout_secs`, body included: a slow body is cut here,
                // and dropping the request's future drops what it had read.
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::REQUEST_TIMEOUT,
                    request_timeout,
                )),
        )
        .with_state(state)
}

/// The timeout layer answers a bare 408; every error is a problem.
async fn timeout_problem(response: Response) -> Response {
    if response.status() == StatusCode::REQUEST_TIMEOUT {
        tracing::warn!("request timed out");
        return ApiError::RequestTimeout.into_response();
    }
    response
}

/// The span of one request: its method, its route (the pattern, not the path: ids in a
/// path are the web app's, and the pattern keeps the log's vocabulary small) and id.
fn request_span(request: &Request) -> tracing::Span {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("(unmatched)", MatchedPath::as_str);
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    // `key`: the name of the API key, once authenticated (never the key itself).
    tracing::info_span!("request", method = %request.method(), route, request_id = %id,
        key = tracing::field::Empty)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on this route"))
}

/// `POST /v1/invitations/redeem`: at most `limits.redeems_per_minute` per client IP.
async fn limit_redeems(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    state.limits.redeem(client_ip(&request))?;
    Ok(next.run(request).await)
}

/// `Authorization: Bearer <key>` with a key from `api.keys` (compared in constant
/// time: `access::authenticate`). The key's name goes into the request's span and, as
/// a [`Caller`], into its extensions.
async fn require_bearer(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let key = access::bearer_token(request.headers())
        .and_then(|presented| access::authenticate(&state.settings.api.keys, presented));
    let Some(key) = key else {
        // A client past its budget of failures gets 429 for every wrong key; a right
        // key still works, so clients behind one proxy address cannot be locked out by
        // a stranger's guesses (keys are 24+ random characters: the limit is there to
        // bound the noise, not to protect weak keys).
        let client = client_ip(&request);
        state.limits.refuse_if_blocked(client)?;
        return Err(state.limits.auth_failed(client));
    };
    tracing::Span::current().record("key", tracing::field::display(&key.name));
    request.extensions_mut().insert(Caller::new(key));
    Ok(next.run(request).await)
}
