//! Queue maintenance: poison payloads killed, stranded items requeued, stuck tasks
//! rescued, finished tasks deleted.

use std::time::Duration;

use apalis_core::task::builder::TaskBuilder;
use invite_worker::db::tasks::QUEUE;
use smtp_testkit::Step;

use crate::helpers::{TestApp, candidates, spawn_app, spawn_app_with};

/// Polls `query` (one i64) until it equals `want`, within a generous bound.
async fn wait_for_count(pool: &sqlx::PgPool, query: &'static str, want: i64) -> i64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = sqlx::query_scalar(query)
            .bind(QUEUE)
            .fetch_one(pool)
            .await
            .expect("count");
        if n == want || tokio::time::Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An app with one batch of one candidate whose first send was deferred (451) and
/// whose retry waits in the queue, due in minutes (it must not come due by itself).
async fn app_with_a_retry_scheduled_far_ahead() -> (TestApp, String) {
    let app = spawn_app_with(|s| {
        s.retry.initial_delay_ms = 600_000;
        s.retry.max_delay_ms = 600_000;
    })
    .await;
    app.smtp.script(
        "s.0@example.com",
        [Step::DataReply(451, "4.3.0 later".into())],
    );
    app.open_job("job-1").await;
    let id = app.create_batch("job-1", candidates("s", 1)).await;
    let scheduled = wait_for_count(
        &app.pool,
        "SELECT count(*) FROM apalis.jobs j JOIN batch_items i ON i.task_id = j.id
         WHERE j.job_type = $1 AND j.status = 'Pending' AND j.run_at > now() + interval '1 minute'
           AND i.status = 'pending' AND i.attempts = 1",
        1,
    )
    .await;
    assert_eq!(scheduled, 1, "a retry is scheduled");
    (app, id)
}

#[tokio::test]
async fn a_task_whose_payload_cannot_be_decoded_is_killed_and_the_others_still_run() {
    let app = spawn_app().await;
    // Two bad rows in the queue: bytes that are not JSON, and JSON of the wrong shape.
    let mut conn = app.pool.acquire().await.expect("connection");
    let poison = vec![
        TaskBuilder::new(b"\xff\xfe not json".to_vec()).build(),
        TaskBuilder::new(br#"{"item": 42}"#.to_vec()).build(),
    ];
    apalis_postgres::queries::push_tasks(&mut *conn, QUEUE, poison)
        .await
        .expect("poison pushed");
    drop(conn);

    app.open_job("job-1").await;
    let id = app.create_batch("job-1", candidates("p", 20)).await;
    let batch = app.wait_until_completed(&id).await;
    assert_eq!(batch["summary"], "20 sent, 0 failed");

    let killed = wait_for_count(
        &app.pool,
        "SELECT count(*) FROM apalis.jobs WHERE job_type = $1 AND status = 'Killed'",
        2,
    )
    .await;
    assert_eq!(killed, 2, "both undecodable tasks are marked dead");
}

#[tokio::test]
async fn a_pending_item_whose_task_died_is_given_a_new_task_and_sent() {
    let (app, id) = app_with_a_retry_scheduled_far_ahead().await;
    // Kill the task that holds the retry.
    sqlx::query(
        "UPDATE apalis.jobs SET status = 'Killed'
         WHERE id IN (SELECT task_id FROM batch_items WHERE status = 'pending')",
    )
    .execute(&app.pool)
    .await
    .expect("kill the task");

    let batch = app.wait_until_completed(&id).await;
    assert_eq!(batch["summary"], "1 sent, 0 failed");
    assert_eq!(app.smtp.messages().len(), 1);
}

#[tokio::test]
async fn finished_queue_tasks_are_pruned_and_business_rows_are_kept() {
    let app = spawn_app_with(|s| s.worker.task_retention_secs = 0).await;
    app.open_job("job-1").await;
    let id = app.create_batch("job-1", candidates("r", 10)).await;
    app.wait_until_completed(&id).await;

    let left = wait_for_count(
        &app.pool,
        "SELECT count(*) FROM apalis.jobs WHERE job_type = $1",
        0,
    )
    .await;
    assert_eq!(left, 0, "every finished task is pruned");
    let items: i64 = sqlx::query_scalar("SELECT count(*) FROM batch_items")
        .fetch_one(&app.pool)
        .await
        .expect("count");
    let invitations: i64 = sqlx::query_scalar("SELECT count(*) FROM invitations")
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(
        (items, invitations),
        (10, 10),
        "batches, items and invitations stay"
    );
}

#[tokio::test]
async fn a_task_taken_long_ago_by_a_live_worker_and_never_finished_is_released_and_sent() {
    let (app, id) = app_with_a_retry_scheduled_far_ahead().await;

    // The retry's task as a live worker would leave it had it taken the task long ago
    // and then failed to write how it ended: taken, under that worker's name, which
    // keeps beating (so orphan recovery never applies).
    let worker: String = sqlx::query_scalar(
        "SELECT id FROM apalis.workers WHERE worker_type = $1 ORDER BY last_seen DESC LIMIT 1",
    )
    .bind(QUEUE)
    .fetch_one(&app.pool)
    .await
    .expect("the live worker");
    let stuck_at = invite_worker::queue::maintenance::STUCK_AFTER.as_secs_f64() + 60.0;
    sqlx::query(
        "UPDATE apalis.jobs SET status = 'Queued', lock_by = $1, run_at = now(),
                lock_at = now() - make_interval(secs => $2)
         WHERE id IN (SELECT task_id FROM batch_items WHERE status = 'pending')",
    )
    .bind(&worker)
    .bind(stuck_at)
    .execute(&app.pool)
    .await
    .expect("the task taken long ago");

    let batch = app.wait_until_completed(&id).await;
    assert_eq!(batch["summary"], "1 sent, 0 failed");
    assert_eq!(app.smtp.messages().len(), 1, "the released task sent once");
}
