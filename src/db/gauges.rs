//! The queue's figures for `/metrics`, computed by one process at a time and read by
//! every process: counting tasks and batches is a few index scans, too much to repeat
//! for every scrape of every process (operations.md §3, "Metrics").

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::{batches, tasks};

/// The advisory lock a refresh holds (`pg_try_advisory_xact_lock`).
const LOCK_KEY: i64 = 0x696e_7669_7465_7202;

/// What `/metrics` shows of the queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueGauges {
    /// Send-invite tasks by state (`pending`, `scheduled`, `running`, `done`, `dead`).
    pub tasks: BTreeMap<String, i64>,
    pub oldest_pending_age_secs: i64,
    /// Workers seen within `worker.recover_after_secs`.
    pub workers_alive: i64,
    /// Batches by status.
    pub batches: BTreeMap<String, i64>,
}

/// Computes the figures and stores them, unless another process holds the refresh or
/// stored figures younger than `every`. True when this call computed them.
pub async fn refresh_if_stale(
    pool: &PgPool,
    every: Duration,
    alive_within: Duration,
) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let ours: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .fetch_one(&mut *tx)
        .await?;
    if !ours {
        return Ok(false);
    }
    let fresh: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM queue_gauges WHERE taken_at > now() - make_interval(secs => $1))",
    )
    .bind(every.as_secs_f64())
    .fetch_one(&mut *tx)
    .await?;
    if fresh {
        return Ok(false);
    }
    let overview = tasks::overview(pool, alive_within).await?;
    let t = overview.tasks;
    let figures = QueueGauges {
        tasks: [
            ("pending", t.pending),
            ("scheduled", t.scheduled),
            ("running", t.running),
            ("done", t.done),
            ("dead", t.dead),
        ]
        .into_iter()
        .map(|(state, n)| (state.to_owned(), n))
        .collect(),
        oldest_pending_age_secs: overview.oldest_pending_age_secs,
        workers_alive: i64::try_from(overview.workers.len()).unwrap_or(i64::MAX),
        batches: batches::count_by_status(&mut *tx)
            .await?
            .into_iter()
            .map(|(status, n)| (status.as_str().to_owned(), n))
            .collect(),
    };
    sqlx::query(
        "INSERT INTO queue_gauges (taken_at, figures) VALUES (now(), $1)
         ON CONFLICT (only_row) DO UPDATE
            SET taken_at = now(), figures = EXCLUDED.figures,
                refreshes = queue_gauges.refreshes + 1",
    )
    .bind(sqlx::types::Json(&figures))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// The stored figures and their age in seconds; `None` before the first refresh.
pub async fn read(pool: &PgPool) -> sqlx::Result<Option<(QueueGauges, f64)>> {
    let row: Option<(sqlx::types::Json<QueueGauges>, f64)> = sqlx::query_as(
        "SELECT figures, extract(epoch FROM now() - taken_at)::float8 FROM queue_gauges",
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(figures, age)| (figures.0, age)))
}
