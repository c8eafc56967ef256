//! Retention (`[retention]`): the maintenance loop forgets old idempotency keys, deletes
//! old attempt history and anonymizes long-finished batches, one process at a time, and
//! never touches live data. Rows are back-dated to make them old.

use std::time::Duration;

use invite_worker::db::retention::LOCK_KEY;
use reqwest::StatusCode;
use serde_json::{Value, json};
use smtp_testkit::Step;
use sqlx::Connection;

use crate::helpers::{KEY, TestApp, database_name, server_url, spawn_app_with};

async fn post_with_key(app: &TestApp, key: &str, body: &Value) -> reqwest::Response {
    app.client
        .post(app.url("/v1/batches"))
        .bearer_auth(KEY)
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .expect("request")
}

fn uuid(id: &str) -> uuid::Uuid {
    uuid::Uuid::parse_str(id).expect("a uuid")
}

/// Moves the batch, its attempts and its items' times `days` into the past.
async fn back_date(app: &TestApp, batch: &str, days: i32) {
    sqlx::query(
        "WITH b AS (
            UPDATE batches SET created_at = created_at - make_interval(days => $2),
                   completed_at = completed_at - make_interval(days => $2),
                   cancelled_at = cancelled_at - make_interval(days => $2)
             WHERE id = $1)
         UPDATE attempts SET started_at = started_at - make_interval(days => $2),
                finished_at = finished_at - make_interval(days => $2)
          WHERE item_id IN (SELECT id FROM batch_items WHERE batch_id = $1)",
    )
    .bind(uuid(batch))
    .bind(days)
    .execute(&app.pool)
    .await
    .expect("back-dated");
}

async fn anonymized(app: &TestApp, batch: &str) -> bool {
    sqlx::query_scalar("SELECT anonymized_at IS NOT NULL FROM batches WHERE id = $1")
        .bind(uuid(batch))
        .fetch_one(&app.pool)
        .await
        .expect("a batch")
}

async fn attempt_count(app: &TestApp, batch: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM attempts
          WHERE item_id IN (SELECT id FROM batch_items WHERE batch_id = $1)",
    )
    .bind(uuid(batch))
    .fetch_one(&app.pool)
    .await
    .expect("attempts")
}

#[tokio::test]
async fn old_data_is_forgotten_one_process_at_a_time_and_live_data_is_untouched() {
    let app = spawn_app_with(|s| {
        s.retention.finished_batches_days = 30;
        s.retention.attempts_days = 90;
        s.retention.idempotency_hours = 24;
        // A transient failure waits a minute: the live batch stays live.
        s.retry.initial_delay_ms = 60_000;
        s.retry.max_delay_ms = 60_000;
    })
    .await;
    app.open_job("job-1").await;

    // Old and finished: an accepted item, one refused with its address quoted, and an
    // invalid address (a warning that quotes it).
    app.smtp.script(
        "old.gone@example.com",
        [Step::RcptReply(
            550,
            "5.1.1 <old.gone@example.com>: unknown".into(),
        )],
    );
    let old_body = json!({"job_id": "job-1", "duration_minutes": 30, "candidates": [
        {"id": "c-old-1", "email": "old.one@example.com", "name": "Olga Old"},
        {"id": "c-old-2", "email": "old.gone@example.com", "name": "Oscar Old"},
        {"id": "c-old-3", "email": "Olivia <old.three@example.com>"}]});
    let r = post_with_key(&app, "key-old", &old_body).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let old = r.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    app.wait_until_completed(&old).await;

    // Old and live: a send that failed transiently waits for its retry.
    app.smtp.script(
        "live.one@example.com",
        [Step::RcptReply(
            451,
            "4.3.0 <live.one@example.com> later".into(),
        )],
    );
    let live_body = json!({"job_id": "job-1", "duration_minutes": 30, "candidates": [
        {"id": "c-live-1", "email": "live.one@example.com", "name": "Lena Live"}]});
    let r = post_with_key(&app, "key-live", &live_body).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let live = r.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    app.wait_for_items(
        &live,
        "a retry is scheduled",
        Duration::from_secs(30),
        |items| items[0]["attempts"] == 1 && items[0]["last_error"].is_string(),
    )
    .await;

    // Recent and finished.
    let recent = app
        .create_batch(
            "job-1",
            vec![json!({"id": "c-new-1", "email": "new.one@example.com", "name": "Nina New"})],
        )
        .await;
    app.wait_until_completed(&recent).await;

    // Another process holds the retention lock: nothing happens meanwhile.
    let mut holder = sqlx::PgConnection::connect(&format!(
        "{}/{}",
        server_url(),
        database_name(&app.settings)
    ))
    .await
    .expect("a connection of our own");
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut holder)
        .await
        .expect("the lock");
    back_date(&app, &old, 60).await;
    back_date(&app, &live, 100).await;
    // The first attempt of the refused item is older than attempts_days.
    sqlx::query(
        "UPDATE attempts SET finished_at = now() - interval '100 days',
                started_at = now() - interval '100 days'
          WHERE item_id IN (SELECT id FROM batch_items
                             WHERE batch_id = $1 AND candidate_id = 'c-old-1')",
    )
    .bind(uuid(&old))
    .execute(&app.pool)
    .await
    .expect("older still");
    tokio::time::sleep(Duration::from_secs(3)).await; // three maintenance rounds
    assert!(
        !anonymized(&app, &old).await,
        "no pass ran without the lock"
    );
    assert_eq!(attempt_count(&app, &old).await, 3);
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(LOCK_KEY)
        .execute(&mut holder)
        .await
        .expect("unlocked");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !anonymized(&app, &old).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no retention pass ran"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The old batch: email and name gone everywhere, the tally as it was.
    let batch = app.batch(&old).await;
    assert_eq!(batch["summary"], "1 sent, 2 failed", "{batch}");
    let text = format!("{batch}{}", json!(app.items(&old, None).await));
    for personal in [
        "old.one",
        "old.gone",
        "old.three",
        "Olga",
        "Oscar",
        "Olivia",
        "o***@",
    ] {
        assert!(!text.contains(personal), "{personal} in {text}");
    }
    for item in app.items(&old, None).await {
        assert_eq!(item["email"], "", "{item}");
        assert_eq!(item["name"], Value::Null, "{item}");
    }
    let gone = app
        .get_json(&format!("/v1/batches/{old}/items/c-old-2/attempts"))
        .await;
    assert_eq!(
        gone["attempts"][0]["smtp_reply"], "550 5.1.1 <[erased]>: unknown",
        "{gone}"
    );
    // Attempts older than attempts_days are gone; the younger ones stay.
    assert_eq!(attempt_count(&app, &old).await, 2);
    // The old key is forgotten: the same request makes a new batch.
    let again = post_with_key(&app, "key-old", &old_body).await;
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    let again: Value = again.json().await.expect("json");
    assert_ne!(again["id"], old.as_str(), "a new batch");

    // The live batch, however old: its key, item, attempt and link are untouched.
    let repeat = post_with_key(&app, "key-live", &live_body).await;
    assert!(repeat.status().is_success());
    assert_eq!(
        repeat.json::<Value>().await.expect("json")["id"],
        live.as_str()
    );
    let items = app.items(&live, None).await;
    assert_eq!(items[0]["status"], "pending");
    assert_eq!(items[0]["email"], "live.one@example.com");
    assert_eq!(items[0]["name"], "Lena Live");
    assert_eq!(
        attempt_count(&app, &live).await,
        1,
        "a pending item's attempts stay"
    );
    assert!(!anonymized(&app, &live).await);
    let link: String = sqlx::query_scalar("SELECT status FROM invitations WHERE batch_id = $1")
        .bind(uuid(&live))
        .fetch_one(&app.pool)
        .await
        .expect("its invitation");
    assert_eq!(link, "PENDING");

    // The recent batch keeps everything.
    let items = app.items(&recent, None).await;
    assert_eq!(items[0]["email"], "new.one@example.com");
    assert!(!anonymized(&app, &recent).await);
}
