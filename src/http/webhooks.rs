//! `/v1/webhooks`: the web app's endpoints for signed events (operations.md §4), their
//! delivery log, and replay. Every change is audit-logged; an endpoint's secret is shown
//! when it is created or rotated, and never again.

use axum::{
    Json,
    extract::{Path, State, rejection::PathRejection},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    access::Caller,
    error::{ApiError, ApiResult, Problem},
    extract::{JsonBody, PathUuid, QueryParams, optional, page_limit},
    state::AppState,
};
use crate::{
    db::{
        self,
        webhooks::{DeliveryView, Endpoint, NewEndpoint, Replay},
    },
    domain::webhook::{DeliveryStatus, EventType, check_endpoint_url},
};

/// `POST /v1/webhooks` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateEndpoint {
    /// `https://…`; it must resolve to public addresses when events are sent (unless
    /// `webhooks.allow_private_targets`).
    pub(crate) url: String,
    /// The event types to receive (at least one).
    pub(crate) events: Vec<EventType>,
    #[serde(default)]
    pub(crate) description: Option<String>,
}

/// An endpoint with its secret: the answer to a create or a rotation, the only ones
/// that show the secret.
/// No `Debug`: it holds a secret.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct EndpointWithSecret {
    #[serde(flatten)]
    pub(crate) endpoint: Endpoint,
    /// `whsec_…`: the signing key (Standard Webhooks). Keep it; it is not shown again.
    pub(crate) secret: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct EndpointList {
    /// Oldest first.
    pub(crate) webhooks: Vec<Endpoint>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct DeliveryList {
    /// Newest first.
    pub(crate) deliveries: Vec<DeliveryView>,
}

/// `GET /v1/webhooks/{id}/deliveries` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeliveriesQuery {
    #[serde(default, deserialize_with = "optional")]
    pub(crate) status: Option<DeliveryStatus>,
    #[serde(default, deserialize_with = "optional")]
    pub(crate) limit: Option<i64>,
}

/// Registers an endpoint; the answer carries its secret, shown only here.
#[utoipa::path(post, path = "/v1/webhooks", operation_id = "create_webhook", tag = "webhooks", security(("bearer" = [])),
    request_body = CreateEndpoint,
    responses((status = 201, description = "Created; the secret is shown only here", body = EndpointWithSecret),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "forbidden: the key lacks the route's scope", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "validation_failed: a bad URL, no or unknown event types, or webhooks.max_endpoints reached", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<CreateEndpoint>,
) -> ApiResult<Response> {
    let allow_private = state.settings.webhooks.allow_private_targets;
    let url = check_endpoint_url(body.url.trim(), allow_private).map_err(ApiError::Validation)?;
    let mut events: Vec<EventType> = Vec::with_capacity(body.events.len());
    for event in body.events {
        if !events.contains(&event) {
            events.push(event);
        }
    }
    if events.is_empty() {
        return Err(ApiError::Validation(
            "events: list at least one event type".into(),
        ));
    }
    let description = body.description.unwrap_or_default();
    if description.chars().count() > 1000 || description.chars().any(char::is_control) {
        return Err(ApiError::Validation(
            "description: at most 1000 characters, without control characters".into(),
        ));
    }
    let new = NewEndpoint {
        url: url.as_str(),
        events: &events,
        description: &description,
    };
    let max = state.settings.webhooks.max_endpoints;
    let Some((endpoint, secret)) =
        db::webhooks::create(&state.pool, &new, max, &caller.actor(), &caller.name).await?
    else {
        return Err(ApiError::Validation(format!(
            "at most {max} endpoints (webhooks.max_endpoints): delete one first"
        )));
    };
    tracing::info!(webhook = %endpoint.id, host = %db::webhooks::host_of(&endpoint.url),
        "webhook endpoint created");
    let location = format!("/v1/webhooks/{}", endpoint.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(EndpointWithSecret { endpoint, secret }),
    )
        .into_response())
}

/// Every endpoint, oldest first (without secrets).
#[utoipa::path(get, path = "/v1/webhooks", operation_id = "list_webhooks", tag = "webhooks", security(("bearer" = [])),
    responses((status = 200, description = "Oldest first", body = EndpointList),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "forbidden: the key lacks the route's scope", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn list(State(state): State<AppState>) -> ApiResult<Json<EndpointList>> {
    let webhooks = db::webhooks::list(&state.pool).await?;
    Ok(Json(EndpointList { webhooks }))
}

fn no_endpoint(id: impl std::fmt::Display) -> ApiError {
    ApiError::NotFound(format!("no webhook endpoint with id {id}"))
}

/// One endpoint (without its secret).
#[utoipa::path(get, path = "/v1/webhooks/{id}", operation_id = "get_webhook", tag = "webhooks", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses((status = 200, description = "The endpoint", body = Endpoint),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "forbidden: the key lacks the route's scope", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "not_found", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn get(
    State(state): State<AppState>,
    PathUuid(id): PathUuid,
) -> ApiResult<Json<Endpoint>> {
    db::webhooks::get(&state.pool, id)
        .await?
        .map(Json)
        .ok_or_else(|| no_endpoint(id))
}

/// Deletes an endpoint and its delivery log: nothing more is sent to it.
#[utoipa::path(delete, path = "/v1/webhooks/{id}", operation_id = "delete_webhook", tag = "webhooks", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses((status = 204, description = "Deleted"),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "forbidden: the key lacks the route's scope", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "not_found", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    PathUuid(id): PathUuid,
) -> ApiResult<StatusCode> {
    if !db::webhooks::delete(&state.pool, id, &caller.actor()).await? {
        return Err(no_endpoint(id));
    }
    tracing::info!(webhook = %id, "webhook endpoint deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// A new secret for the endpoint, shown only in this answer. Every attempt from now
/// on is signed with it, retries of earlier events included.
#[utoipa::path(post, path = "/v1/webhooks/{id}/rotate-secret", operation_id = "rotate_webhook_secret", tag = "webhooks", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses((status = 200, description = "Rotated; the new secret is shown only here", body = EndpointWithSecret),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "forbidden: the key lacks the route's scope", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "not_found", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn rotate_secret(
    State(state): State<AppState>,
    caller: Caller,
    PathUuid(id): PathUuid,
) -> ApiResult<Json<EndpointWithSecret>> {
    let (endpoint, secret) = db::webhooks::rotate_secret(&state.pool, id, &caller.actor())
        .await?
        .ok_or_else(|| no_endpoint(id))?;
    tracing::info!(webhook = %id, "webhook secret rotated");
    Ok(Json(EndpointWithSecret { endpoint, secret }))
}

/// The endpoint's deliveries, newest first, each with its attempts (status code,
/// duration, error) and when the next one is due.
#[utoipa::path(get, path = "/v1/webhooks/{id}/deliveries", operation_id = "list_webhook_deliveries", tag = "webhooks", security(("bearer" = [])),
    params(("id" = Uuid, Path),
        ("status" = Option<DeliveryStatus>, Query, description = "pending, sending, succeeded or failed"),
        ("limit" = Option<i64>, Query, description = "1 to 500, default 50")),
    responses((status = 200, description = "Newest first", body = DeliveryList),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "forbidden: the key lacks the route's scope", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "not_found", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "validation_failed", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn deliveries(
    State(state): State<AppState>,
    PathUuid(id): PathUuid,
    QueryParams(query): QueryParams<DeliveriesQuery>,
) -> ApiResult<Json<DeliveryList>> {
    let limit = page_limit(query.limit)?;
    let mut conn = state.pool.acquire().await?;
    db::webhooks::deliveries(&mut conn, id, query.status, limit)
        .await?
        .map(|deliveries| Json(DeliveryList { deliveries }))
        .ok_or_else(|| no_endpoint(id))
}

/// Sends the delivery's event to the endpoint once more, with the same `webhook-id`,
/// as a new delivery due now.
#[utoipa::path(post, path = "/v1/webhooks/{id}/deliveries/{delivery_id}/replay", operation_id = "replay_webhook_delivery", tag = "webhooks", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("delivery_id" = Uuid, Path)),
    responses((status = 202, description = "Queued: the new delivery", body = DeliveryView),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "forbidden: the key lacks the route's scope", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "not_found", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "invalid_transition: the endpoint is disabled", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn replay(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<Response> {
    let Path((raw_endpoint, raw_delivery)) = path
        .map_err(|_| ApiError::NotFound("no such resource: the path is not valid UTF-8".into()))?;
    let not_found = || {
        ApiError::NotFound(format!(
            "no delivery {raw_delivery:?} of webhook endpoint {raw_endpoint:?}"
        ))
    };
    let endpoint = Uuid::parse_str(&raw_endpoint).map_err(|_| not_found())?;
    let delivery = Uuid::parse_str(&raw_delivery).map_err(|_| not_found())?;
    match db::webhooks::replay(&state.pool, endpoint, delivery, &caller.actor()).await? {
        Replay::Queued(view) => {
            tracing::info!(webhook = %endpoint, delivery = %view.id, replay_of = %delivery,
                "webhook delivery replayed");
            Ok((StatusCode::ACCEPTED, Json(view)).into_response())
        }
        Replay::NotFound => Err(not_found()),
        Replay::Disabled => Err(ApiError::InvalidTransition(format!(
            "webhook endpoint {endpoint} is disabled: nothing is sent to it"
        ))),
    }
}
