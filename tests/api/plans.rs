//! The group writers' statements are planned once per connection
//! (`db::writer_connection`), often while the tables are still nearly empty. Their plans must
//! reach every table through an index condition, or a plan made on an empty table
//! keeps reading the whole table once it has grown.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

use invite_worker::db::{
    self,
    tasks::{DELETE_FINISHED_TASKS, RECORD_OUTCOMES},
};
use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing_subscriber::{Layer, layer::SubscriberExt};

use crate::helpers::prepare_app_with;

/// Every scan of a table in `plan` (a node of `EXPLAIN (FORMAT JSON)`), with whether
/// it has an index condition.
fn table_scans(plan: &Value, out: &mut Vec<(String, String, bool)>) {
    if let Some(relation) = plan["Relation Name"].as_str() {
        let node = plan["Node Type"].as_str().unwrap_or_default();
        if node != "ModifyTable" {
            out.push((
                node.to_owned(),
                relation.to_owned(),
                plan.get("Index Cond").is_some(),
            ));
        }
    }
    for child in plan["Plans"].as_array().into_iter().flatten() {
        table_scans(child, out);
    }
}

/// The scans in `scans` without an index condition, except of `webhook_endpoints`: its
/// few rows (at most `webhooks.max_endpoints`) are read whole, by event type.
fn unbounded(scans: &[(String, String, bool)]) -> Vec<&(String, String, bool)> {
    scans
        .iter()
        .filter(|(_, relation, cond)| !cond && relation != "webhook_endpoints")
        .collect()
}

#[tokio::test]
async fn on_tiny_tables_the_writers_plans_reach_every_table_through_an_index_condition() {
    let app = prepare_app_with(|_| {}).await;
    // A row or two in every table, analysed: statistics that say "tiny", the worst
    // case for a plan that is kept while the tables grow.
    sqlx::raw_sql(
        "INSERT INTO jobs (id, title, status) VALUES ('job-1', 'Engineer', 'open');
         INSERT INTO batches (id, job_id, duration_minutes, on_duplicate, total, pending)
              VALUES ('00000000-0000-0000-0000-000000000001', 'job-1', 30, 'skip', 1, 1);
         INSERT INTO batch_items (id, batch_id, position, candidate_id, email, task_id)
              VALUES ('00000000-0000-0000-0000-000000000002',
                      '00000000-0000-0000-0000-000000000001', 1, 'c-1', 'c1@example.com',
                      '01J00000000000000000000000');
         INSERT INTO invitations (id, job_id, candidate_id, batch_id, item_id, token_hash,
                                  duration_minutes, expires_at)
              VALUES ('00000000-0000-0000-0000-000000000003', 'job-1', 'c-1',
                      '00000000-0000-0000-0000-000000000001',
                      '00000000-0000-0000-0000-000000000002', sha256('x'), 30, now());
         ANALYZE;",
    )
    .execute(&app.pool)
    .await
    .expect("a few rows, analysed");
    let mut conn = db::writer_connection(&app.pool)
        .await
        .expect("a writer connection");
    // Phase 3: one statement, explained directly.
    let statements = [(
        "record",
        "uuid[], text[], text[], text[], text[], text[], timestamptz[], text[], text[], text[], \
         bool[], text[], text[], text",
        RECORD_OUTCOMES,
    )];
    for (name, types, sql) in statements {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "PREPARE {name} ({types}) AS {sql}"
        )))
        .execute(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{name} prepares: {e}"));
        let nulls = vec!["NULL"; types.split(',').count()].join(", ");
        let plan: Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "EXPLAIN (FORMAT JSON) EXECUTE {name} ({nulls})"
        )))
        .fetch_one(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{name} explains: {e}"));
        let mut scans = Vec::new();
        table_scans(&plan[0]["Plan"], &mut scans);
        assert!(!scans.is_empty(), "{name}: no table scans found in {plan}");
        let unbounded = unbounded(&scans);
        assert!(
            unbounded.is_empty(),
            "{name}: scans without an index condition {unbounded:?} in {plan:#}"
        );
    }

    // Phase 1: the statements inside `prepare_items`, as PostgreSQL runs them there
    // (auto_explain hands each nested statement's plan to the client as a notice).
    let notices = Notices::default();
    let _capture =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(notices.clone()));
    sqlx::raw_sql(
        "LOAD 'auto_explain';
         SET auto_explain.log_min_duration = 0;
         SET auto_explain.log_nested_statements = on;
         SET auto_explain.log_format = json;
         SET auto_explain.log_level = notice;
         SET client_min_messages = notice;",
    )
    .execute(&mut *conn)
    .await
    .expect("auto_explain");
    let decision: String = sqlx::query_scalar(
        "SELECT decision FROM prepare_items(
                    ARRAY['00000000-0000-0000-0000-000000000002']::uuid[],
                    ARRAY['01J00000000000000000000000'],
                    ARRAY['00000000-0000-0000-0000-000000000004']::uuid[],
                    ARRAY[sha256('y')], 1)",
    )
    .fetch_one(&mut *conn)
    .await
    .expect("prepare_items runs");
    assert_eq!(
        decision, "send",
        "the whole path ran: lock, pair lock, mint, count"
    );
    let plans = notices.plans();
    let mut relations = BTreeSet::new();
    for plan in plans.iter().filter(|p| {
        p["Query Text"]
            .as_str()
            .is_some_and(|q| !q.contains("FROM prepare_items("))
    }) {
        let mut scans = Vec::new();
        table_scans(&plan["Plan"], &mut scans);
        let unbounded = unbounded(&scans);
        assert!(
            unbounded.is_empty(),
            "prepare_items: scans without an index condition {unbounded:?} in {plan:#}"
        );
        relations.extend(scans.into_iter().map(|(_, relation, _)| relation));
    }
    for table in ["batch_items", "batches", "jobs", "invitations"] {
        assert!(
            relations.contains(table),
            "prepare_items reads {table}: plans seen for {relations:?} in {plans:#?}"
        );
    }

    // Phase 3 run for real, the item failing and its batch completing, with an endpoint
    // subscribed to both events: every statement it runs, the fan-out trigger's nested
    // one included. `webhook_endpoints` is the one table read without an index (there
    // are few endpoints, and the lookup is by event type). Such a scan costs the
    // planner's penalty on this connection, far above JIT's thresholds: no plan may be
    // compiled, since that costs tens of milliseconds for microseconds of work.
    sqlx::raw_sql(
        "INSERT INTO webhook_endpoints (id, url, events, secret, created_by)
              VALUES ('00000000-0000-0000-0000-000000000005', 'https://hooks.example.com/',
                      ARRAY['item.failed', 'batch.completed'], 'whsec_dGVzdA==', 'key:test');",
    )
    .execute(&app.pool)
    .await
    .expect("an endpoint");
    let applied: Vec<(uuid::Uuid, String)> = sqlx::query_as(sqlx::AssertSqlSafe(
        "EXECUTE record (ARRAY['00000000-0000-0000-0000-000000000002']::uuid[],
                         ARRAY['01J00000000000000000000000'], ARRAY['failed'],
                         ARRAY['rejected'], ARRAY['550 5.7.1 no'], ARRAY[NULL]::text[],
                         ARRAY[NULL]::timestamptz[], ARRAY[NULL]::text[],
                         ARRAY['01J00000000000000000000000'], ARRAY[NULL]::text[],
                         ARRAY[false], ARRAY['rejected'], ARRAY['550 5.7.1 no'], 'plans')",
    ))
    .fetch_all(&mut *conn)
    .await
    .expect("record_outcomes runs");
    assert_eq!(applied.len(), 1, "the outcome was applied");
    let events: Vec<String> = sqlx::query_scalar(
        "SELECT e.type FROM webhook_events e JOIN webhook_deliveries d \
                            ON d.event_id = e.id ORDER BY e.type",
    )
    .fetch_all(&app.pool)
    .await
    .expect("events");
    assert_eq!(
        events,
        ["batch.completed", "item.failed"],
        "both events, delivered"
    );
    let plans = notices.plans();
    let nested = plans
        .iter()
        .filter(|p| {
            p["Query Text"]
                .as_str()
                .is_some_and(|q| q.contains("FROM webhook_endpoints"))
        })
        .count();
    assert!(
        nested > 0,
        "the fan-out trigger's statement was seen: {plans:#?}"
    );
    for plan in &plans {
        assert!(
            plan.get("JIT").is_none(),
            "a writer's statement was JIT-compiled: {plan:#}"
        );
        let mut scans = Vec::new();
        table_scans(&plan["Plan"], &mut scans);
        let unbounded = unbounded(&scans);
        assert!(
            unbounded.is_empty(),
            "record_outcomes: scans without an index condition {unbounded:?} in {plan:#}"
        );
    }
}

/// The notices the server sends, by way of sqlx's log events.
#[derive(Clone, Default)]
struct Notices(Arc<Mutex<Vec<String>>>);

impl Notices {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().expect("notices"))
    }

    /// The plans `auto_explain` sent (JSON after its prefix) since the last call.
    fn plans(&self) -> Vec<Value> {
        self.take()
            .iter()
            .filter_map(|n| {
                n.find('{')
                    .and_then(|at| serde_json::from_str(&n[at..]).ok())
            })
            .collect()
    }
}

impl<S: tracing::Subscriber> Layer<S> for Notices {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(Option<String>);
        impl Visit for Message {
            fn record_str(&mut self, field: &Field, value: &str) {
                if field.name() == "message" {
                    self.0 = Some(value.to_owned());
                }
            }
            fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" && self.0.is_none() {
                    self.0 = Some(format!("{value:?}"));
                }
            }
        }
        if event.metadata().target() == "sqlx::postgres::notice" {
            let mut message = Message(None);
            event.record(&mut message);
            if let Some(text) = message.0 {
                self.0.lock().expect("notices").push(text);
            }
        }
    }
}

/// Deleting finished tasks reads only the tasks made before the cut-off, through the
/// primary key (task ids are ULIDs, in the order they were made), not every row of
/// `apalis.jobs`: with 100,000 recently finished tasks kept (none old enough yet), the
/// plan is an index scan of the primary key that reads none of them.
#[tokio::test]
async fn deleting_finished_tasks_reads_an_index_not_the_whole_queue() {
    let app = prepare_app_with(|_| {}).await;
    // 100,000 tasks made and finished within the last minutes (ids from their times).
    let ids: Vec<String> = (0..100_000u64)
        .map(|n| {
            let made = std::time::SystemTime::now() - std::time::Duration::from_millis(n * 3);
            ulid::Ulid::from_datetime(made).to_string()
        })
        .collect();
    sqlx::query(
        "INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at,
                                  priority, metadata, done_at)
         SELECT id, 'invite-worker::send-invite', '\\x7b7d'::bytea, 'Done', 1, 10, now(), 0,
                ''::hstore, now()
           FROM unnest($1::text[]) AS id",
    )
    .bind(&ids)
    .execute(&app.pool)
    .await
    .expect("100,000 finished tasks");
    sqlx::query("ANALYZE apalis.jobs")
        .execute(&app.pool)
        .await
        .expect("analysed");
    let cutoff = ulid::Ulid::from_parts(
        ulid::Ulid::from_datetime(
            std::time::SystemTime::now() - std::time::Duration::from_secs(3600),
        )
        .timestamp_ms(),
        0,
    )
    .to_string();
    let plan: Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (FORMAT JSON, ANALYZE) {}",
        DELETE_FINISHED_TASKS
            .replace("$1", "'invite-worker::send-invite'")
            .replace("$2", "3600")
            .replace("$3", &format!("'{cutoff}'"))
    )))
    .fetch_one(&app.pool)
    .await
    .expect("explains");
    let scan = &plan[0]["Plan"]["Plans"][0];
    assert_eq!(scan["Node Type"], "Index Scan", "{plan:#}");
    assert_eq!(scan["Index Name"], "jobs_pkey", "{plan:#}");
    assert_eq!(scan["Actual Rows"], 0, "no finished task read: {plan:#}");
    assert_eq!(
        scan["Rows Removed by Filter"].as_u64().unwrap_or(0),
        0,
        "none read and filtered out: {plan:#}"
    );
}
