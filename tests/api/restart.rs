//! A retry scheduled in the database outlives the process that scheduled it: the real
//! binary is stopped (SIGTERM) while a retry waits, started again, and the retry is
//! carried out by the new process, once.

use std::{collections::HashSet, time::Duration};

use serde_json::{Value, json};
use smtp_testkit::Step;

use crate::{
    helpers::{TestApp, link_in, prepare_app_with},
    process::Service,
};

/// How long a freshly started process may take to answer `/readyz`, and a stopped one
/// to exit; bounds, not speed assertions.
const PATIENCE: Duration = Duration::from_secs(60);

/// The one backoff delay (no jitter). Long enough that the first process is surely
/// stopped before the retry comes due, so the retry can only be made by the second one.
const RETRY_DELAY_MS: u64 = 5_000;

/// The send-invite tasks of `batch_id` that are not `Done`: (task id, status, whether
/// `run_at` is still in the future by the database clock).
async fn unfinished_tasks(app: &TestApp, batch_id: &str) -> Vec<(String, String, bool)> {
    let id = uuid::Uuid::parse_str(batch_id).expect("a batch id is a uuid");
    sqlx::query_as(
        "SELECT j.id, j.status, j.run_at > now() FROM apalis.jobs j
         WHERE j.job_type = $2 AND j.status <> 'Done'
           AND (convert_from(j.job, 'UTF8')::jsonb ->> 'item_id')::uuid IN
               (SELECT i.id FROM batch_items i WHERE i.batch_id = $1)",
    )
    .bind(id)
    .bind(invite_worker::db::tasks::QUEUE)
    .fetch_all(&app.pool)
    .await
    .expect("the batch's unfinished tasks")
}

/// The item's current `task_id`, read from the database.
async fn task_of_item(app: &TestApp, batch_id: &str) -> String {
    let id = uuid::Uuid::parse_str(batch_id).expect("a batch id is a uuid");
    sqlx::query_scalar("SELECT task_id FROM batch_items WHERE batch_id = $1")
        .bind(id)
        .fetch_one(&app.pool)
        .await
        .expect("the item's task id")
}

#[tokio::test]
async fn a_retry_scheduled_in_the_database_is_carried_out_once_after_the_worker_restarts() {
    let mut app = prepare_app_with(|s| {
        s.retry.initial_delay_ms = RETRY_DELAY_MS;
        s.retry.max_delay_ms = RETRY_DELAY_MS;
        s.retry.jitter = 0.0;
        s.retry.max_attempts = 8;
    })
    .await;
    let service = Service::new("serve", &app.settings);
    let recipient = "ada@example.com";
    app.smtp.script(
        recipient,
        [Step::DataReply(451, "4.3.0 try again later".into())],
    );

    // The first process: the first attempt is deferred and a retry scheduled.
    let mut first = service.start("serve #1");
    first.wait_ready(PATIENCE).await;
    app.base = first.base();
    app.open_job("job-r").await;
    let id = app
        .create_batch(
            "job-r",
            vec![json!({"id": "cand-ada", "email": recipient, "name": "Ada Lovelace"})],
        )
        .await;
    app.wait_for_items(
        &id,
        "the first attempt deferred and its retry scheduled",
        PATIENCE,
        |items| {
            items.len() == 1
                && items[0]["status"] == "pending"
                && items[0]["attempts"] == 1
                && items[0]["last_error"].is_string()
        },
    )
    .await;

    first.terminate();
    let status = first.wait_exit(PATIENCE).await;
    assert!(
        status.success(),
        "SIGTERM ends the process cleanly: {status}"
    );

    // Nothing is running now; the retry waits in apalis.jobs.
    assert_eq!(
        app.smtp.attempts(recipient),
        1,
        "precondition: the first process stopped before the retry came due"
    );
    let waiting = unfinished_tasks(&app, &id).await;
    let task_id = task_of_item(&app, &id).await;
    assert_eq!(
        waiting,
        vec![(task_id, "Pending".to_owned(), true)],
        "one send-invite task waits, Pending, due in the future, and it is the item's task"
    );
    let item: (String, i32, Option<String>) = sqlx::query_as(
        "SELECT status, attempts, last_error FROM batch_items
         WHERE batch_id = $1",
    )
    .bind(uuid::Uuid::parse_str(&id).expect("a uuid"))
    .fetch_one(&app.pool)
    .await
    .expect("the item");
    assert_eq!(item.0, "pending");
    assert_eq!(item.1, 1);
    assert!(
        item.2.as_deref().is_some_and(|e| e.contains("451")),
        "last_error keeps the deferral: {item:?}"
    );

    // The second process carries the retry out.
    let mut second = service.start("serve #2");
    second.wait_ready(PATIENCE).await;
    app.base = second.base();
    let batch = app.wait_until_completed(&id).await;
    assert_eq!(
        batch["counts"],
        json!({"pending": 0, "sent": 1, "failed": 0, "skipped": 0}),
        "{batch}"
    );
    let items = app.items(&id, None).await;
    assert_eq!(items[0]["status"], "sent", "{items:?}");
    assert_eq!(items[0]["attempts"], 2, "{items:?}");

    let deadline = tokio::time::Instant::now() + PATIENCE;
    while app.live_tasks_of_batch(&id).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "tasks still live after the batch completed: {:?}",
            app.task_statuses_of_batch(&id).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    assert_eq!(app.smtp.attempts(recipient), 2, "one retry, not more");
    let transfers: Vec<_> = app
        .smtp
        .deliveries()
        .into_iter()
        .filter(|m| m.rcpt_to.iter().any(|r| r.eq_ignore_ascii_case(recipient)))
        .collect();
    assert_eq!(
        transfers.iter().map(|m| m.accepted).collect::<Vec<_>>(),
        vec![false, true],
        "the deferred transfer, then the accepted one: accepted exactly once"
    );
    let base = &app.settings.invite.link_base_url;
    let links: HashSet<Option<String>> =
        transfers.iter().map(|m| link_in(m.body(), base)).collect();
    assert_eq!(links.len(), 1, "the retry carries the same link: {links:?}");
    assert!(links.iter().all(Option::is_some), "{links:?}");
    let ids: HashSet<Option<String>> = transfers.iter().map(|m| m.header("Message-ID")).collect();
    assert_eq!(
        ids.len(),
        1,
        "the retry carries the same Message-ID: {ids:?}"
    );
    assert!(ids.iter().all(Option::is_some), "{ids:?}");

    let invitation: Value = app
        .get_json(&format!(
            "/v1/invitations/{}",
            items[0]["invitation_id"]
                .as_str()
                .expect("an invitation id")
        ))
        .await;
    assert_eq!(invitation["status"], "PENDING", "{invitation}");

    second.terminate();
    let status = second.wait_exit(PATIENCE).await;
    assert!(
        status.success(),
        "the second process stops cleanly too: {status}"
    );
}
