//! The main path: a batch becomes one email per candidate and an exact tally.

use std::collections::HashSet;

use invite_worker::{
    db::tasks::{self, NewTask},
    domain::ids::new_task_id,
};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{api_only_with_open_job, candidates, link_in, spawn_app};

#[tokio::test]
async fn a_batch_of_100_with_6_invalid_addresses_ends_94_sent_6_failed() {
    let app = spawn_app().await;
    app.open_job("job-42").await;
    let mut people = candidates("c", 100);
    let invalid = [
        "not-an-email",
        "a@",
        "@example.com",
        "x..y@example.com",
        "a b@example.com",
        "c@localhost",
    ];
    for (slot, bad) in [3, 17, 29, 44, 61, 88].iter().zip(invalid) {
        people[*slot]["email"] = json!(bad);
    }
    let id = app.create_batch("job-42", people.clone()).await;

    let batch = app.wait_until_completed(&id).await;
    assert_eq!(
        batch["counts"],
        json!({"pending": 0, "sent": 94, "failed": 6, "skipped": 0})
    );
    assert_eq!(batch["summary"], "94 sent, 6 failed");
    assert!(batch["completed_at"].is_string());

    let failed = app.items(&id, Some("failed")).await;
    assert_eq!(failed.len(), 6);
    assert!(
        failed
            .iter()
            .all(|i| i["reason"] == "invalid_email" && i["attempts"] == 0)
    );

    let messages = app.smtp.messages();
    assert_eq!(messages.len(), 94, "one message per valid candidate");
    let base = &app.settings.invite.link_base_url;
    let mut links = HashSet::new();
    let mut message_ids = HashSet::new();
    let mut recipients = HashSet::new();
    for m in &messages {
        assert_eq!(m.rcpt_to.len(), 1);
        recipients.insert(m.rcpt_to[0].clone());
        let subject = m.header("Subject").expect("subject");
        assert!(subject.contains("Backend Engineer"), "{subject}");
        assert!(m.body().contains("30 minutes"), "duration in the body");
        links.insert(link_in(m.body(), base).expect("link on a line of its own"));
        message_ids.insert(m.header("Message-ID").expect("message id"));
    }
    assert_eq!(links.len(), 94, "every link differs");
    assert_eq!(message_ids.len(), 94, "every Message-ID differs");
    let expected: HashSet<String> = people
        .iter()
        .filter_map(|p| p["email"].as_str())
        .filter(|e| {
            e.ends_with("@example.com")
                && !e.starts_with('@')
                && !e.contains("..")
                && !e.contains(' ')
        })
        .map(str::to_owned)
        .collect();
    assert_eq!(recipients, expected, "each message went to its candidate");

    // The database keeps no usable token: only 32-byte hashes, none equal to a link's token.
    let hashes: Vec<Vec<u8>> = sqlx::query_scalar("SELECT token_hash FROM invitations")
        .fetch_all(&app.pool)
        .await
        .expect("hashes");
    assert_eq!(hashes.len(), 94);
    assert!(hashes.iter().all(|h| h.len() == 32));
}

/// The enqueue writes its queue tasks itself, in the statement that writes the items
/// (`db::tasks::create_batch`); they must be the rows apalis-postgres' own push writes
/// (`db::tasks::push`, used for retries), or workers would treat them differently.
#[tokio::test]
async fn an_enqueued_task_is_the_row_that_apalis_push_writes() {
    type Shape = (
        String,
        String,
        i32,
        i32,
        Option<i32>,
        Option<String>,
        Option<String>,
        bool,
    );
    const SHAPE: &str = "SELECT job_type, status, attempts, max_attempts, priority,
                                metadata::text, idempotency_key,
                                last_result IS NULL AND lock_at IS NULL AND lock_by IS NULL
                                    AND done_at IS NULL AND run_at <= now()
                           FROM apalis.jobs WHERE id = $1";
    // The API alone: no worker takes the tasks before they are read.
    let (app, _api) = api_only_with_open_job("job-1").await;
    let id = app.create_batch("job-1", candidates("shape", 3)).await;
    let items: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT id, task_id FROM batch_items WHERE batch_id = $1::uuid ORDER BY position",
    )
    .bind(&id)
    .fetch_all(&app.pool)
    .await
    .expect("items");
    assert_eq!(items.len(), 3);

    let mut tx = app.pool.begin().await.expect("begin");
    let pushed_id = new_task_id();
    let pushed = NewTask {
        task_id: &pushed_id,
        item_id: items[0].0,
        run_after: None,
    };
    tasks::push(&mut tx, &[pushed]).await.expect("apalis push");
    let by_apalis: Shape = sqlx::query_as(SHAPE)
        .bind(&pushed_id)
        .fetch_one(&mut *tx)
        .await
        .expect("the pushed row");
    for (item, task) in &items {
        let enqueued: Shape = sqlx::query_as(SHAPE)
            .bind(task)
            .fetch_one(&mut *tx)
            .await
            .expect("the enqueued row");
        assert_eq!(enqueued, by_apalis, "task {task}");
        let payload: Vec<u8> = sqlx::query_scalar("SELECT job FROM apalis.jobs WHERE id = $1")
            .bind(task)
            .fetch_one(&mut *tx)
            .await
            .expect("payload");
        assert_eq!(
            payload,
            tasks::payload(*item).expect("encodes"),
            "task {task}"
        );
    }
    tx.rollback().await.expect("rollback");
}
