//! `PUT/GET /v1/jobs/{job_id}`.

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use serde::Deserialize;

use crate::{
    db::{self, jobs::Job},
    domain::{ids::ExternalId, states::JobStatus},
    http::{
        AppState,
        error::{ApiError, ApiResult},
        extract::JsonBody,
    },
};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutJob {
    pub title: String,
    pub status: JobStatus,
}

fn job_id(raw: &str) -> ApiResult<ExternalId> {
    ExternalId::parse(raw)
        .map_err(|why| ApiError::NotFound(format!("no job with id {raw:?}: a job id {why}")))
}

pub async fn put_job(
    State(state): State<AppState>,
    Path(raw_id): Path<String>,
    JsonBody(body): JsonBody<PutJob>,
) -> ApiResult<(StatusCode, Json<Job>)> {
    let id =
        ExternalId::parse(&raw_id).map_err(|why| ApiError::Validation(format!("job_id: {why}")))?;
    let title = body.title.trim();
    if title.is_empty() || title.chars().count() > 500 {
        return Err(ApiError::Validation(
            "title: must be 1 to 500 characters".into(),
        ));
    }
    if title.chars().any(char::is_control) {
        return Err(ApiError::Validation(
            "title: must not contain control characters".into(),
        ));
    }
    let (job, created) =
        db::jobs::upsert(&state.pool, id.as_str(), title, body.status.as_str()).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(job)))
}

pub async fn get_job(
    State(state): State<AppState>,
    Path(raw_id): Path<String>,
) -> ApiResult<Json<Job>> {
    let id = job_id(&raw_id)?;
    db::jobs::get(&state.pool, id.as_str())
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no job with id {id}")))
}
