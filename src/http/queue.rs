//! The queue (`admin`): its figures, the tasks apalis gave up on, and running those
//! again.

use std::time::Duration;

use axum::{Json, extract::State};
use serde::{Deserialize, Serialize};

use super::{
    access::Caller,
    error::{ApiError, ApiResult, Problem},
    extract::{JsonBody, QueryParams, optional, page_limit},
    state::AppState,
};
use crate::db::tasks::{self, DeadSelection, DeadTask, QueueOverview};

/// The most task ids one `POST /v1/queue/dead/retry` may list.
const MAX_IDS: usize = 1000;

/// Task counts by state, the oldest due task's wait, live workers and recent sends.
#[utoipa::path(get, path = "/v1/queue", operation_id = "get_queue", tag = "queue", security(("bearer" = [])),
    responses((status = 200, description = "The queue's figures", body = QueueOverview),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "forbidden (needs admin)", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn overview(State(state): State<AppState>) -> ApiResult<Json<QueueOverview>> {
    let alive = Duration::from_secs(state.settings.worker.recover_after_secs);
    Ok(Json(tasks::overview(&state.pool, alive).await?))
}

/// `GET /v1/queue/dead` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeadQuery {
    #[serde(default, deserialize_with = "optional")]
    pub(crate) limit: Option<i64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct DeadList {
    pub(crate) tasks: Vec<DeadTask>,
}

/// Tasks apalis gave up on (killed, or out of attempts): tasks whose handler could not
/// record an outcome, not items that failed. Most recent first.
#[utoipa::path(get, path = "/v1/queue/dead", operation_id = "list_dead_tasks", tag = "queue", security(("bearer" = [])),
    params(("limit" = Option<i64>, Query, description = "1 to 500, default 50")),
    responses((status = 200, description = "Most recent first", body = DeadList),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "forbidden (needs admin)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "validation_failed", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn dead(
    State(state): State<AppState>,
    QueryParams(query): QueryParams<DeadQuery>,
) -> ApiResult<Json<DeadList>> {
    let limit = page_limit(query.limit)?;
    let tasks = tasks::dead_tasks(&state.pool, limit).await?;
    Ok(Json(DeadList { tasks }))
}

/// `POST /v1/queue/dead/retry` body: `{"ids": [...]}` or `{"all": true}`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeadRetryRequest {
    #[serde(default)]
    pub(crate) ids: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) all: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct DeadRetried {
    /// How many dead tasks are runnable again (ids that name no dead task count none).
    pub(crate) retried: u64,
}

/// The ids or `all` of a retry request, checked.
fn dead_selection(req: DeadRetryRequest) -> ApiResult<DeadSelection> {
    match (req.ids, req.all) {
        (None, true) => Ok(DeadSelection::All),
        (Some(ids), false) if !ids.is_empty() && ids.len() <= MAX_IDS => {
            DeadSelection::ids(ids).map_err(ApiError::Validation)
        }
        (Some(_), false) => Err(ApiError::Validation(format!(
            "ids: must list 1 to {MAX_IDS} task ids"
        ))),
        _ => Err(ApiError::Validation(
            "give either ids or \"all\": true".into(),
        )),
    }
}

/// Makes dead tasks runnable again with a fresh attempt budget (audit-logged).
#[utoipa::path(post, path = "/v1/queue/dead/retry", operation_id = "retry_dead_tasks", tag = "queue", security(("bearer" = [])),
    request_body = DeadRetryRequest,
    responses((status = 200, description = "How many tasks run again", body = DeadRetried),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "forbidden (needs admin)", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "unsupported_media_type", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "validation_failed", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn retry_dead(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<DeadRetryRequest>,
) -> ApiResult<Json<DeadRetried>> {
    let which = dead_selection(req)?;
    let retried = tasks::retry_dead_tasks(&state.pool, &which, &caller.actor()).await?;
    tracing::info!(retried, "dead tasks retried");
    Ok(Json(DeadRetried { retried }))
}
