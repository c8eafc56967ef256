//! `GET /v1/batches/{id}/items/{candidate_id}/attempts`: the attempt history of an item.

use axum::{
    Json,
    extract::{Path, State, rejection::PathRejection},
};
use serde::Serialize;
use uuid::Uuid;

use super::{
    error::{ApiError, ApiResult, Problem},
    state::AppState,
};
use crate::{
    db::{self, attempts::Attempt},
    domain::ids::ExternalId,
};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct AttemptList {
    /// Oldest first.
    pub(crate) attempts: Vec<Attempt>,
}

/// Every attempt to send the item of this candidate in this batch, oldest first, with
/// the mail server's reply (addresses masked) and the process that made it.
#[utoipa::path(get, path = "/v1/batches/{id}/items/{candidate_id}/attempts", operation_id = "list_attempts", tag = "batches",
    security(("bearer" = [])),
    params(("id" = Uuid, Path), ("candidate_id" = String, Path)),
    responses((status = 200, description = "Oldest first", body = AttemptList),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "forbidden", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "not_found: no such batch, or no such candidate in it", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn list(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<Json<AttemptList>> {
    // A path that is not UTF-8 once decoded (`%ff`) names no item.
    let Path((raw_batch, candidate_id)) = path
        .map_err(|_| ApiError::NotFound("no such resource: the path is not valid UTF-8".into()))?;
    let not_found = || {
        ApiError::NotFound(format!(
            "no item of candidate {candidate_id:?} in batch {raw_batch:?}"
        ))
    };
    let batch_id = Uuid::parse_str(&raw_batch).map_err(|_| not_found())?;
    // No stored candidate id holds a NUL or a control character: such an id names no
    // item (and PostgreSQL text could not hold the NUL to look it up).
    ExternalId::parse(&candidate_id).map_err(|_| not_found())?;
    let mut conn = state.pool.acquire().await?;
    db::attempts::of_item(&mut conn, batch_id, &candidate_id)
        .await?
        .map(|attempts| Json(AttemptList { attempts }))
        .ok_or_else(not_found)
}
