//! Invitations: read, list, redeem (single use), complete, revoke.

use axum::{Json, extract::State};
use serde::{Deserialize, Serialize};

use crate::{
    db::{
        self,
        invitations::{Invitation, Redeem, Transition},
    },
    domain::{ids::ExternalId, token::hash_token},
};

use super::{
    access::Caller,
    error::{ApiError, ApiResult, Problem},
    extract::{JsonBody, PathUuid, QueryParams, optional},
    state::AppState,
};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct InvitationList {
    pub(crate) invitations: Vec<Invitation>,
}

/// `GET /v1/invitations` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    #[serde(default, deserialize_with = "optional")]
    pub(crate) job_id: Option<ExternalId>,
    #[serde(default, deserialize_with = "optional")]
    pub(crate) candidate_id: Option<ExternalId>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RedeemRequest {
    pub(crate) token: String,
}

fn not_found(id: uuid::Uuid) -> ApiError {
    ApiError::NotFound(format!("no invitation with id {id}"))
}

#[utoipa::path(get, path = "/v1/invitations/{id}", operation_id = "get_invitation", tag = "invitations", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses((status = 200, description = "The invitation", body = Invitation), (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"), (status = 403, description = "forbidden: the key lacks the route's scope", body = Problem, content_type = "application/problem+json"), (status = 404, description = "not_found", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn get(
    State(state): State<AppState>,
    PathUuid(id): PathUuid,
) -> ApiResult<Json<Invitation>> {
    db::invitations::get(&state.pool, id)
        .await?
        .map(Json)
        .ok_or_else(|| not_found(id))
}

#[utoipa::path(get, path = "/v1/invitations", operation_id = "list_invitations", tag = "invitations", security(("bearer" = [])),
    params(("job_id" = Option<String>, Query), ("candidate_id" = Option<String>, Query)),
    responses((status = 200, description = "Newest first", body = InvitationList), (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"), (status = 403, description = "forbidden: the key lacks the route's scope", body = Problem, content_type = "application/problem+json"), (status = 422, description = "validation_failed", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn list(
    State(state): State<AppState>,
    QueryParams(query): QueryParams<ListQuery>,
) -> ApiResult<Json<InvitationList>> {
    let (job_id, candidate_id) = (query.job_id, query.candidate_id);
    let invitations = db::invitations::list(
        &state.pool,
        job_id.as_ref().map(ExternalId::as_str),
        candidate_id.as_ref().map(ExternalId::as_str),
        500,
    )
    .await?;
    Ok(Json(InvitationList { invitations }))
}

/// The first use of a live link answers 200 and the invitation, now IN_PROGRESS.
#[utoipa::path(post, path = "/v1/invitations/redeem", tag = "invitations", security(("bearer" = [])),
    request_body = RedeemRequest,
    responses((status = 200, description = "First use of a live link: now IN_PROGRESS", body = Invitation), (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"), (status = 403, description = "forbidden: the key lacks the route's scope", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "token_invalid", body = Problem, content_type = "application/problem+json"), (status = 410, description = "token_used, token_expired", body = Problem, content_type = "application/problem+json"), (status = 415, description = "unsupported_media_type", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "validation_failed", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "rate_limited: over limits.redeems_per_minute from this address", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds until a call is allowed again")))))]
pub(crate) async fn redeem(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<RedeemRequest>,
) -> ApiResult<Json<Invitation>> {
    let token = body.token.trim();
    if token.is_empty() || token.len() > 512 {
        return Err(ApiError::TokenInvalid);
    }
    match db::invitations::redeem(&state.pool, &hash_token(token), &caller.actor()).await? {
        Redeem::Redeemed(invitation) => {
            metrics::counter!("invitations_redeemed_total").increment(1);
            Ok(Json(invitation))
        }
        Redeem::Unknown => Err(ApiError::TokenInvalid),
        Redeem::Used => Err(ApiError::TokenUsed),
        Redeem::ExpiredOrRevoked => Err(ApiError::TokenExpired),
    }
}

async fn transition(
    state: &AppState,
    caller: &Caller,
    id: uuid::Uuid,
    transition: Transition,
) -> ApiResult<Json<Invitation>> {
    let actor = caller.actor();
    if let Some(invitation) =
        db::invitations::transition(&state.pool, id, transition, &actor).await?
    {
        return Ok(Json(invitation));
    }
    let current = db::invitations::get(&state.pool, id)
        .await?
        .ok_or_else(|| not_found(id))?;
    let (from, to) = transition.states();
    Err(ApiError::InvalidTransition(format!(
        "invitation {id} is {}; only a {from} invitation can become {to}",
        current.status
    )))
}

/// IN_PROGRESS → COMPLETED.
#[utoipa::path(post, path = "/v1/invitations/{id}/complete", tag = "invitations", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses((status = 200, description = "IN_PROGRESS → COMPLETED", body = Invitation), (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"), (status = 403, description = "forbidden: the key lacks the route's scope", body = Problem, content_type = "application/problem+json"), (status = 404, description = "not_found", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "invalid_transition", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn complete(
    State(state): State<AppState>,
    caller: Caller,
    PathUuid(id): PathUuid,
) -> ApiResult<Json<Invitation>> {
    transition(&state, &caller, id, Transition::Complete).await
}

/// PENDING → REVOKED: the link stops working at once.
#[utoipa::path(post, path = "/v1/invitations/{id}/revoke", tag = "invitations", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses((status = 200, description = "PENDING → REVOKED", body = Invitation), (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"), (status = 403, description = "forbidden: the key lacks the route's scope", body = Problem, content_type = "application/problem+json"), (status = 404, description = "not_found", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "invalid_transition", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    PathUuid(id): PathUuid,
) -> ApiResult<Json<Invitation>> {
    transition(&state, &caller, id, Transition::Revoke).await
}
