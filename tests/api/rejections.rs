//! Every rejection the contract lists for `POST /v1/batches` answers its status and
//! stable `code` as `application/problem+json`, and writes nothing: no batch, item,
//! candidate, invitation or queue task. Also the not-found answers and the job routes.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{KEY, TestApp, candidates, expect_problem, spawn_app};

/// The open job every otherwise valid request names.
const OPEN_JOB: &str = "job-open";
/// A job that exists and is closed.
const CLOSED_JOB: &str = "job-closed";

/// A valid body for `POST /v1/batches` with `n` candidates on the open job.
fn valid_body(n: usize) -> Value {
    json!({"job_id": OPEN_JOB, "duration_minutes": 30, "candidates": candidates("c", n)})
}

/// `valid_body(n)` with one top-level field set to `value`.
fn body_with(n: usize, field: &str, value: Value) -> Value {
    let mut body = valid_body(n);
    body[field] = value;
    body
}

/// Which `Authorization` header a request carries.
#[derive(Debug, Clone, Copy)]
enum Auth {
    Key,
    Missing,
    Wrong,
}

/// What a request sends as its body.
#[derive(Debug, Clone)]
enum Body {
    /// Serialised JSON, `Content-Type: application/json`.
    Json(Value),
    /// These bytes under this `Content-Type`.
    Raw(&'static str, Vec<u8>),
}

/// One row of the table: a `POST /v1/batches` and the problem it must get.
struct Case {
    what: &'static str,
    auth: Auth,
    body: Body,
    status: StatusCode,
    code: &'static str,
    /// Each of these must appear in `detail`.
    detail_has: Vec<&'static str>,
    /// None of these may appear in `detail`.
    detail_lacks: Vec<&'static str>,
}

impl Case {
    fn new(what: &'static str, body: Body, status: StatusCode, code: &'static str) -> Self {
        Case {
            what,
            auth: Auth::Key,
            body,
            status,
            code,
            detail_has: Vec::new(),
            detail_lacks: Vec::new(),
        }
    }

    fn auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    fn detail_has(mut self, parts: &[&'static str]) -> Self {
        self.detail_has.extend_from_slice(parts);
        self
    }

    fn detail_lacks(mut self, parts: &[&'static str]) -> Self {
        self.detail_lacks.extend_from_slice(parts);
        self
    }
}

async fn send(app: &TestApp, case: &Case) -> reqwest::Response {
    let mut request = app.client.post(app.url("/v1/batches"));
    request = match case.auth {
        Auth::Key => request.bearer_auth(KEY),
        Auth::Missing => request,
        Auth::Wrong => request.bearer_auth("not-the-key"),
    };
    request = match &case.body {
        Body::Json(value) => request.json(value),
        Body::Raw(content_type, bytes) => request
            .header(reqwest::header::CONTENT_TYPE, *content_type)
            .body(bytes.clone()),
    };
    request.send().await.expect("the request is answered")
}

#[tokio::test]
async fn every_rejection_of_a_batch_answers_its_problem_code_and_leaves_nothing_behind() {
    let app = spawn_app().await;
    app.open_job(OPEN_JOB).await;
    let r = app.put_job(CLOSED_JOB, "Data Engineer", "closed").await;
    assert_eq!(r.status(), StatusCode::CREATED, "the closed job is created");
    let before = app.row_counts().await;

    let mut duplicated = candidates("c", 5);
    duplicated[2]["id"] = json!("c-0");
    duplicated[4]["id"] = json!("c-3");

    let mut wrong_type_nested = candidates("c", 2);
    wrong_type_nested[1]["email"] = json!(42);

    let mut bad_id = candidates("c", 2);
    bad_id[1]["id"] = json!("a b");

    let mut huge = candidates("c", 1);
    huge[0]["name"] = json!("x".repeat(1_100_000));

    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    let cases = vec![
        Case::new(
            "101 candidates, over the default max of 100",
            Body::Json(valid_body(101)),
            unprocessable,
            "batch_too_large",
        )
        .detail_has(&["101", "100", "2 batches"]),
        Case::new(
            "no candidates",
            Body::Json(valid_body(0)),
            unprocessable,
            "empty_batch",
        ),
        Case::new(
            "expected_count 2 for 3 candidates",
            Body::Json(body_with(3, "expected_count", json!(2))),
            unprocessable,
            "count_mismatch",
        )
        .detail_has(&["2", "3"]),
        Case::new(
            "c-0 and c-3 twice each",
            Body::Json(body_with(5, "candidates", json!(duplicated))),
            unprocessable,
            "duplicate_candidates",
        )
        .detail_has(&["c-0", "c-3"])
        .detail_lacks(&["c-1", "c-2"]),
        Case::new(
            "a 25-minute interview",
            Body::Json(body_with(2, "duration_minutes", json!(25))),
            unprocessable,
            "invalid_duration",
        )
        .detail_has(&["25"]),
        Case::new(
            "an unknown job",
            Body::Json(body_with(2, "job_id", json!("job-nobody-made"))),
            StatusCode::NOT_FOUND,
            "job_not_found",
        )
        .detail_has(&["job-nobody-made"]),
        Case::new(
            "a closed job",
            Body::Json(body_with(2, "job_id", json!(CLOSED_JOB))),
            StatusCode::CONFLICT,
            "job_closed",
        )
        .detail_has(&[CLOSED_JOB]),
        Case::new(
            "malformed JSON",
            Body::Raw(
                "application/json",
                br#"{"job_id": "job-open", "duration_minutes": 30, "candidates": ["#.to_vec(),
            ),
            unprocessable,
            "validation_failed",
        ),
        Case::new(
            "duration_minutes as a string",
            Body::Json(body_with(2, "duration_minutes", json!("thirty"))),
            unprocessable,
            "validation_failed",
        )
        .detail_has(&["duration_minutes"]),
        Case::new(
            "an email that is a number",
            Body::Json(body_with(2, "candidates", json!(wrong_type_nested))),
            unprocessable,
            "validation_failed",
        )
        .detail_has(&["candidates[1].email"]),
        Case::new(
            "no candidates field at all",
            Body::Json(json!({"job_id": OPEN_JOB, "duration_minutes": 30})),
            unprocessable,
            "validation_failed",
        )
        .detail_has(&["candidates"]),
        Case::new(
            "a candidate id with a space",
            Body::Json(body_with(2, "candidates", json!(bad_id))),
            unprocessable,
            "validation_failed",
        )
        .detail_has(&["candidates[1].id"]),
        Case::new(
            "no bearer key",
            Body::Json(valid_body(2)),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        )
        .auth(Auth::Missing),
        Case::new(
            "a wrong bearer key",
            Body::Json(valid_body(2)),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        )
        .auth(Auth::Wrong),
        Case::new(
            "a valid body sent as text/plain",
            Body::Raw(
                "text/plain",
                serde_json::to_vec(&valid_body(2)).expect("serialises"),
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        Case::new(
            "a body over 1 MiB",
            Body::Json(body_with(1, "candidates", json!(huge))),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
    ];

    for case in &cases {
        let response = send(&app, case).await;
        let problem = expect_problem(response, case.status, case.code).await;
        for field in ["type", "title"] {
            assert!(
                problem[field].as_str().is_some_and(|v| !v.is_empty()),
                "{}: the problem has a {field}: {problem}",
                case.what
            );
        }
        let detail = problem["detail"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: the problem has a detail string: {problem}", case.what));
        for part in &case.detail_has {
            assert!(
                detail.contains(part),
                "{}: detail names {part:?}: {detail:?}",
                case.what
            );
        }
        for part in &case.detail_lacks {
            assert!(
                !detail.contains(part),
                "{}: detail does not name {part:?}: {detail:?}",
                case.what
            );
        }
        assert_eq!(
            app.row_counts().await,
            before,
            "{}: no batch, item, candidate, invitation or queue task was written",
            case.what
        );
    }
    assert!(
        app.smtp.deliveries().is_empty(),
        "no rejected request led to a message"
    );
}

#[tokio::test]
async fn unknown_routes_and_unknown_or_malformed_batch_ids_answer_not_found() {
    let app = spawn_app().await;
    app.open_job(OPEN_JOB).await;
    let unknown_uuid = uuid::Uuid::now_v7();
    let paths = [
        "/v1/nothing-here".to_owned(),
        "/no-such-route".to_owned(),
        "/v1/batches/not-a-uuid".to_owned(),
        "/v1/batches/not-a-uuid/items".to_owned(),
        format!("/v1/batches/{unknown_uuid}"),
        format!("/v1/batches/{unknown_uuid}/items"),
        "/v1/jobs/job-nobody-made".to_owned(),
    ];
    for path in &paths {
        let problem = expect_problem(app.get(path).await, StatusCode::NOT_FOUND, "not_found").await;
        assert!(
            problem["detail"].is_string(),
            "GET {path}: a detail: {problem}"
        );
    }
}

#[tokio::test]
async fn put_job_answers_201_when_it_creates_and_200_when_it_updates_and_get_returns_the_job() {
    let app = spawn_app().await;

    let r = app.put_job("job-7", "Backend Engineer", "open").await;
    assert_eq!(r.status(), StatusCode::CREATED, "first PUT creates");
    let created: Value = r.json().await.expect("a job as JSON");
    assert_eq!(created["id"], "job-7");
    assert_eq!(created["title"], "Backend Engineer");
    assert_eq!(created["status"], "open");
    assert!(created["created_at"].is_string(), "{created}");
    assert!(created["updated_at"].is_string(), "{created}");

    let fetched = app.get_json("/v1/jobs/job-7").await;
    assert_eq!(fetched, created, "GET returns the job as PUT answered it");

    let r = app
        .put_job("job-7", "Staff Backend Engineer", "closed")
        .await;
    assert_eq!(r.status(), StatusCode::OK, "a second PUT updates");
    let updated: Value = r.json().await.expect("a job as JSON");
    assert_eq!(updated["id"], "job-7");
    assert_eq!(updated["title"], "Staff Backend Engineer");
    assert_eq!(updated["status"], "closed");
    assert_eq!(
        updated["created_at"], created["created_at"],
        "an update keeps created_at"
    );
    let (created_at, updated_at) = (
        parse_time(&updated["created_at"]),
        parse_time(&updated["updated_at"]),
    );
    assert!(updated_at >= created_at, "{updated}");

    let fetched = app.get_json("/v1/jobs/job-7").await;
    assert_eq!(fetched, updated, "GET returns the updated job");

    let r = app.put_job("job-7", "Staff Backend Engineer", "open").await;
    assert_eq!(r.status(), StatusCode::OK, "reopening is an update too");
    assert_eq!(app.get_json("/v1/jobs/job-7").await["status"], "open");

    let counts = app.row_counts().await;
    let jobs = counts
        .iter()
        .find(|(table, _)| table == "jobs")
        .map(|(_, n)| *n);
    assert_eq!(jobs, Some(1), "one job row after three PUTs: {counts:?}");
}

fn parse_time(v: &Value) -> chrono::DateTime<chrono::Utc> {
    v.as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
        .unwrap_or_else(|| panic!("an RFC 3339 time: {v}"))
}

/// The job is checked as the batch is written, under a lock on its row
/// (`db::tasks::create_batch`, one statement): a close that commits while the statement
/// waits for the row answers 409 and writes nothing. The test holds the job row while
/// the request runs, closes the job and lets go.
#[tokio::test]
async fn a_job_closed_while_its_batch_is_being_written_gets_409_and_leaves_no_trace() {
    let app = spawn_app().await;
    app.open_job(OPEN_JOB).await;
    let before = app.row_counts().await;

    let mut hold = app.pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE")
        .bind(OPEN_JOB)
        .execute(&mut *hold)
        .await
        .expect("hold the job row");
    let body = valid_body(3);
    let request = app.post_batch(&body);
    let close = async {
        // Wait until the request waits for the row, then close the job.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type = 'Lock'
                    AND query LIKE '%WITH job AS (%'",
            )
            .fetch_one(&app.pool)
            .await
            .expect("pg_stat_activity");
            if waiting > 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the request never waited for the job row"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        sqlx::query("UPDATE jobs SET status = 'closed' WHERE id = $1")
            .bind(OPEN_JOB)
            .execute(&mut *hold)
            .await
            .expect("close the job");
        hold.commit().await.expect("commit the close");
    };
    let (response, ()) = tokio::join!(request, close);
    expect_problem(response, StatusCode::CONFLICT, "job_closed").await;
    let after = app.row_counts().await;
    assert_eq!(after, before, "nothing was written");
}
