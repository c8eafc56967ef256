//! Batches: create (one statement with the queue tasks), preview, read, list, list
//! items, retry, cancel.

use std::collections::HashSet;

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    access::Caller,
    error::{ApiError, ApiResult, Problem},
    extract::{
        JsonBody, OptionalJsonBody, PathUuid, QueryParams, optional, page_limit, request_id,
    },
    state::AppState,
};
use crate::{
    config::Settings,
    db::{
        self,
        batches::{
            BatchRow, BatchView, Cancel, FailureGroup, ItemView, NewBatch, NewItem, NewWarning,
            Retry, RetrySelection,
        },
        tasks::{self, Created},
    },
    domain::{
        email::CandidateEmail,
        ids::{ExternalId, new_task_id},
        states::{BatchStatus, ItemReason, ItemStatus, JobStatus, OnDuplicate, WarningCode},
        warning::Warning,
    },
};

/// The longest name and email string accepted (longer is a validation error).
const MAX_NAME_CHARS: usize = 256;
const MAX_EMAIL_CHARS: usize = 1024;

/// `POST /v1/batches` (and `/v1/batches/preview`) body.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchRequest {
    pub(crate) job_id: String,
    pub(crate) duration_minutes: i64,
    pub(crate) candidates: Vec<CandidateInput>,
    #[serde(default)]
    pub(crate) expected_count: Option<i64>,
    #[serde(default)]
    pub(crate) on_duplicate: Option<OnDuplicate>,
}

#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CandidateInput {
    pub(crate) id: String,
    pub(crate) email: String,
    #[serde(default)]
    pub(crate) name: Option<String>,
}

/// One candidate that passed the checks that need no database.
#[derive(Debug, Clone)]
pub(crate) struct CheckedCandidate {
    pub(crate) id: ExternalId,
    pub(crate) email: String,
    pub(crate) name: Option<String>,
    /// Why the address cannot be sent to, when it cannot.
    pub(crate) email_problem: Option<String>,
}

/// A request that passed every check that needs no database, in the order a person
/// fixes them: shape, size, count, duplicates, duration.
#[derive(Debug, Clone)]
pub(crate) struct CheckedBatch {
    pub(crate) job_id: ExternalId,
    pub(crate) duration_minutes: i32,
    pub(crate) on_duplicate: OnDuplicate,
    pub(crate) candidates: Vec<CheckedCandidate>,
}

pub(crate) fn check(req: &BatchRequest, settings: &Settings) -> ApiResult<CheckedBatch> {
    let job_id = ExternalId::parse(&req.job_id)
        .map_err(|why| ApiError::Validation(format!("job_id: {why}")))?;
    let mut candidates = Vec::with_capacity(req.candidates.len());
    for (i, c) in req.candidates.iter().enumerate() {
        let id = ExternalId::parse(&c.id)
            .map_err(|why| ApiError::Validation(format!("candidates[{i}].id: {why}")))?;
        if c.email.chars().count() > MAX_EMAIL_CHARS {
            return Err(ApiError::Validation(format!(
                "candidates[{i}].email: must be at most {MAX_EMAIL_CHARS} characters"
            )));
        }
        if c.name
            .as_ref()
            .is_some_and(|n| n.chars().count() > MAX_NAME_CHARS)
        {
            return Err(ApiError::Validation(format!(
                "candidates[{i}].name: must be at most {MAX_NAME_CHARS} characters"
            )));
        }
        candidates.push(CheckedCandidate {
            id,
            email: c.email.clone(),
            name: c.name.clone(),
            email_problem: CandidateEmail::parse(&c.email).err().map(|e| e.to_string()),
        });
    }

    let count = candidates.len();
    if count == 0 {
        return Err(ApiError::EmptyBatch);
    }
    let max = settings.batch.max_size;
    if count > max {
        return Err(ApiError::BatchTooLarge {
            count,
            max,
            batches: count.div_ceil(max),
        });
    }
    if let Some(expected) = req.expected_count
        && usize::try_from(expected).ok() != Some(count)
    {
        return Err(ApiError::CountMismatch {
            expected,
            actual: count,
        });
    }
    let mut seen = HashSet::with_capacity(count);
    let mut repeated: Vec<String> = Vec::new();
    for c in &candidates {
        if !seen.insert(c.id.as_str()) && !repeated.iter().any(|r| r == c.id.as_str()) {
            repeated.push(c.id.to_string());
        }
    }
    if !repeated.is_empty() {
        return Err(ApiError::DuplicateCandidates(repeated));
    }
    let allowed = &settings.batch.durations_minutes;
    let duration = u32::try_from(req.duration_minutes)
        .ok()
        .filter(|d| allowed.contains(d))
        .ok_or_else(|| ApiError::InvalidDuration {
            got: req.duration_minutes,
            allowed: allowed
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    Ok(CheckedBatch {
        job_id,
        duration_minutes: i32::try_from(duration).unwrap_or(i32::MAX),
        on_duplicate: req.on_duplicate.unwrap_or(OnDuplicate::Skip),
        candidates,
    })
}

/// Checks that the job exists and is open, and returns the candidates among `batch`'s
/// who already hold a live invitation for it. One statement, no lock: what it answers
/// is what a send would do now (the create statement checks again as it writes).
pub(crate) async fn invited_candidates_of_open_job(
    conn: &mut sqlx::PgConnection,
    batch: &CheckedBatch,
) -> ApiResult<HashSet<String>> {
    let ids: Vec<&str> = batch.candidates.iter().map(|c| c.id.as_str()).collect();
    let job_id = &batch.job_id;
    match db::batches::job_status_and_invited(conn, job_id.as_str(), &ids).await? {
        None => Err(ApiError::JobNotFound(job_id.to_string())),
        Some((JobStatus::Closed, _)) => Err(ApiError::JobClosed(job_id.to_string())),
        Some((JobStatus::Open, invited)) => Ok(invited.into_iter().collect()),
    }
}

/// What a person should read before (preview) or after (create) sending: candidates
/// who already hold a live invitation for the job (`invited`), and addresses that
/// will fail.
pub(crate) fn warnings(batch: &CheckedBatch, invited: &HashSet<String>) -> Vec<Warning> {
    possible_warnings(batch)
        .into_iter()
        .filter(|w| !w.if_invited || invited.contains(&w.warning.candidate_id))
        .map(|w| w.warning)
        .collect()
}

/// Every warning the batch may get, in candidate order: an address that will fail
/// always; otherwise `already_invited`, which applies if the candidate holds a live
/// invitation for the job (decided by [`warnings`], or by the statement that writes
/// the batch).
fn possible_warnings(batch: &CheckedBatch) -> Vec<NewWarning> {
    let then = match batch.on_duplicate {
        OnDuplicate::Skip => "it will be skipped (on_duplicate: skip)",
        OnDuplicate::Send => "it will be sent anyway (on_duplicate: send)",
    };
    batch
        .candidates
        .iter()
        .map(|c| match &c.email_problem {
            Some(problem) => NewWarning {
                warning: Warning {
                    candidate_id: c.id.to_string(),
                    code: WarningCode::InvalidEmail,
                    message: format!("{:?} cannot be emailed: {problem}", c.email),
                },
                if_invited: false,
            },
            None => NewWarning {
                warning: Warning {
                    candidate_id: c.id.to_string(),
                    code: WarningCode::AlreadyInvited,
                    message: format!(
                        "{} already holds a pending or in-progress invitation for {}; {then}",
                        c.id, batch.job_id
                    ),
                },
                if_invited: true,
            },
        })
        .collect()
}

fn accepted(batch: BatchView) -> Response {
    let location = format!("/v1/batches/{}", batch.id);
    let mut response = (StatusCode::ACCEPTED, Json(batch)).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// The `Idempotency-Key` header: 1 to 255 printable ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| (0x20..0x7f).contains(&b)))
        .ok_or_else(|| {
            ApiError::Validation(
                "Idempotency-Key: must be 1 to 255 printable ASCII characters".into(),
            )
        })?;
    Ok(Some(key.to_owned()))
}

/// A fingerprint of what the request asks for: the same body (whatever its key order
/// or spacing) hashes the same; `on_duplicate` absent and `"skip"` are the same request.
fn request_hash(req: &BatchRequest) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut normal = req.clone();
    normal.on_duplicate = Some(normal.on_duplicate.unwrap_or(OnDuplicate::Skip));
    let bytes = serde_json::to_vec(&normal).unwrap_or_default();
    Sha256::digest(bytes).to_vec()
}

/// The answer to a request whose key was seen before: the same batch, or 422 when
/// the key came with a different body.
fn replay(existing: BatchRow, hash: &[u8]) -> ApiResult<Response> {
    if existing.request_hash.as_deref() != Some(hash) {
        return Err(ApiError::IdempotencyKeyReused);
    }
    let mut response = accepted(existing.into());
    response
        .headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    Ok(response)
}

/// `POST /v1/batches`: the batch, its items and one queue task per item, in one
/// statement (`db::tasks::create_batch`); a request that fails any check writes nothing. With an
/// `Idempotency-Key`, a repeat (also a concurrent one) gets the same batch back.
#[utoipa::path(post, path = "/v1/batches", tag = "batches", security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "1 to 255 printable ASCII; a repeat with the same body returns the same batch")),
    request_body = BatchRequest,
    responses((status = 202, description = "Accepted: the batch, its items and their queue tasks exist", body = BatchView,
            headers(("Location" = String, description = "/v1/batches/{id}"))),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"), (status = 403, description = "forbidden: the key lacks the route's scope", body = Problem, content_type = "application/problem+json"), (status = 404, description = "job_not_found", body = Problem, content_type = "application/problem+json"), (status = 409, description = "job_closed", body = Problem, content_type = "application/problem+json"), (status = 413, description = "payload_too_large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "unsupported_media_type", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "validation_failed, batch_too_large, empty_batch, count_mismatch, duplicate_candidates, invalid_duration, idempotency_key_reused", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    JsonBody(req): JsonBody<BatchRequest>,
) -> ApiResult<Response> {
    let key = idempotency_key(&headers)?;
    let hash = key.as_ref().map(|_| request_hash(&req));
    if let (Some(key), Some(hash)) = (&key, &hash)
        && let Some(existing) =
            db::batches::find_by_idempotency_key(&state.pool, &caller.name, key).await?
    {
        return replay(existing, hash);
    }

    let checked = check(&req, &state.settings)?;
    let items: Vec<NewItem> = checked
        .candidates
        .iter()
        .map(|c| NewItem {
            id: Uuid::now_v7(),
            task_id: new_task_id(),
            candidate_id: c.id.to_string(),
            email: c.email.clone(),
            name: c.name.clone(),
            email_error: c.email_problem.clone(),
        })
        .collect();
    let batch = NewBatch {
        id: Uuid::now_v7(),
        job_id: checked.job_id.to_string(),
        duration_minutes: checked.duration_minutes,
        on_duplicate: checked.on_duplicate,
        items,
        warnings: possible_warnings(&checked),
        idempotency_key: key.clone(),
        request_hash: hash.clone(),
        request_id: request_id(&headers),
        created_by: caller.name.to_string(),
        actor: caller.actor(),
    };
    let mut conn = state.pool.acquire().await?;
    let row = match tasks::create_batch(&mut conn, &batch).await {
        Ok(Created::Batch(row)) => row,
        Ok(Created::JobNotFound) => return Err(ApiError::JobNotFound(checked.job_id.to_string())),
        Ok(Created::JobClosed) => return Err(ApiError::JobClosed(checked.job_id.to_string())),
        Err(e) if db::batches::is_idempotency_conflict(&e) => {
            // A concurrent request with the same key committed first: answer as it did.
            let (Some(key), Some(hash)) = (&key, &hash) else {
                return Err(e.into());
            };
            let existing = db::batches::find_by_idempotency_key(&mut *conn, &caller.name, key)
                .await?
                .ok_or_else(|| {
                    ApiError::Internal(anyhow::anyhow!("idempotency conflict without a batch"))
                })?;
            return replay(existing, hash);
        }
        Err(e) => return Err(e.into()),
    };
    metrics::counter!("batches_created_total").increment(1);
    tracing::info!(batch = %row.id, job = %row.job_id, total = row.total, "batch enqueued");
    Ok(accepted(row.into()))
}

/// `POST /v1/batches/preview`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Preview {
    pub(crate) total: usize,
    pub(crate) to_send: usize,
    pub(crate) to_skip: usize,
    pub(crate) to_fail: usize,
    pub(crate) warnings: Vec<Warning>,
}

/// Every check of a real send, and what would happen to each candidate; writes nothing.
#[utoipa::path(post, path = "/v1/batches/preview", tag = "batches", security(("bearer" = [])),
    request_body = BatchRequest,
    responses((status = 200, description = "What a send would do; nothing written", body = Preview),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"), (status = 403, description = "forbidden: the key lacks the route's scope", body = Problem, content_type = "application/problem+json"), (status = 404, description = "job_not_found", body = Problem, content_type = "application/problem+json"), (status = 409, description = "job_closed", body = Problem, content_type = "application/problem+json"), (status = 413, description = "payload_too_large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "unsupported_media_type", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "validation_failed, batch_too_large, empty_batch, count_mismatch, duplicate_candidates, invalid_duration", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn preview(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<BatchRequest>,
) -> ApiResult<Json<Preview>> {
    let checked = check(&req, &state.settings)?;
    let mut conn = state.pool.acquire().await?;
    let invited = invited_candidates_of_open_job(&mut conn, &checked).await?;
    let warnings = warnings(&checked, &invited);
    let total = checked.candidates.len();
    let to_fail = checked
        .candidates
        .iter()
        .filter(|c| c.email_problem.is_some())
        .count();
    let to_skip = match checked.on_duplicate {
        OnDuplicate::Skip => checked
            .candidates
            .iter()
            .filter(|c| c.email_problem.is_none() && invited.contains(c.id.as_str()))
            .count(),
        OnDuplicate::Send => 0,
    };
    Ok(Json(Preview {
        total,
        to_send: total - to_fail - to_skip,
        to_skip,
        to_fail,
        warnings,
    }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct BatchList {
    pub(crate) batches: Vec<BatchView>,
}

/// `GET /v1/batches` query: every parameter optional, empty means absent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    #[serde(default, deserialize_with = "optional")]
    pub(crate) job_id: Option<ExternalId>,
    #[serde(default, deserialize_with = "optional")]
    pub(crate) status: Option<BatchStatus>,
    #[serde(default, deserialize_with = "optional")]
    pub(crate) limit: Option<i64>,
}

/// `GET /v1/batches?job_id=&status=&limit=`, newest first.
#[utoipa::path(get, path = "/v1/batches", operation_id = "list_batches", tag = "batches", security(("bearer" = [])),
    params(("job_id" = Option<String>, Query), ("status" = Option<BatchStatus>, Query),
        ("limit" = Option<i64>, Query, description = "1 to 500, default 50")),
    responses((status = 200, description = "Newest first", body = BatchList), (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"), (status = 403, description = "forbidden: the key lacks the route's scope", body = Problem, content_type = "application/problem+json"), (status = 422, description = "validation_failed", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn list(
    State(state): State<AppState>,
    QueryParams(query): QueryParams<ListQuery>,
) -> ApiResult<Json<BatchList>> {
    let limit = page_limit(query.limit)?;
    let rows = db::batches::list(
        &state.pool,
        query.job_id.as_ref().map(ExternalId::as_str),
        query.status,
        limit,
    )
    .await?;
    Ok(Json(BatchList {
        batches: rows.into_iter().map(BatchView::from).collect(),
    }))
}

/// `POST /v1/batches/{id}/retry` body: every failed item (no body, or no selection),
/// the candidates listed, or the failed items of one reason; with `dry_run`, only what
/// a retry would do.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetryRequest {
    #[serde(default)]
    pub(crate) candidates: Option<Vec<RetryCandidate>>,
    /// Only the failed items with this reason: `invalid_email`, `rejected`,
    /// `retries_exhausted` or `suppressed`.
    #[serde(default)]
    pub(crate) reason: Option<ItemReason>,
    /// Answer which candidates would be retried (200 `RetryDryRun`); change nothing.
    #[serde(default)]
    pub(crate) dry_run: bool,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetryCandidate {
    pub(crate) id: String,
    /// A corrected address; it replaces the candidate's email.
    #[serde(default)]
    pub(crate) email: Option<String>,
}

/// What a retry would do (`dry_run`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct RetryDryRun {
    pub(crate) would_retry: usize,
    /// In the batch's order.
    pub(crate) candidate_ids: Vec<String>,
}

/// The items a retry request selects, checked.
fn retry_selection(body: RetryRequest) -> ApiResult<RetrySelection> {
    match (body.candidates, body.reason) {
        (Some(_), Some(_)) => Err(ApiError::Validation(
            "give either candidates or reason, not both".into(),
        )),
        (None, None) => Ok(RetrySelection::All),
        (None, Some(reason)) => RetrySelection::reason(reason).map_err(ApiError::Validation),
        (Some(candidates), None) => {
            if candidates.is_empty() {
                return Err(ApiError::Validation(
                    "candidates: must list at least one candidate".into(),
                ));
            }
            let mut list = Vec::with_capacity(candidates.len());
            for (i, c) in candidates.into_iter().enumerate() {
                if let Err(why) = ExternalId::parse(&c.id) {
                    return Err(ApiError::Validation(format!("candidates[{i}].id: {why}")));
                }
                if let Some(email) = &c.email
                    && let Err(e) = CandidateEmail::parse(email)
                {
                    return Err(ApiError::Validation(format!("candidates[{i}].email: {e}")));
                }
                list.push(db::batches::RetryItem {
                    candidate_id: c.id,
                    email: c.email.map(|e| e.trim().to_owned()),
                });
            }
            // Each item is retried once: a repeated id would count it twice.
            let mut seen = std::collections::HashSet::new();
            let mut repeated: Vec<String> = Vec::new();
            for item in &list {
                if !seen.insert(item.candidate_id.as_str())
                    && !repeated.contains(&item.candidate_id)
                {
                    repeated.push(item.candidate_id.clone());
                }
            }
            if !repeated.is_empty() {
                return Err(ApiError::DuplicateCandidates(repeated));
            }
            Ok(RetrySelection::Candidates(list))
        }
    }
}

/// Puts failed items (all, the ones listed, or one reason's) back through the queue, in
/// one transaction with the audit entry; with `dry_run`, only says which.
#[utoipa::path(post, path = "/v1/batches/{id}/retry", tag = "batches", security(("bearer" = [])),
    params(("id" = Uuid, Path)), request_body(content = Option<RetryRequest>, description = "Omit to retry every failed item"),
    responses((status = 202, description = "Failed items are pending again", body = BatchView),
        (status = 200, description = "dry_run: what a retry would do; nothing changed", body = RetryDryRun),
        (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"), (status = 403, description = "forbidden: the key lacks the route's scope", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "not_found", body = Problem, content_type = "application/problem+json"), (status = 409, description = "not_retryable, invalid_transition", body = Problem, content_type = "application/problem+json"), (status = 415, description = "unsupported_media_type", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "validation_failed", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn retry(
    State(state): State<AppState>,
    caller: Caller,
    PathUuid(id): PathUuid,
    OptionalJsonBody(body): OptionalJsonBody<RetryRequest>,
) -> ApiResult<Response> {
    let body = body.unwrap_or_default();
    let dry_run = body.dry_run;
    let selection = retry_selection(body)?;
    let retry = tasks::retry_batch(&state.pool, id, &selection, dry_run, &caller.actor())
        .await
        .map_err(ApiError::Internal)?;
    match retry {
        Retry::NotFound => Err(ApiError::NotFound(format!("no batch with id {id}"))),
        Retry::Cancelled => Err(ApiError::InvalidTransition(format!(
            "batch {id} is cancelled: its items cannot be retried"
        ))),
        Retry::NotRetryable(ids) if ids.is_empty() => Err(ApiError::NotRetryable(vec![
            "(none: the batch has no failed items to retry)".into(),
        ])),
        Retry::NotRetryable(ids) => Err(ApiError::NotRetryable(ids)),
        Retry::DryRun(candidate_ids) => Ok(Json(RetryDryRun {
            would_retry: candidate_ids.len(),
            candidate_ids,
        })
        .into_response()),
        Retry::Retried(row, tasks) => {
            tracing::info!(batch = %id, items = tasks.len(), "failed items retried");
            Ok(accepted(row.into()))
        }
    }
}

/// Skips every pending item (`cancelled`) and revokes their links; sent items stay
/// sent. Waits for sends already on their way so each ends as what really happened.
#[utoipa::path(post, path = "/v1/batches/{id}/cancel", tag = "batches", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses((status = 200, description = "Cancelled", body = BatchView), (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"), (status = 403, description = "forbidden: the key lacks the route's scope", body = Problem, content_type = "application/problem+json"), (status = 404, description = "not_found", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "invalid_transition", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    PathUuid(id): PathUuid,
) -> ApiResult<Json<BatchView>> {
    let window = state.settings.cancel_window();
    match db::batches::cancel(&state.pool, id, window, &caller.actor()).await? {
        Cancel::Cancelled(row) => {
            tracing::info!(batch = %id, "batch cancelled");
            Ok(Json(row.into()))
        }
        Cancel::NotFound => Err(ApiError::NotFound(format!("no batch with id {id}"))),
        Cancel::AlreadyFinished(status) => Err(ApiError::InvalidTransition(format!(
            "batch {id} is {status}: only a queued or running batch can be cancelled"
        ))),
        // A send still marked on its way past every timeout: its worker died mid-send
        // (maintenance frees the item within minutes). Nothing was changed.
        Cancel::SendsInFlight => Err(ApiError::InvalidTransition(format!(
            "a send of batch {id} is still on its way (its worker may have stopped \
             mid-send); nothing was cancelled: try again in a few minutes"
        ))),
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct FailureGroups {
    /// Largest group first.
    pub(crate) groups: Vec<FailureGroup>,
}

/// The batch's failed items grouped by reason and SMTP reply code.
#[utoipa::path(get, path = "/v1/batches/{id}/failures", operation_id = "list_failure_groups", tag = "batches", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses((status = 200, description = "Failure groups, largest first; at most 20 candidate ids each", body = FailureGroups), (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"), (status = 403, description = "forbidden: the key lacks the route's scope", body = Problem, content_type = "application/problem+json"), (status = 404, description = "not_found", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn failures(
    State(state): State<AppState>,
    PathUuid(id): PathUuid,
) -> ApiResult<Json<FailureGroups>> {
    if db::batches::get(&state.pool, id).await?.is_none() {
        return Err(ApiError::NotFound(format!("no batch with id {id}")));
    }
    let groups = db::batches::failure_groups(&state.pool, id).await?;
    Ok(Json(FailureGroups { groups }))
}

#[utoipa::path(get, path = "/v1/batches/{id}", operation_id = "get_batch", tag = "batches", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses((status = 200, description = "The batch", body = BatchView), (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"), (status = 403, description = "forbidden: the key lacks the route's scope", body = Problem, content_type = "application/problem+json"), (status = 404, description = "not_found", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn get(
    State(state): State<AppState>,
    PathUuid(id): PathUuid,
) -> ApiResult<Json<BatchView>> {
    db::batches::get(&state.pool, id)
        .await?
        .map(|b| Json(b.into()))
        .ok_or_else(|| ApiError::NotFound(format!("no batch with id {id}")))
}

/// `GET /v1/batches/{id}/items` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ItemsQuery {
    #[serde(default, deserialize_with = "optional")]
    pub(crate) status: Option<ItemStatus>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ItemList {
    pub(crate) items: Vec<ItemView>,
}

#[utoipa::path(get, path = "/v1/batches/{id}/items", tag = "batches", security(("bearer" = [])),
    params(("id" = Uuid, Path), ("status" = Option<ItemStatus>, Query)),
    responses((status = 200, description = "The items, in request order", body = ItemList), (status = 401, description = "unauthorized", body = Problem, content_type = "application/problem+json"), (status = 403, description = "forbidden: the key lacks the route's scope", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "not_found", body = Problem, content_type = "application/problem+json"), (status = 422, description = "validation_failed", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn items(
    State(state): State<AppState>,
    PathUuid(id): PathUuid,
    QueryParams(query): QueryParams<ItemsQuery>,
) -> ApiResult<Json<ItemList>> {
    let status = query.status;
    if db::batches::get(&state.pool, id).await?.is_none() {
        return Err(ApiError::NotFound(format!("no batch with id {id}")));
    }
    let items = db::batches::items(&state.pool, id, status).await?;
    Ok(Json(ItemList { items }))
}
