//! `GET /v1/suppressions`, `DELETE /v1/suppressions/{email}`: the addresses not sent to
//! because a mail server refused them as bad mailboxes.

use axum::{Json, extract::State, http::StatusCode};
use serde::{Deserialize, Serialize};

use super::{
    access::Caller,
    error::{ApiError, ApiResult, Problem},
    extract::{PathText, QueryParams, optional},
    state::AppState,
};
use crate::db::{self, suppressions::Suppression};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct SuppressionList {
    pub(crate) suppressions: Vec<Suppression>,
}

/// `GET /v1/suppressions` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    #[serde(default, deserialize_with = "optional")]
    pub(crate) limit: Option<i64>,
}

/// The suppressed addresses, newest first.
#[utoipa::path(get, path = "/v1/suppressions", operation_id = "list_suppressions", tag = "suppressions", security(("bearer" = [])),
    params(("limit" = Option<i64>, Query, description = "1 to 1000, default 100")),
    responses((status = 200, description = "Newest first", body = SuppressionList),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"), (status = 403, description = "forbidden: the key lacks the route's scope", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "validation_failed", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn list(
    State(state): State<AppState>,
    QueryParams(query): QueryParams<ListQuery>,
) -> ApiResult<Json<SuppressionList>> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::Validation(format!(
            "limit: must be 1 to 1000 (got {limit})"
        )));
    }
    let suppressions = db::suppressions::list(&state.pool, limit).await?;
    Ok(Json(SuppressionList { suppressions }))
}

/// Takes an address off the list: items to it are sent again.
#[utoipa::path(delete, path = "/v1/suppressions/{email}", tag = "suppressions", security(("bearer" = [])),
    params(("email" = String, Path, description = "The address, any case")),
    responses((status = 204, description = "Removed"),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"), (status = 403, description = "forbidden: the key lacks the route's scope", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "not_found", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    PathText(email): PathText,
) -> ApiResult<StatusCode> {
    // PostgreSQL text cannot hold NUL, and no address holds a control character.
    if email.len() > 1024
        || email.chars().any(char::is_control)
        || !db::suppressions::delete(&state.pool, &email, &caller.actor()).await?
    {
        return Err(ApiError::NotFound(
            "that address is not on the suppression list".into(),
        ));
    }
    tracing::info!(email = %crate::domain::email::mask(&email), "address taken off the suppression list");
    Ok(StatusCode::NO_CONTENT)
}
