//! `DELETE /v1/candidates/{candidate_id}`: erasure of a candidate's personal data.

use std::time::Duration;

use axum::{Json, extract::State};
use serde::Serialize;

use super::{
    access::Caller,
    error::{ApiError, ApiResult, Problem},
    extract::PathText,
    state::AppState,
};
use crate::{
    db::{self, candidates::Erasure},
    domain::{access::AuditAction, ids::ExternalId},
};

/// What an erasure answers.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Erased {
    /// The candidate's items whose email and name this request erased (0 when an
    /// earlier erasure or retention had already done it).
    pub(crate) erased_items: i64,
}

/// Erases the candidate's email and name everywhere (items, attempts' replies, batch
/// warnings, the suppression list); revokes their PENDING links; skips their pending
/// items as `cancelled`, so nothing more is sent to them. Counts and tallies stay exact.
#[utoipa::path(delete, path = "/v1/candidates/{candidate_id}", operation_id = "erase_candidate", tag = "candidates",
    security(("bearer" = [])),
    params(("candidate_id" = String, Path, description = "The web app's id: 1 to 128 of [A-Za-z0-9._:-]")),
    responses((status = 200, description = "Erased", body = Erased),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "forbidden", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "not_found: no item ever had this candidate id", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "invalid_transition: a send to the candidate is still on its way; nothing was erased", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn erase(
    State(state): State<AppState>,
    caller: Caller,
    PathText(raw_id): PathText,
) -> ApiResult<Json<Erased>> {
    let id = ExternalId::parse(&raw_id).map_err(|why| {
        ApiError::NotFound(format!(
            "no candidate with id {raw_id:?}: a candidate id {why}"
        ))
    })?;
    // As a cancel does: a send on its way is waited for, so its item ends as what
    // really happened to it.
    let window = state.settings.smtp_timeout() + Duration::from_secs(5);
    let deadline = tokio::time::Instant::now() + window;
    loop {
        let mut tx = state.pool.begin().await?;
        match db::candidates::erase(&mut tx, id.as_str(), window).await? {
            Erasure::Erased(erased_items) => {
                let detail = serde_json::json!({ "erased_items": erased_items });
                db::audit::record(
                    &mut tx,
                    &caller.actor(),
                    AuditAction::CandidateErased,
                    id.as_str(),
                    detail,
                )
                .await?;
                tx.commit().await?;
                tracing::info!(candidate = %id, erased_items, "candidate erased");
                return Ok(Json(Erased { erased_items }));
            }
            Erasure::NotFound => {
                return Err(ApiError::NotFound(format!("no candidate with id {id}")));
            }
            Erasure::SendsInFlight if tokio::time::Instant::now() < deadline => {
                tx.rollback().await?;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // As for a cancel: a worker died mid-send; nothing was erased.
            Erasure::SendsInFlight => {
                return Err(ApiError::InvalidTransition(format!(
                    "a send to candidate {id} is still on its way (its worker may have \
                     stopped mid-send); nothing was erased: try again in a few minutes"
                )));
            }
        }
    }
}
