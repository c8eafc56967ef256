//! The group writers' statements are planned once per connection
//! (`db::writer_connection`), often while the tables are still nearly empty. Their plans must
//! reach every table through an index condition, or a plan made on an empty table
//! keeps reading the whole table once it has grown.

use invite_worker::db::{
    self,
    delivery::{BEGIN_ATTEMPTS, LOCK_FOR_PREPARE, RECORD},
};
use serde_json::Value;

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
    let statements = [
        ("lock_for_prepare", "uuid[]", LOCK_FOR_PREPARE),
        (
            "begin_attempts",
            "uuid[], uuid[], bytea[], bool[], text[], text[], uuid[], int[], uuid[], int",
            BEGIN_ATTEMPTS,
        ),
        (
            "record",
            "uuid[], text[], text[], text[], text[], text[], timestamptz[], text[], text[]",
            RECORD,
        ),
    ];
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
        let unbounded: Vec<_> = scans.iter().filter(|(_, _, cond)| !cond).collect();
        assert!(
            unbounded.is_empty(),
            "{name}: scans without an index condition {unbounded:?} in {plan:#}"
        );
    }
}
