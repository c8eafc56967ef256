//! The console's pages and actions. Reads go through the same database functions as
//! the API and the CLI; every action is audit-logged as `operator:<name>`.

use std::{collections::BTreeMap, time::Duration};

use askama::Template;
use axum::{
    Json,
    extract::{FromRequestParts, Path, State},
    http::{Uri, header, request::Parts},
    response::{IntoResponse, Redirect, Response},
};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use uuid::Uuid;

use super::{
    session::{ConsoleForm, SignedIn},
    view::{Failure, Header, page},
};
use crate::{
    db::{
        self,
        batches::{BatchRow, Cancel, Retry, RetrySelection},
        console::RecentFailures,
        tasks::{self, DeadSelection, TaskCounts},
    },
    domain::{
        access::{Actor, AuditAction},
        states::{BatchStatus, ItemReason},
    },
    http::state::AppState,
};

/// The most rows a list page shows.
const LIST_LIMIT: i64 = 100;

/// A time as pages show it.
pub(super) fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// The query string's pairs, decoded leniently (a malformed pair is read as text, never
/// refused: the console's filters are only conveniences).
pub(super) fn query(uri: &Uri) -> BTreeMap<String, String> {
    form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

/// A batch id from the path; anything else is a page that does not exist.
pub(super) struct BatchId(Uuid);

impl<S: Send + Sync> FromRequestParts<S> for BatchId {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Failure> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| Failure::NotFound)?;
        Uuid::parse_str(&id)
            .map(BatchId)
            .map_err(|_| Failure::NotFound)
    }
}

/// A batch as the lists show it.
struct BatchLine {
    id: Uuid,
    job_id: String,
    status: &'static str,
    summary: String,
    total: i32,
    created_by: String,
    created_at: String,
}

impl From<&BatchRow> for BatchLine {
    fn from(b: &BatchRow) -> Self {
        BatchLine {
            id: b.id,
            job_id: b.job_id.clone(),
            status: b.status.as_str(),
            summary: db::batches::summary(b.sent, b.failed, b.skipped),
            total: b.total,
            created_by: b.created_by.clone().unwrap_or_else(|| "-".into()),
            created_at: when(b.created_at),
        }
    }
}

struct WorkerLine {
    name: String,
    last_seen: String,
    in_flight: i64,
}

struct FailureLine {
    reason: &'static str,
    reply_code: String,
    count: i64,
}

impl From<RecentFailures> for FailureLine {
    fn from(f: RecentFailures) -> Self {
        FailureLine {
            reason: f.reason.as_str(),
            reply_code: f.reply_code.unwrap_or_else(|| "-".into()),
            count: f.count,
        }
    }
}

#[derive(Template)]
#[template(path = "console/overview.html")]
struct OverviewPage {
    header: Header,
    tasks: TaskCounts,
    oldest_pending_age_secs: i64,
    sent_last_minute: i64,
    workers: Vec<WorkerLine>,
    running: Vec<BatchLine>,
    failures: Vec<FailureLine>,
}

fn alive_within(state: &AppState) -> Duration {
    Duration::from_secs(state.settings.worker.recover_after_secs)
}

/// The overview: the queue's figures, live workers, batches under way, and the last
/// day's failures by reason.
pub(super) async fn overview(
    State(state): State<AppState>,
    signed_in: SignedIn,
) -> Result<Response, Failure> {
    let queue = tasks::overview(&state.pool, alive_within(&state)).await?;
    let running = db::console::live_batches(&state.pool, LIST_LIMIT).await?;
    let failures = db::console::failures_last_day(&state.pool).await?;
    Ok(page(&OverviewPage {
        header: signed_in.header(),
        tasks: queue.tasks,
        oldest_pending_age_secs: queue.oldest_pending_age_secs,
        sent_last_minute: queue.sent_last_minute,
        workers: queue
            .workers
            .into_iter()
            .map(|w| WorkerLine {
                name: w.name,
                last_seen: when(w.last_seen),
                in_flight: w.in_flight,
            })
            .collect(),
        running: running.iter().map(BatchLine::from).collect(),
        failures: failures.into_iter().map(FailureLine::from).collect(),
    }))
}

/// The overview's live figures.
pub(super) async fn live_overview(
    State(state): State<AppState>,
    _: SignedIn,
) -> Result<Json<BTreeMap<String, String>>, Failure> {
    let queue = tasks::overview(&state.pool, alive_within(&state)).await?;
    let t = queue.tasks;
    let figures = [
        ("tasks.pending", t.pending),
        ("tasks.scheduled", t.scheduled),
        ("tasks.running", t.running),
        ("tasks.done", t.done),
        ("tasks.dead", t.dead),
        ("oldest_pending_age_secs", queue.oldest_pending_age_secs),
        ("sent_last_minute", queue.sent_last_minute),
    ];
    Ok(Json(
        figures
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_string()))
            .collect(),
    ))
}

#[derive(Template)]
#[template(path = "console/batches.html")]
struct BatchesPage {
    header: Header,
    job: String,
    /// Each status, and whether the filter names it.
    statuses: Vec<(&'static str, bool)>,
    batches: Vec<BatchLine>,
    limit: usize,
}

/// Batches, newest first, filtered by job and status.
pub(super) async fn batches(
    State(state): State<AppState>,
    signed_in: SignedIn,
    uri: Uri,
) -> Result<Response, Failure> {
    let q = query(&uri);
    let job = q
        .get("job")
        .map(|j| j.trim().to_owned())
        .unwrap_or_default();
    let status = q.get("status").and_then(|s| BatchStatus::parse(s));
    let rows = db::batches::list(
        &state.pool,
        Some(job.as_str()).filter(|j| !j.is_empty()),
        status,
        LIST_LIMIT,
    )
    .await?;
    Ok(page(&BatchesPage {
        header: signed_in.header(),
        job,
        statuses: BatchStatus::ALL
            .iter()
            .map(|s| (s.as_str(), Some(*s) == status))
            .collect(),
        batches: rows.iter().map(BatchLine::from).collect(),
        limit: usize::try_from(LIST_LIMIT).unwrap_or(usize::MAX),
    }))
}

struct ItemLine {
    candidate_id: String,
    name: String,
    email: String,
    status: &'static str,
    reason: &'static str,
    attempts: i32,
    last_reply: String,
}

struct GroupLine {
    reason: &'static str,
    reply_code: Option<String>,
    count: i64,
    candidate_ids: String,
}

#[derive(Template)]
#[template(path = "console/batch.html")]
struct BatchPage {
    header: Header,
    batch: BatchLine,
    counts: db::batches::Counts,
    can_cancel: bool,
    notice: Option<String>,
    groups: Vec<GroupLine>,
    items: Vec<ItemLine>,
}

/// What an action did, as the page it returns to says it.
pub(super) fn notice(q: &BTreeMap<String, String>) -> Option<String> {
    let n = q.get("n").and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
    let text = match q.get("done").map(String::as_str)? {
        "retried" => format!("Retrying {n} item(s)."),
        "nothing" => "No failed item matched: nothing was retried.".into(),
        "batch-cancelled" => "The batch is cancelled: its items cannot be retried.".into(),
        "cancelled" => "Cancelled: the pending items are skipped and their links revoked.".into(),
        "finished" => "The batch had finished already: nothing was cancelled.".into(),
        "busy" => "A send of this batch is still on its way: nothing was cancelled. Try again \
                   in a few minutes."
            .into(),
        "tasks-retried" => format!("{n} dead task(s) will run again."),
        "replayed" => "The event is queued for delivery again (same webhook-id).".into(),
        "disabled" => "The endpoint is disabled (it answered 410 Gone): nothing was sent.".into(),
        _ => return None,
    };
    Some(text)
}

/// One batch: its tally, failure groups (with *retry these*), cancel, and every item.
pub(super) async fn batch(
    State(state): State<AppState>,
    signed_in: SignedIn,
    BatchId(id): BatchId,
    uri: Uri,
) -> Result<Response, Failure> {
    let Some(row) = db::batches::get(&state.pool, id).await? else {
        return Err(Failure::NotFound);
    };
    let groups = db::batches::failure_groups(&state.pool, id).await?;
    let items = db::batches::items(&state.pool, id, None).await?;
    let header = signed_in.header();
    let view = BatchPage {
        batch: BatchLine::from(&row),
        counts: db::batches::Counts {
            pending: row.pending,
            sent: row.sent,
            failed: row.failed,
            skipped: row.skipped,
        },
        can_cancel: matches!(row.status, BatchStatus::Queued | BatchStatus::Running),
        notice: notice(&query(&uri)),
        groups: groups
            .into_iter()
            .map(|g| GroupLine {
                reason: g.reason.as_str(),
                reply_code: g.reply_code,
                count: g.count,
                candidate_ids: g.candidate_ids.join(", "),
            })
            .collect(),
        items: items
            .into_iter()
            .map(|i| ItemLine {
                email: header.address(&i.email),
                last_reply: header.reply(i.last_error.as_deref().unwrap_or_default()),
                candidate_id: i.candidate_id,
                name: i.name.unwrap_or_default(),
                status: i.status.as_str(),
                reason: i.reason.map(ItemReason::as_str).unwrap_or_default(),
                attempts: i.attempts,
            })
            .collect(),
        header,
    };
    Ok(page(&view))
}

/// One batch's live figures: its status and tally, and each item's status.
pub(super) async fn live_batch(
    State(state): State<AppState>,
    _: SignedIn,
    BatchId(id): BatchId,
) -> Result<Json<BTreeMap<String, String>>, Failure> {
    let Some(row) = db::batches::get(&state.pool, id).await? else {
        return Err(Failure::NotFound);
    };
    let items = db::batches::items(&state.pool, id, None).await?;
    let mut live = BTreeMap::new();
    live.insert("status".to_owned(), row.status.to_string());
    live.insert("counts.pending".to_owned(), row.pending.to_string());
    live.insert("counts.sent".to_owned(), row.sent.to_string());
    live.insert("counts.failed".to_owned(), row.failed.to_string());
    live.insert("counts.skipped".to_owned(), row.skipped.to_string());
    live.insert(
        "summary".to_owned(),
        db::batches::summary(row.sent, row.failed, row.skipped),
    );
    for i in items {
        let reason = i.reason.map(ItemReason::as_str).unwrap_or_default();
        live.insert(
            format!("item.{}.status", i.candidate_id),
            i.status.to_string(),
        );
        live.insert(format!("item.{}.reason", i.candidate_id), reason.to_owned());
        live.insert(
            format!("item.{}.attempts", i.candidate_id),
            i.attempts.to_string(),
        );
    }
    Ok(Json(live))
}

#[derive(Deserialize)]
pub(super) struct RetryForm {
    csrf: Option<String>,
    /// A reason for failing; none retries every failed item.
    #[serde(default)]
    reason: Option<String>,
}

fn back_to_batch(id: Uuid, done: &str, n: usize) -> Response {
    Redirect::to(&format!("/console/batches/{id}?done={done}&n={n}")).into_response()
}

/// *Retry these*: the failed items of one reason (or all) back through the queue.
pub(super) async fn retry(
    State(state): State<AppState>,
    signed_in: SignedIn,
    BatchId(id): BatchId,
    ConsoleForm(form): ConsoleForm<RetryForm>,
) -> Result<Response, Failure> {
    signed_in.may_act(form.csrf.as_deref())?;
    let selection = match form.reason.as_deref().filter(|r| !r.is_empty()) {
        None => RetrySelection::All,
        Some(r) => match ItemReason::parse(r).map(RetrySelection::reason) {
            Some(Ok(selection)) => selection,
            _ => return Ok(back_to_batch(id, "nothing", 0)),
        },
    };
    let actor = Actor::operator(&signed_in.session.name);
    match tasks::retry_batch(&state.pool, id, &selection, false, &actor).await? {
        Retry::Retried(_, tasks) => {
            tracing::info!(batch = %id, items = tasks.len(), "failed items retried from the console");
            Ok(back_to_batch(id, "retried", tasks.len()))
        }
        Retry::NotFound => Err(Failure::NotFound),
        Retry::Cancelled => Ok(back_to_batch(id, "batch-cancelled", 0)),
        Retry::NotRetryable(_) | Retry::DryRun(_) => Ok(back_to_batch(id, "nothing", 0)),
    }
}

#[derive(Deserialize)]
pub(super) struct CsrfForm {
    csrf: Option<String>,
}

/// Cancels the batch, as `POST /v1/batches/{id}/cancel` does.
pub(super) async fn cancel(
    State(state): State<AppState>,
    signed_in: SignedIn,
    BatchId(id): BatchId,
    ConsoleForm(form): ConsoleForm<CsrfForm>,
) -> Result<Response, Failure> {
    signed_in.may_act(form.csrf.as_deref())?;
    let actor = Actor::operator(&signed_in.session.name);
    let window = state.settings.cancel_window();
    let done = match db::batches::cancel(&state.pool, id, window, &actor).await? {
        Cancel::Cancelled(_) => {
            tracing::info!(batch = %id, "batch cancelled from the console");
            "cancelled"
        }
        Cancel::NotFound => return Err(Failure::NotFound),
        Cancel::AlreadyFinished(_) => "finished",
        Cancel::SendsInFlight => "busy",
    };
    Ok(back_to_batch(id, done, 0))
}

struct DeadLine {
    id: String,
    item_id: String,
    status: String,
    attempts: i32,
    died_at: String,
    last_result: String,
}

#[derive(Template)]
#[template(path = "console/dead.html")]
struct DeadPage {
    header: Header,
    notice: Option<String>,
    tasks: Vec<DeadLine>,
}

/// Tasks the queue gave up on.
pub(super) async fn dead(
    State(state): State<AppState>,
    signed_in: SignedIn,
    uri: Uri,
) -> Result<Response, Failure> {
    let dead = tasks::dead_tasks(&state.pool, LIST_LIMIT).await?;
    let header = signed_in.header();
    let tasks = dead
        .into_iter()
        .map(|t| DeadLine {
            id: t.id,
            item_id: t.item_id.map(|i| i.to_string()).unwrap_or_default(),
            status: t.status,
            attempts: t.attempts,
            died_at: t.died_at.map(when).unwrap_or_default(),
            last_result: header.reply(&t.last_result.map(|r| r.to_string()).unwrap_or_default()),
        })
        .collect();
    Ok(page(&DeadPage {
        notice: notice(&query(&uri)),
        header,
        tasks,
    }))
}

#[derive(Deserialize)]
pub(super) struct DeadRetryForm {
    csrf: Option<String>,
}

/// Runs every dead task again, as `POST /v1/queue/dead/retry {"all": true}` does.
pub(super) async fn retry_dead(
    State(state): State<AppState>,
    signed_in: SignedIn,
    ConsoleForm(form): ConsoleForm<DeadRetryForm>,
) -> Result<Response, Failure> {
    signed_in.may_act(form.csrf.as_deref())?;
    let actor = Actor::operator(&signed_in.session.name);
    let retried = tasks::retry_dead_tasks(&state.pool, &DeadSelection::All, &actor).await?;
    tracing::info!(retried, "dead tasks retried from the console");
    Ok(Redirect::to(&format!("/console/dead?done=tasks-retried&n={retried}")).into_response())
}

struct AuditLine {
    at: String,
    actor: String,
    action: String,
    target: String,
    detail: String,
}

#[derive(Template)]
#[template(path = "console/audit.html")]
struct AuditPage {
    header: Header,
    actor: String,
    /// Each action, and whether the filter names it.
    actions: Vec<(&'static str, bool)>,
    entries: Vec<AuditLine>,
}

/// The audit log, newest first, filtered by actor and action.
pub(super) async fn audit(
    State(state): State<AppState>,
    signed_in: SignedIn,
    uri: Uri,
) -> Result<Response, Failure> {
    let q = query(&uri);
    let actor = q
        .get("actor")
        .map(|a| a.trim().to_owned())
        .unwrap_or_default();
    let action = q
        .get("action")
        .and_then(|a| AuditAction::ALL.iter().copied().find(|x| x.as_str() == a));
    let entries = db::audit::list(
        &state.pool,
        Some(actor.as_str()).filter(|a| !a.is_empty()),
        action,
        LIST_LIMIT,
    )
    .await?;
    let header = signed_in.header();
    let entries = entries
        .into_iter()
        .map(|e| AuditLine {
            at: when(e.at),
            actor: e.actor,
            action: e.action,
            target: e.target,
            detail: header.reply(&e.detail.to_string()),
        })
        .collect();
    Ok(page(&AuditPage {
        header,
        actor,
        actions: AuditAction::ALL
            .iter()
            .map(|a| (a.as_str(), Some(*a) == action))
            .collect(),
        entries,
    }))
}

/// The console's style sheet.
pub(super) async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("assets/console.css"),
    )
        .into_response()
}

/// The console's one script: live figures.
pub(super) async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/console.js"),
    )
        .into_response()
}

pub(super) async fn not_found() -> Failure {
    Failure::NotFound
}
