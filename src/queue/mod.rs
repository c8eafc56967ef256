//! The durable queue: apalis-postgres tasks that carry only an item id.
//!
//! apalis' own retries are not durable (its backoff sleeps in memory and a failed row
//! is re-fetched at once), so a transient failure is handled here instead: the
//! handler records it and, in the same transaction, pushes a fresh task whose
//! `run_at` is the backoff delay away, then reports success for the current task.
//! A scheduled retry is therefore an ordinary row in `apalis.jobs` and survives any
//! restart.

pub mod deliver;
pub mod group;
pub mod maintenance;
pub mod prepare;
pub mod recorder;
pub mod worker;

use std::time::Duration;

use apalis_core::task::{builder::TaskBuilder, task_id::TaskId};
use apalis_postgres::PgTask;
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

/// The apalis queue (`apalis.jobs.job_type`) that send-invite tasks live in.
pub const QUEUE: &str = "invite-worker::send-invite";

/// How many times apalis itself re-runs a task whose handler returned an error (a
/// database fault, not a mail failure: those are scheduled by us).
pub const TASK_MAX_ATTEMPTS: usize = 10;

/// The payload of a send-invite task: ids only; the handler reloads everything else.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct SendInvite {
    pub item_id: Uuid,
}

/// A new task id (apalis expects ULIDs).
pub fn new_task_id() -> String {
    ulid::Ulid::generate().to_string()
}

/// A send-invite task's stored payload.
pub fn payload(item_id: Uuid) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&SendInvite { item_id })
}

/// A task to push: which item, under which task id, and how long from now.
pub struct NewTask<'a> {
    pub task_id: &'a str,
    pub item_id: Uuid,
    pub run_after: Option<Duration>,
}

/// Pushes send-invite tasks on `conn` (normally an open transaction, so the tasks
/// exist exactly when the rows that need them do), with apalis-postgres' own push: one
/// INSERT for all of them. (A new batch's tasks are written by the statement that
/// writes its items, `db::batches::insert`, in the same shape.)
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

/// How a task ended that the recorder did not finish (the recorder marks each task
/// `Done` in the transaction that records its outcome).
#[derive(Debug, Clone, Copy)]
pub enum TaskEnd<'a> {
    /// Nothing to do (its item was terminal, or another task's).
    Done,
    /// Undecodable: never run again.
    Killed(&'a str),
    /// A database fault: run again after `attempts` seconds, up to the task's
    /// `max_attempts` (then the sweep gives the item a fresh task).
    Failed(&'a str),
}

/// Writes how a task ended, in place of apalis' own ack (the workers run with
/// `persist_results(false)`: see `queue::worker`). Only a task still taken is changed.
pub async fn end_task(
    conn: &mut PgConnection,
    task_id: &str,
    end: TaskEnd<'_>,
) -> sqlx::Result<()> {
    let (status, result) = match end {
        TaskEnd::Done => ("Done", serde_json::json!({ "Ok": null })),
        TaskEnd::Killed(why) => ("Killed", serde_json::json!({ "Err": why })),
        TaskEnd::Failed(why) => ("Failed", serde_json::json!({ "Err": why })),
    };
    sqlx::query(
        "UPDATE apalis.jobs
            SET status = $2, last_result = $3, attempts = attempts + 1, lock_by = NULL,
                done_at = now(),
                run_at = CASE WHEN $2 = 'Failed'
                              THEN now() + make_interval(secs => attempts + 1) ELSE run_at END
          WHERE id = $1 AND status IN ('Pending', 'Queued', 'Running')",
    )
    .bind(task_id)
    .bind(status)
    .bind(sqlx::types::Json(result))
    .execute(&mut *conn)
    .await?;
    Ok(())
}
