//! The queue's table, `apalis.jobs`: every statement that reads or writes it is here, so
//! an upgrade of apalis (pinned exactly) has one module to check.
//!
//! apalis-postgres owns the table and runs the fetch, heartbeat and orphan-recovery
//! queries itself. This crate writes tasks in apalis' own format and finishes them:
//! - a new batch's tasks are written by the statement that writes the batch
//!   ([`create_batch`]), a retry's with apalis' own push ([`push`]);
//! - a task is marked `Done` by the statement that records its outcome
//!   ([`record_outcomes`]), or ended by [`finish_task`] (apalis' acks are off: see
//!   `queue::worker`);
//! - maintenance gives stranded items a new task, rescues tasks taken long ago and never
//!   finished, and deletes finished tasks (apalis never does).

use std::time::Duration;

use apalis_core::task::{builder::TaskBuilder, task_id::TaskId};
use apalis_postgres::PgTask;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{FromRow, PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::{
    db::{
        audit,
        batches::{self, BatchRow, NewBatch, Retry, RetrySelection},
    },
    domain::{
        access::{Actor, AuditAction},
        ids::new_task_id,
        states::{AttemptOutcome, ItemReason, ItemStatus},
    },
};

/// The apalis queue (`apalis.jobs.job_type`) that send-invite tasks live in.
pub const QUEUE: &str = "invite-worker::send-invite";

/// How many times apalis itself runs a task again after its handler returned an error
/// (a database fault; a mail server's transient failure is retried by a new task).
pub(crate) const TASK_MAX_ATTEMPTS: usize = 10;

/// The payload of a send-invite task: ids only; the handler reloads everything else.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct SendInvite {
    pub(crate) item_id: Uuid,
}

/// A send-invite task's stored payload (`apalis.jobs.job`).
pub fn payload(item_id: Uuid) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&SendInvite { item_id })
}

/// A task to push: which item, under which task id, and how long from now.
pub struct NewTask<'a> {
    pub task_id: &'a str,
    pub item_id: Uuid,
    pub run_after: Option<Duration>,
}

/// Pushes send-invite tasks on `conn` (normally an open transaction, so the tasks exist
/// exactly when the rows that need them do) with apalis-postgres' own push: one INSERT
/// for all of them.
pub async fn push(conn: &mut PgConnection, tasks: &[NewTask<'_>]) -> anyhow::Result<()> {
    let mut built: Vec<PgTask> = Vec::with_capacity(tasks.len());
    for t in tasks {
        let payload = payload(t.item_id)?;
        let id = ulid::Ulid::from_string(t.task_id)?;
        let mut builder = TaskBuilder::new(payload)
            .task_id(TaskId::from_ulid(id))
            .max_attempts(TASK_MAX_ATTEMPTS);
        if let Some(delay) = t.run_after {
            builder = builder.run_after(delay);
        }
        built.push(builder.build());
    }
    apalis_postgres::queries::push_tasks(conn, QUEUE, built).await?;
    Ok(())
}

/// How a task ended that no outcome finished (see [`record_outcomes`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum TaskEnd<'a> {
    /// Nothing to do (its item was terminal, or another task's).
    Done,
    /// Undecodable: never run again.
    Killed(&'a str),
    /// A database fault: apalis runs it again after `attempts` seconds, up to the task's
    /// `max_attempts` (then maintenance gives the item a new task).
    Failed(&'a str),
}

/// Writes how a task ended, in place of apalis' own ack. Only a task still taken changes.
pub(crate) async fn finish_task(
    conn: &mut PgConnection,
    task_id: &str,
    end: TaskEnd<'_>,
) -> sqlx::Result<()> {
    let (status, result) = match end {
        TaskEnd::Done => ("Done", serde_json::json!({ "Ok": null })),
        TaskEnd::Killed(why) => ("Killed", serde_json::json!({ "Err": why })),
        TaskEnd::Failed(why) => ("Failed", serde_json::json!({ "Err": why })),
    };
    sqlx::query(include_str!("sql/finish_task.sql"))
        .bind(task_id)
        .bind(status)
        .bind(sqlx::types::Json(result))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// What [`create_batch`] did.
#[derive(Debug)]
pub(crate) enum Created {
    Batch(BatchRow),
    JobNotFound,
    /// Nothing written.
    JobClosed,
}

/// Writes the batch, its items and one queue task per item if the job is open: one
/// statement (`sql/create_batch.sql`), so all of it or nothing, and (run outside a
/// transaction) one round trip with its commit. The job row is locked `FOR SHARE`
/// meanwhile, so a concurrent close waits for the batch or the batch sees the close.
/// The batch keeps the warnings that apply: each unconditional one, and each
/// `if_invited` one whose candidate holds a live invitation for the job. The audit
/// log's `batch.created` entry is written by the same statement.
pub(crate) async fn create_batch(
    conn: &mut PgConnection,
    batch: &NewBatch,
) -> sqlx::Result<Created> {
    let total = i32::try_from(batch.items.len()).unwrap_or(i32::MAX);
    let (items, warnings) = (&batch.items, &batch.warnings);
    let payloads = items
        .iter()
        .map(|i| payload(i.id))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let max_attempts = i32::try_from(TASK_MAX_ATTEMPTS).unwrap_or(i32::MAX);
    let row = sqlx::query(CREATE_BATCH)
        .bind(batch.id)
        .bind(&batch.job_id)
        .bind(batch.duration_minutes)
        .bind(batch.on_duplicate)
        .bind(total)
        .bind(
            warnings
                .iter()
                .map(|w| w.warning.candidate_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(&batch.idempotency_key)
        .bind(&batch.request_hash)
        .bind(items.iter().map(|i| i.id).collect::<Vec<_>>())
        .bind(
            items
                .iter()
                .map(|i| i.candidate_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(items.iter().map(|i| i.email.as_str()).collect::<Vec<_>>())
        .bind(items.iter().map(|i| i.name.as_deref()).collect::<Vec<_>>())
        .bind(items.iter().map(|i| i.task_id.as_str()).collect::<Vec<_>>())
        .bind(
            items
                .iter()
                .map(|i| i.email_error.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(QUEUE)
        .bind(max_attempts)
        .bind(payloads)
        .bind(warnings.iter().map(|w| w.warning.code).collect::<Vec<_>>())
        .bind(
            warnings
                .iter()
                .map(|w| w.warning.message.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(warnings.iter().map(|w| w.if_invited).collect::<Vec<_>>())
        .bind(&batch.request_id)
        .bind(&batch.created_by)
        .bind(batch.actor.as_str())
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else {
        return Ok(Created::JobNotFound);
    };
    if row.try_get::<Option<Uuid>, _>("id")?.is_none() {
        return Ok(Created::JobClosed);
    }
    Ok(Created::Batch(BatchRow::from_row(&row)?))
}

/// The statement of [`create_batch`].
pub(crate) const CREATE_BATCH: &str = include_str!("sql/create_batch.sql");

/// What to write for one item's outcome (phase 3).
pub(crate) struct OutcomeRecord<'a> {
    pub(crate) item: Uuid,
    /// The task that made the attempt: the outcome applies only while the item is
    /// still pending under that task (not cancelled, not handed to another).
    pub(crate) task_id: &'a str,
    /// The item's new status: `pending` for a retry.
    pub(crate) status: ItemStatus,
    pub(crate) reason: Option<ItemReason>,
    pub(crate) last_error: Option<&'a str>,
    /// A retry: the item moves to this new task, due at this time.
    pub(crate) retry: Option<(&'a str, DateTime<Utc>)>,
    /// A warning for the batch, as JSON (`{candidate_id, code, message}`); added unless
    /// the batch has one with that candidate and code already.
    pub(crate) warning: Option<String>,
    /// An address to put on the suppression list (refused as a bad mailbox), with
    /// `last_error` as the reply that put it there.
    pub(crate) suppress: Option<&'a str>,
    /// The attempt phase 1 counted was not made (the send was deferred): give it back.
    pub(crate) give_back_attempt: bool,
    /// What the attempt ended in, for its row in the attempt history; `None` when no
    /// attempt was made (deferred).
    pub(crate) attempt: Option<AttemptOutcome>,
    /// The server's reply or the connection error, addresses already masked.
    pub(crate) reply: Option<&'a str>,
}

/// The statement of [`record_outcomes`].
pub const RECORD_OUTCOMES: &str = include_str!("sql/record_outcomes.sql");

/// Phase 3 in one statement (`sql/record_outcomes.sql`): moves each item still pending
/// under its task, the invitations (sent: the expiry starts now; ended otherwise:
/// revoked), each batch's tally and warnings, the suppression list, one row per
/// attempt in the attempt history (made by the process `worker`), and marks `tasks`
/// (every task of the group) `Done`, so a task is finished exactly when its outcome is
/// written. Returns the (item, task) pairs whose outcome applied; the others were
/// stale (and have no history row).
///
/// Row locks are `FOR NO KEY UPDATE`, items in id order before batches in id order
/// (see `db::delivery` for why).
pub(crate) async fn record_outcomes(
    conn: &mut PgConnection,
    records: &[OutcomeRecord<'_>],
    tasks: &[&str],
    worker: &str,
) -> sqlx::Result<Vec<(Uuid, String)>> {
    sqlx::query_as(RECORD_OUTCOMES)
        .bind(records.iter().map(|r| r.item).collect::<Vec<_>>())
        .bind(records.iter().map(|r| r.task_id).collect::<Vec<_>>())
        .bind(records.iter().map(|r| r.status).collect::<Vec<_>>())
        .bind(records.iter().map(|r| r.reason).collect::<Vec<_>>())
        .bind(records.iter().map(|r| r.last_error).collect::<Vec<_>>())
        .bind(
            records
                .iter()
                .map(|r| r.retry.map(|(t, _)| t))
                .collect::<Vec<_>>(),
        )
        .bind(
            records
                .iter()
                .map(|r| r.retry.map(|(_, at)| at))
                .collect::<Vec<_>>(),
        )
        .bind(
            records
                .iter()
                .map(|r| r.warning.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(tasks)
        .bind(records.iter().map(|r| r.suppress).collect::<Vec<_>>())
        .bind(
            records
                .iter()
                .map(|r| r.give_back_attempt)
                .collect::<Vec<_>>(),
        )
        .bind(records.iter().map(|r| r.attempt).collect::<Vec<_>>())
        .bind(records.iter().map(|r| r.reply).collect::<Vec<_>>())
        .bind(worker)
        .fetch_all(&mut *conn)
        .await
}

/// Gives pending items whose own task can no longer run (gone, killed, out of apalis
/// attempts) a new task, unless a send of theirs may still be on its way (`sending_at`
/// within `in_flight`); returns how many. At most 1,000 a call.
pub(crate) async fn requeue_stranded_items(
    pool: &PgPool,
    in_flight: Duration,
) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    let stranded: Vec<Uuid> = sqlx::query_scalar(include_str!("sql/requeue_stranded_items.sql"))
        .bind(in_flight.as_secs_f64())
        .fetch_all(&mut *tx)
        .await?;
    if stranded.is_empty() {
        return Ok(0);
    }
    let task_ids: Vec<String> = stranded.iter().map(|_| new_task_id()).collect();
    sqlx::query(
        "UPDATE batch_items i SET task_id = t.task_id, sending_at = NULL, updated_at = now()
           FROM unnest($1::uuid[], $2::text[]) AS t(id, task_id) WHERE i.id = t.id",
    )
    .bind(&stranded)
    .bind(&task_ids)
    .execute(&mut *tx)
    .await?;
    let tasks: Vec<NewTask<'_>> = stranded
        .iter()
        .zip(&task_ids)
        .map(|(item_id, task_id)| NewTask {
            task_id,
            item_id: *item_id,
            run_after: None,
        })
        .collect();
    push(&mut tx, &tasks).await?;
    tx.commit().await?;
    Ok(stranded.len())
}

/// Makes the tasks of pending items that were taken more than `older_than` ago and never
/// finished runnable again (River calls this rescuing); returns how many.
pub(crate) async fn rescue_stuck_tasks(pool: &PgPool, older_than: Duration) -> sqlx::Result<u64> {
    let rescued = sqlx::query(include_str!("sql/rescue_stuck_tasks.sql"))
        .bind(older_than.as_secs_f64())
        .execute(pool)
        .await?;
    Ok(rescued.rows_affected())
}

/// Deletes send-invite tasks that finished more than `older_than` ago; returns how many.
pub(crate) async fn delete_finished_tasks(
    pool: &PgPool,
    older_than: Duration,
) -> sqlx::Result<u64> {
    let deleted = sqlx::query(DELETE_FINISHED_TASKS)
        .bind(QUEUE)
        .bind(older_than.as_secs_f64())
        .bind(task_id_made_before(older_than))
        .execute(pool)
        .await?;
    Ok(deleted.rows_affected())
}

/// The smallest task id that could be made `ago` from now (a ULID: 48 bits of Unix
/// milliseconds, then randomness): every task made earlier has a smaller id.
pub(crate) fn task_id_made_before(ago: Duration) -> String {
    let cutoff = std::time::SystemTime::now()
        .checked_sub(ago)
        .unwrap_or(std::time::UNIX_EPOCH);
    let ms = ulid::Ulid::from_datetime(cutoff).timestamp_ms();
    ulid::Ulid::from_parts(ms, 0).to_string()
}

/// The statement of [`delete_finished_tasks`].
pub const DELETE_FINISHED_TASKS: &str = include_str!("sql/delete_finished_tasks.sql");

/// Puts failed items of batch `id` back through the queue (`db::batches::retry`) and
/// pushes their tasks, in one transaction with its audit entry; a dry run writes
/// nothing. The API's and the CLI's retry.
pub(crate) async fn retry_batch(
    pool: &PgPool,
    id: Uuid,
    selection: &RetrySelection,
    dry_run: bool,
    actor: &Actor,
) -> anyhow::Result<Retry> {
    let mut tx = pool.begin().await?;
    let retry = batches::retry(&mut tx, id, selection, dry_run, actor).await?;
    if let Retry::Retried(_, tasks) = &retry {
        let new: Vec<NewTask<'_>> = tasks
            .iter()
            .map(|(item_id, task_id)| NewTask {
                task_id,
                item_id: *item_id,
                run_after: None,
            })
            .collect();
        push(&mut tx, &new).await?;
        tx.commit().await?;
    }
    Ok(retry)
}

/// How many send-invite tasks are in each state, as operators name them.
#[derive(Debug, Clone, Copy, Default, Serialize, FromRow, utoipa::ToSchema)]
pub(crate) struct TaskCounts {
    /// Due now, waiting for a worker (new, or failed with attempts left).
    pub(crate) pending: i64,
    /// Due later (a retry's backoff, a failed task's pause).
    pub(crate) scheduled: i64,
    /// Taken by a worker and not finished.
    pub(crate) running: i64,
    /// Finished and not yet pruned (`worker.task_retention_secs`).
    pub(crate) done: i64,
    /// Given up on: killed, or failed with no attempt left.
    pub(crate) dead: i64,
}

/// A worker process of the queue that sent a heartbeat lately.
#[derive(Debug, Clone, Serialize, FromRow, utoipa::ToSchema)]
pub(crate) struct WorkerView {
    pub(crate) name: String,
    pub(crate) last_seen: DateTime<Utc>,
    /// Tasks it has taken and not finished.
    pub(crate) in_flight: i64,
}

/// The queue at a glance (`GET /v1/queue`, `invite-worker status`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct QueueOverview {
    pub(crate) tasks: TaskCounts,
    /// How long the oldest task due has waited; 0 when none is.
    pub(crate) oldest_pending_age_secs: i64,
    /// Workers seen within `worker.recover_after_secs`, most recent first.
    pub(crate) workers: Vec<WorkerView>,
    pub(crate) sent_last_minute: i64,
}

/// The queue's figures. Each state's count reads only that state's rows, through an
/// index (`sql/queue_counts.sql`); the workers' tasks are found through apalis'
/// `lock_by` index.
pub(crate) async fn overview(pool: &PgPool, alive_within: Duration) -> sqlx::Result<QueueOverview> {
    let mut conn = pool.acquire().await?;
    let (tasks, oldest): (TaskCounts, i64) = {
        let row = sqlx::query(include_str!("sql/queue_counts.sql"))
            .bind(QUEUE)
            .fetch_one(&mut *conn)
            .await?;
        (
            TaskCounts::from_row(&row)?,
            row.try_get("oldest_pending_age_secs")?,
        )
    };
    let workers: Vec<WorkerView> = sqlx::query_as(include_str!("sql/queue_workers.sql"))
        .bind(QUEUE)
        .bind(alive_within.as_secs_f64())
        .fetch_all(&mut *conn)
        .await?;
    let sent_last_minute = batches::sent_last_minute(&mut *conn).await?;
    Ok(QueueOverview {
        tasks,
        oldest_pending_age_secs: oldest,
        workers,
        sent_last_minute,
    })
}

/// A task apalis gave up on.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct DeadTask {
    pub(crate) id: String,
    /// The item it was to send, when its payload could be read.
    pub(crate) item_id: Option<Uuid>,
    /// `Killed` (never to run again) or `Failed` (out of attempts).
    pub(crate) status: String,
    pub(crate) attempts: i32,
    /// What its last run returned, as apalis stored it.
    #[schema(value_type = Option<Object>)]
    pub(crate) last_result: Option<serde_json::Value>,
    pub(crate) died_at: Option<DateTime<Utc>>,
}

/// Tasks apalis gave up on, most recently made first, at most `limit` (through the
/// `apalis_jobs_dead` index, which holds only those).
pub(crate) async fn dead_tasks(pool: &PgPool, limit: i64) -> sqlx::Result<Vec<DeadTask>> {
    type Row = (
        String,
        Vec<u8>,
        String,
        i32,
        Option<sqlx::types::Json<serde_json::Value>>,
        Option<DateTime<Utc>>,
    );
    let rows: Vec<Row> = sqlx::query_as(include_str!("sql/dead_tasks.sql"))
        .bind(QUEUE)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(
            |(id, job, status, attempts, last_result, died_at)| DeadTask {
                id,
                // A payload that does not decode (the reason it was killed) has no item.
                item_id: serde_json::from_slice::<SendInvite>(&job)
                    .ok()
                    .map(|p| p.item_id),
                status,
                attempts,
                last_result: last_result.map(|j| j.0),
                died_at,
            },
        )
        .collect())
}

/// Which dead tasks to run again.
pub(crate) enum DeadSelection {
    All,
    Ids(Vec<String>),
}

impl DeadSelection {
    /// These task ids, each of which must be a ULID.
    pub(crate) fn ids(ids: Vec<String>) -> Result<Self, String> {
        match ids
            .iter()
            .position(|id| ulid::Ulid::from_string(id).is_err())
        {
            Some(i) => Err(format!("ids[{i}]: {:?} is not a task id (a ULID)", ids[i])),
            None => Ok(Self::Ids(ids)),
        }
    }
}

/// Makes dead tasks runnable again with a fresh attempt budget, and records it in the
/// audit log in the same transaction; returns how many. A task whose item has moved on
/// (finished, or given a new task by maintenance) does nothing when it runs: handlers
/// check that the item is still theirs.
pub(crate) async fn retry_dead_tasks(
    pool: &PgPool,
    which: &DeadSelection,
    actor: &Actor,
) -> sqlx::Result<u64> {
    let ids: Option<&[String]> = match which {
        DeadSelection::All => None,
        DeadSelection::Ids(ids) => Some(ids),
    };
    let mut tx = pool.begin().await?;
    let retried = sqlx::query(include_str!("sql/retry_dead_tasks.sql"))
        .bind(QUEUE)
        .bind(ids)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if retried > 0 {
        let target = match which {
            DeadSelection::All => "all".to_owned(),
            DeadSelection::Ids(ids) => ids.join(","),
        };
        let detail = serde_json::json!({ "tasks": retried });
        audit::record(&mut tx, actor, AuditAction::TasksRetried, &target, detail).await?;
    }
    tx.commit().await?;
    Ok(retried)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_made_before_the_cutoff_has_a_smaller_id_and_one_made_after_a_larger() {
        let before =
            ulid::Ulid::from_datetime(std::time::SystemTime::now() - Duration::from_secs(7200))
                .to_string();
        let cutoff = task_id_made_before(Duration::from_secs(3600));
        let after = new_task_id();
        assert!(before < cutoff, "{before} < {cutoff}");
        assert!(cutoff < after, "{cutoff} < {after}");
    }
}
