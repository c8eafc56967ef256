//! The operator CLI, run as the real binary against a real database: every row of the
//! contract's table, as tables and as `--json`, with its exit status, and the audit
//! entries its changes write.

use std::{
    io::Write,
    process::{Command, Stdio},
    time::Duration,
};

use invite_worker::config::Settings;
use serde_json::{Value, json};
use smtp_testkit::Step;

use crate::{
    helpers::{TestApp, candidates, prepare_app_with, spawn_app, spawn_app_with},
    operations::batch_with_failures,
    process::{BIN, env_for},
};

/// What one run of the CLI did.
#[derive(Debug)]
pub(crate) struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Asserts exit 0 and no error output; returns stdout.
    pub(crate) fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "{self:?}");
        assert!(self.stderr.is_empty(), "{self:?}");
        &self.stdout
    }

    /// Asserts exit 0 and returns stdout as JSON.
    fn json(&self) -> Value {
        serde_json::from_str(self.ok()).unwrap_or_else(|e| panic!("JSON ({e}): {self:?}"))
    }

    /// Asserts exit 1 with one line on stderr, naming `what`, and nothing on stdout.
    fn fails_with(&self, what: &str) {
        assert_eq!(self.code, Some(1), "{self:?}");
        assert!(self.stdout.is_empty(), "{self:?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {self:?}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(what),
            "{what:?} in {self:?}"
        );
    }
}

/// Runs `invite-worker <args>` on the test's database (settings through the
/// environment, as `process::Service` does), with `stdin` as its input.
pub(crate) fn cli_with_stdin(settings: &Settings, args: &[&str], stdin: &str) -> Run {
    let mut child = Command::new(BIN)
        .args(args)
        .envs(env_for(settings))
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("the binary exits");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn cli(settings: &Settings, args: &[&str]) -> Run {
    cli_with_stdin(settings, args, "")
}

/// The audit log's (actor, action, target), oldest first.
async fn audit(app: &TestApp) -> Vec<(String, String, String)> {
    sqlx::query_as("SELECT actor, action, target FROM audit_log ORDER BY id")
        .fetch_all(&app.pool)
        .await
        .expect("audit log")
}

fn me() -> String {
    format!("cli:{}", whoami::username().expect("a user name"))
}

#[tokio::test]
async fn status_shows_the_queue_and_batches_by_status_as_a_table_and_as_json() {
    let app = prepare_app_with(|_| {}).await;
    // No worker runs: two tasks due for half a minute, one due in an hour.
    sqlx::query(
        "INSERT INTO apalis.jobs (job, id, job_type, status, attempts, max_attempts, run_at)
         VALUES ('{}'::bytea, '01J00000000000000000000001', $1, 'Pending', 0, 10,
                 now() - interval '30 seconds'),
                ('{}'::bytea, '01J00000000000000000000002', $1, 'Pending', 0, 10, now()),
                ('{}'::bytea, '01J00000000000000000000003', $1, 'Pending', 0, 10,
                 now() + interval '1 hour')",
    )
    .bind(invite_worker::db::tasks::QUEUE)
    .execute(&app.pool)
    .await
    .expect("tasks");

    let status = cli(&app.settings, &["--json", "status"]).json();
    assert_eq!(
        status["tasks"],
        json!({"pending": 2, "scheduled": 1, "running": 0, "done": 0, "dead": 0})
    );
    let age = status["oldest_pending_age_secs"].as_i64().expect("age");
    assert!((30..40).contains(&age), "{status}");
    assert_eq!(status["workers"], json!([]));
    assert_eq!(status["sent_last_minute"], 0);
    assert_eq!(
        status["batches"],
        json!({"queued": 0, "running": 0, "completed": 0, "cancelled": 0})
    );

    let text = cli(&app.settings, &["status"]).ok().to_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["TASKS", "PENDING", "SCHEDULED", "RUNNING", "DONE", "DEAD"],
        "{text}"
    );
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["2", "1", "0", "0", "0"],
        "{text}"
    );
    assert!(text.contains("oldest pending: 3"), "{text}");
    assert!(text.contains("\ncompleted  0\n"), "{text}");
}

#[tokio::test]
async fn an_operator_command_on_an_unmigrated_or_unreachable_database_fails_in_one_line() {
    let app = prepare_app_with(|_| {}).await;
    let mut settings = app.settings.clone();
    let bare = format!("{}_bare", crate::helpers::database_name(&settings));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {bare}")))
        .execute(&app.pool)
        .await
        .expect("create an empty database");
    settings.database.url =
        invite_worker::config::Secret::new(format!("{}/{bare}", crate::helpers::server_url()));
    cli(&settings, &["status"]).fails_with("not migrated");
    let _drop = crate::helpers::TestDatabase { name: bare };

    settings.database.url =
        invite_worker::config::Secret::new("postgres://postgres@127.0.0.1:1/none");
    cli(&settings, &["batches", "list"]).fails_with("could not connect");
    cli(&app.settings, &["batches", "show", "not-a-uuid"]).fails_with("invalid value");
    cli(&app.settings, &["tasks", "retry"]).fails_with("--all");
}

#[tokio::test]
async fn batches_list_show_and_retry_by_reason_with_a_dry_run() {
    let app = spawn_app().await;
    let id = batch_with_failures(&app).await;
    app.open_job("job-other").await;
    let other = app.create_batch("job-other", candidates("o", 2)).await;
    app.wait_until_completed(&other).await;
    let s = &app.settings;

    // list: newest first, filters, limit.
    let all = cli(s, &["--json", "batches", "list"]).json();
    let ids: Vec<&str> = all["batches"]
        .as_array()
        .expect("batches")
        .iter()
        .filter_map(|b| b["id"].as_str())
        .collect();
    assert_eq!(ids, [other.as_str(), id.as_str()]);
    assert_eq!(
        all["batches"][1],
        app.batch(&id).await,
        "the API's resource"
    );
    let one = cli(s, &["--json", "batches", "list", "--job", "job-ops"]).json();
    assert_eq!(one["batches"].as_array().map(Vec::len), Some(1));
    assert_eq!(one["batches"][0]["id"], id.as_str());
    let none = cli(s, &["--json", "batches", "list", "--status", "running"]).json();
    assert_eq!(none, json!({"batches": []}));
    let limited = cli(s, &["--json", "batches", "list", "--limit", "1"]).json();
    assert_eq!(limited["batches"][0]["id"], other.as_str());
    let text = cli(s, &["batches", "list"]).ok().to_owned();
    assert!(text.starts_with("ID "), "{text}");
    assert!(
        text.lines()
            .nth(2)
            .is_some_and(|l| l.starts_with(&id) && l.contains("1 sent, 27 failed")),
        "{text}"
    );
    cli(s, &["batches", "list", "--limit", "0"]).fails_with("--limit");
    cli(s, &["batches", "list", "--status", "done"]).fails_with("done");

    // show: counts, summary, failure groups.
    let shown = cli(s, &["--json", "batches", "show", &id]).json();
    assert_eq!(shown["batch"]["counts"]["failed"], 27);
    assert_eq!(
        shown["failure_groups"],
        app.get_json(&format!("/v1/batches/{id}/failures")).await["groups"],
        "the API's groups"
    );
    let text = cli(s, &["batches", "show", &id]).ok().to_owned();
    assert!(text.contains("summary   1 sent, 27 failed"), "{text}");
    assert!(
        text.lines().any(|l| {
            l.split_whitespace().collect::<Vec<_>>()
                == ["rejected", "550", "5.1.1", "3", "gone-0,gone-1,gone-2"]
        }),
        "{text}"
    );
    cli(
        s,
        &["batches", "show", "00000000-0000-7000-8000-000000000000"],
    )
    .fails_with("no batch with id");

    // retry: a dry run changes nothing, then the real one puts back one reason's items.
    let before = app.batch(&id).await;
    let dry = cli(
        s,
        &[
            "--json",
            "batches",
            "retry",
            &id,
            "--reason",
            "rejected",
            "--dry-run",
        ],
    )
    .json();
    assert_eq!(
        dry,
        json!({"would_retry": 4, "candidate_ids": ["gone-0", "gone-1", "gone-2", "policy-0"]})
    );
    let text = cli(s, &["batches", "retry", &id, "--dry-run"])
        .ok()
        .to_owned();
    assert!(text.starts_with("would retry 27: bad-00,"), "{text}");
    assert_eq!(app.batch(&id).await, before, "a dry run changes nothing");
    assert!(
        audit(&app)
            .await
            .iter()
            .all(|(_, a, _)| a != "batch.retried")
    );

    let text = cli(
        s,
        &["batches", "retry", &id, "--reason", "retries_exhausted"],
    )
    .ok()
    .to_owned();
    assert!(
        text.starts_with(&format!("retried 1 items of batch {id}")),
        "{text}"
    );
    let batch = app.wait_until_completed(&id).await;
    assert_eq!(batch["summary"], "2 sent, 26 failed");
    let retried = (me(), "batch.retried".to_owned(), id.clone());
    assert!(
        audit(&app).await.contains(&retried),
        "{:?}",
        audit(&app).await
    );
    let json = cli(
        s,
        &["--json", "batches", "retry", &id, "--reason", "rejected"],
    )
    .json();
    assert_eq!(json["retried"], 4);
    assert_eq!(json["batch"]["status"], "running");
    cli(
        s,
        &["batches", "retry", &id, "--reason", "retries_exhausted"],
    )
    .fails_with("no failed items to retry");
    cli(s, &["batches", "retry", &id, "--reason", "cancelled"]).fails_with("skipping");
}

#[tokio::test]
async fn batches_cancel_skips_pending_items_and_refuses_a_finished_batch() {
    // Transient failures retried in a minute: the items wait, pending, between tries.
    let app = spawn_app_with(|s| {
        s.retry.initial_delay_ms = 60_000;
        s.retry.max_delay_ms = 60_000;
    })
    .await;
    app.open_job("job-c").await;
    app.smtp
        .set_default(Step::DataReply(451, "4.3.0 try again later".into()));
    let first = app.create_batch("job-c", candidates("c", 2)).await;
    let second = app.create_batch("job-c", candidates("d", 2)).await;
    for id in [&first, &second] {
        app.wait_for_items(id, "a first try", Duration::from_secs(20), |items| {
            items
                .iter()
                .all(|i| i["attempts"] == 1 && i["last_error"].is_string())
        })
        .await;
    }
    let s = &app.settings;

    let text = cli(s, &["batches", "cancel", &first]).ok().to_owned();
    assert_eq!(
        text,
        format!("cancelled batch {first}: 0 sent, 0 failed, 2 skipped\n")
    );
    let json = cli(s, &["--json", "batches", "cancel", &second]).json();
    assert_eq!(json["status"], "cancelled");
    assert_eq!(json, app.batch(&second).await, "the API's resource");
    let cancelled = (me(), "batch.cancelled".to_owned(), first.clone());
    assert!(audit(&app).await.contains(&cancelled));

    cli(s, &["batches", "cancel", &first]).fails_with("is cancelled");
    cli(s, &["batches", "retry", &first]).fails_with("is cancelled");
}

#[tokio::test]
async fn tasks_dead_lists_tasks_apalis_gave_up_on_and_tasks_retry_runs_them_again() {
    let app = prepare_app_with(|_| {}).await;
    sqlx::query(
        "INSERT INTO apalis.jobs (job, id, job_type, status, attempts, max_attempts, run_at,
                                  last_result, done_at)
         VALUES ('garbage'::bytea, '01J00000000000000000000001', $1, 'Killed', 1, 10, now(),
                 '{\"Err\": \"undecodable\"}', now()),
                ($2, '01J00000000000000000000002', $1, 'Failed', 10, 10, now(),
                 '{\"Err\": \"database\"}', now()),
                ($2, '01J00000000000000000000003', $1, 'Failed', 3, 10, now(), NULL, NULL),
                ($2, '01J00000000000000000000004', $1, 'Done', 1, 10, now(), NULL, now())",
    )
    .bind(invite_worker::db::tasks::QUEUE)
    .bind(invite_worker::db::tasks::payload(uuid::Uuid::nil()).expect("payload"))
    .execute(&app.pool)
    .await
    .expect("tasks");
    let s = &app.settings;

    let dead = cli(s, &["--json", "tasks", "dead"]).json();
    let tasks = dead["tasks"].as_array().expect("tasks");
    let ids: Vec<&str> = tasks.iter().filter_map(|t| t["id"].as_str()).collect();
    assert_eq!(
        ids,
        ["01J00000000000000000000002", "01J00000000000000000000001"]
    );
    assert_eq!(tasks[0]["item_id"], uuid::Uuid::nil().to_string());
    assert_eq!(tasks[0]["last_result"], json!({"Err": "database"}));
    assert_eq!(tasks[1]["item_id"], Value::Null);
    let text = cli(s, &["tasks", "dead", "--limit", "1"]).ok().to_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "a header and one task: {text}");
    assert!(lines[0].starts_with("TASK "), "{text}");
    assert!(
        lines[1].starts_with("01J00000000000000000000002  "),
        "{text}"
    );

    let text = cli(s, &["tasks", "retry", "--id", "01J00000000000000000000001"])
        .ok()
        .to_owned();
    assert_eq!(text, "retried 1 dead tasks\n");
    let state: (String, i32) =
        sqlx::query_as("SELECT status, attempts FROM apalis.jobs WHERE id = $1")
            .bind("01J00000000000000000000001")
            .fetch_one(&app.pool)
            .await
            .expect("the task");
    assert_eq!(state, ("Pending".to_owned(), 0));
    let json = cli(s, &["--json", "tasks", "retry", "--all"]).json();
    assert_eq!(json, json!({"retried": 1}), "the other dead one only");
    assert_eq!(
        cli(s, &["--json", "tasks", "dead"]).json(),
        json!({"tasks": []})
    );
    let log = audit(&app).await;
    assert_eq!(
        log,
        [
            (
                me(),
                "tasks.retried".into(),
                "01J00000000000000000000001".into()
            ),
            (me(), "tasks.retried".into(), "all".into()),
        ]
    );
    cli(s, &["tasks", "retry", "--id", "nope"]).fails_with("not a task id");
    cli(
        s,
        &[
            "tasks",
            "retry",
            "--all",
            "--id",
            "01J00000000000000000000001",
        ],
    )
    .fails_with("cannot be used with");
}

/// The stored password hash of operator `name`.
async fn hash_of(app: &TestApp, name: &str) -> String {
    sqlx::query_scalar("SELECT password_hash FROM operators WHERE name = $1")
        .bind(name)
        .fetch_one(&app.pool)
        .await
        .expect("the operator")
}

#[tokio::test]
async fn operators_are_added_with_an_argon2id_password_listed_and_removed() {
    use invite_worker::domain::access::verify_password;
    let app = prepare_app_with(|_| {}).await;
    let s = &app.settings;

    // A generated one-time password, printed once, stored only as its hash.
    let text = cli(s, &["operators", "add", "alice", "--role", "operator"])
        .ok()
        .to_owned();
    let password = text
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .expect("the password is printed")
        .to_owned();
    assert!(password.len() >= 32, "{text}");
    let hash = hash_of(&app, "alice").await;
    assert!(hash.starts_with("$argon2id$") && !hash.contains(&password));
    assert!(verify_password(&password, &hash));

    // Or the operator's own, from stdin.
    let own = "a long passphrase of mine";
    let json = cli_with_stdin(
        s,
        &[
            "--json",
            "operators",
            "add",
            "bob",
            "--role",
            "viewer",
            "--password-stdin",
        ],
        &format!("{own}\n"),
    )
    .json();
    assert_eq!(
        json,
        json!({"name": "bob", "role": "viewer", "password": null})
    );
    assert!(verify_password(own, &hash_of(&app, "bob").await));

    cli(s, &["operators", "add", "alice", "--role", "viewer"]).fails_with("exists already");
    cli_with_stdin(
        s,
        &[
            "operators",
            "add",
            "carol",
            "--role",
            "viewer",
            "--password-stdin",
        ],
        "short\n",
    )
    .fails_with("at least 12");
    cli(s, &["operators", "add", "dave", "--role", "root"]).fails_with("root");
    cli(s, &["operators", "add", "-x", "--role", "viewer"]).fails_with("error");
    cli(s, &["operators", "add", "a b", "--role", "viewer"]).fails_with("operator name");

    let list = cli(s, &["--json", "operators", "list"]).json();
    let names: Vec<(&str, &str)> = list["operators"]
        .as_array()
        .expect("operators")
        .iter()
        .map(|o| {
            (
                o["name"].as_str().unwrap_or(""),
                o["role"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(names, [("alice", "operator"), ("bob", "viewer")]);
    assert!(!list.to_string().contains("argon2"), "no hash is listed");
    let text = cli(s, &["operators", "list"]).ok().to_owned();
    assert!(text.starts_with("NAME "), "{text}");
    assert!(
        text.lines()
            .nth(2)
            .is_some_and(|l| l.starts_with("bob    viewer")),
        "{text}"
    );

    assert_eq!(
        cli(s, &["operators", "remove", "bob"]).ok(),
        "removed operator bob\n"
    );
    assert_eq!(
        cli(s, &["--json", "operators", "remove", "alice"]).json(),
        json!({"removed": "alice"})
    );
    cli(s, &["operators", "remove", "bob"]).fails_with("no operator named");
    assert_eq!(
        cli(s, &["--json", "operators", "list"]).json(),
        json!({"operators": []})
    );

    let log = audit(&app).await;
    assert_eq!(
        log,
        [
            (me(), "operator.added".into(), "alice".into()),
            (me(), "operator.added".into(), "bob".into()),
            (me(), "operator.removed".into(), "bob".into()),
            (me(), "operator.removed".into(), "alice".into()),
        ]
    );
}
