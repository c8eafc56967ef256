//! `GET /v1/audit`: who changed what (`admin`).

use axum::{Json, extract::State};
use serde::{Deserialize, Serialize};

use super::{
    error::{ApiError, ApiResult, Problem},
    extract::{QueryParams, optional, page_limit},
    state::AppState,
};
use crate::{
    db::{self, audit::AuditEntry},
    domain::access::AuditAction,
};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct AuditList {
    pub(crate) entries: Vec<AuditEntry>,
}

/// `GET /v1/audit` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditQuery {
    #[serde(default, deserialize_with = "optional")]
    pub(crate) limit: Option<i64>,
    #[serde(default, deserialize_with = "optional")]
    pub(crate) actor: Option<String>,
    #[serde(default, deserialize_with = "optional")]
    pub(crate) action: Option<AuditAction>,
}

/// Every change made through the API, the CLI or the console, newest first.
#[utoipa::path(get, path = "/v1/audit", operation_id = "list_audit_entries", tag = "audit", security(("bearer" = [])),
    params(("limit" = Option<i64>, Query, description = "1 to 500, default 50"),
        ("actor" = Option<String>, Query, description = "`key:<name>`, `operator:<name>` or `cli:<os user>`"),
        ("action" = Option<String>, Query, description = "e.g. `batch.retried`")),
    responses((status = 200, description = "Newest first", body = AuditList),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "forbidden (needs admin)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "validation_failed", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn list(
    State(state): State<AppState>,
    QueryParams(query): QueryParams<AuditQuery>,
) -> ApiResult<Json<AuditList>> {
    let limit = page_limit(query.limit)?;
    if query
        .actor
        .as_ref()
        .is_some_and(|a| a.len() > 200 || a.chars().any(char::is_control))
    {
        return Err(ApiError::Validation(
            "actor: must be at most 200 characters, without control characters".into(),
        ));
    }
    let entries = db::audit::list(&state.pool, query.actor.as_deref(), query.action, limit).await?;
    Ok(Json(AuditList { entries }))
}
