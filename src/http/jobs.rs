//! `PUT/GET /v1/jobs/{job_id}`.

use axum::{Json, extract::State, http::StatusCode};
use serde::Deserialize;

use crate::{
    db::{self, jobs::Job},
    domain::{ids::ExternalId, states::JobStatus},
};

use super::{
    access::Caller,
    error::{ApiError, ApiResult, Problem},
    extract::{JsonBody, PathText},
    state::AppState,
};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PutJob {
    pub(crate) title: String,
    pub(crate) status: JobStatus,
}

fn job_id(raw: &str) -> ApiResult<ExternalId> {
    ExternalId::parse(raw)
        .map_err(|why| ApiError::NotFound(format!("no job with id {raw:?}: a job id {why}")))
}

#[utoipa::path(put, path = "/v1/jobs/{job_id}", tag = "jobs", security(("bearer" = [])),
    params(("job_id" = String, Path, description = "The web app's id: 1 to 128 of [A-Za-z0-9._:-]")),
    request_body = PutJob,
    responses((status = 201, description = "Created", body = Job), (status = 200, description = "Updated", body = Job),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"), (status = 403, description = "forbidden: the key lacks the route's scope", body = Problem, content_type = "application/problem+json"), (status = 415, description = "unsupported_media_type", body = Problem, content_type = "application/problem+json"), (status = 413, description = "payload_too_large", body = Problem, content_type = "application/problem+json"), (status = 422, description = "validation_failed", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn put_job(
    State(state): State<AppState>,
    caller: Caller,
    raw_id: Result<PathText, ApiError>,
    JsonBody(body): JsonBody<PutJob>,
) -> ApiResult<(StatusCode, Json<Job>)> {
    let PathText(raw_id) =
        raw_id.map_err(|_| ApiError::Validation("job_id: must be valid UTF-8".into()))?;
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
    let (job, created) = db::jobs::upsert(
        &state.pool,
        id.as_str(),
        title,
        body.status,
        &caller.actor(),
    )
    .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(job)))
}

#[utoipa::path(get, path = "/v1/jobs/{job_id}", tag = "jobs", security(("bearer" = [])),
    params(("job_id" = String, Path)),
    responses((status = 200, description = "The job", body = Job), (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"), (status = 403, description = "forbidden: the key lacks the route's scope", body = Problem, content_type = "application/problem+json"), (status = 404, description = "not_found", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn get_job(
    State(state): State<AppState>,
    PathText(raw_id): PathText,
) -> ApiResult<Json<Job>> {
    let id = job_id(&raw_id)?;
    db::jobs::get(&state.pool, id.as_str())
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no job with id {id}")))
}
