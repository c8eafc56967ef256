//! Untrusted input: whatever arrives, the answer is never a 5xx, every error is
//! problem+json with a code, nothing reaches a mail header it should not, and what is
//! stored comes back verbatim.

use proptest::{prelude::*, test_runner::TestRunner};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{KEY, TestApp, candidates, expect_problem, spawn_app};

/// Checks one answer: below 500, and an error is problem+json with a string `code`.
async fn assert_sane(response: reqwest::Response, what: &str) -> Result<(), TestCaseError> {
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response
        .bytes()
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(
        status.as_u16() < 500,
        "{what}: {status} {}",
        String::from_utf8_lossy(&body)
    );
    if status.is_client_error() {
        prop_assert_eq!(
            content_type.as_str(),
            "application/problem+json",
            "{}",
            what
        );
        let problem: Value =
            serde_json::from_slice(&body).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(problem["code"].is_string(), "{what}: {problem}");
        prop_assert_eq!(problem["status"].as_u64(), Some(u64::from(status.as_u16())));
    }
    Ok(())
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
        // Plausible field values, so bodies often get past the first check.
        prop_oneof![
            Just(json!("job-1")),
            Just(json!(30)),
            Just(json!("a@example.com")),
            Just(json!("skip"))
        ],
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("job_id".to_owned()),
                    Just("duration_minutes".to_owned()),
                    Just("candidates".to_owned()),
                    Just("id".to_owned()),
                    Just("email".to_owned()),
                    Just("name".to_owned()),
                    Just("expected_count".to_owned()),
                    Just("on_duplicate".to_owned()),
                    Just("token".to_owned()),
                    Just("title".to_owned()),
                    Just("status".to_owned()),
                    "[a-z_]{1,12}"
                ],
                inner,
                0..7
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn run_cases<S: Strategy>(
    app: &TestApp,
    rt: &tokio::runtime::Runtime,
    cases: u32,
    strategy: S,
    check: impl Fn(&TestApp, S::Value) -> futures::future::BoxFuture<'_, Result<(), TestCaseError>>,
) where
    S::Value: std::fmt::Debug,
{
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        ..ProptestConfig::default()
    });
    let result = runner.run(&strategy, |input| rt.block_on(check(app, input)));
    if let Err(e) = result {
        panic!("{e}");
    }
}

fn with_runtime() -> (tokio::runtime::Runtime, TestApp) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let app = rt.block_on(async {
        let app = spawn_app().await;
        app.open_job("job-1").await;
        app
    });
    (rt, app)
}

#[test]
fn arbitrary_json_bodies_on_every_write_route_never_get_a_5xx() {
    let (rt, app) = with_runtime();
    let routes = prop_oneof![
        Just((Method::POST, "/v1/batches")),
        Just((Method::POST, "/v1/batches/preview")),
        Just((Method::PUT, "/v1/jobs/job-2")),
        Just((Method::POST, "/v1/invitations/redeem")),
        Just((
            Method::POST,
            "/v1/batches/00000000-0000-0000-0000-000000000000/retry"
        )),
    ];
    run_cases(
        &app,
        &rt,
        300,
        (routes, json_value()),
        |app, ((method, path), body)| {
            Box::pin(async move {
                let r = app
                    .client
                    .request(method.clone(), app.url(path))
                    .bearer_auth(KEY)
                    .json(&body)
                    .send()
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                assert_sane(r, &format!("{method} {path} {body}")).await
            })
        },
    );
}

#[test]
fn arbitrary_bytes_headers_and_path_ids_never_get_a_5xx() {
    let (rt, app) = with_runtime();
    let content_types = prop_oneof![
        Just(None),
        Just(Some("application/json".to_owned())),
        Just(Some("application/json; charset=utf-8".to_owned())),
        Just(Some("text/plain".to_owned())),
        Just(Some("application/problem+json".to_owned())),
        "[ -~]{0,30}".prop_map(Some),
    ];
    let auth = prop_oneof![
        Just(Some(format!("Bearer {KEY}"))),
        Just(None),
        "[ -~]{0,40}".prop_map(Some),
    ];
    let idempotency = prop_oneof![Just(None), "[ -~]{0,300}".prop_map(Some)];
    let id = prop_oneof![
        "[ -~]{0,40}",
        ".{0,20}",
        Just("00000000-0000-0000-0000-000000000000".to_owned())
    ];
    let paths = prop_oneof![
        Just("/v1/jobs/{}"),
        Just("/v1/batches/{}"),
        Just("/v1/batches/{}/items"),
        Just("/v1/batches/{}/cancel"),
        Just("/v1/invitations/{}"),
        Just("/v1/invitations/{}/revoke"),
        Just("/v1/batches?limit={}"),
        Just("/v1/batches/{}/items?status={}"),
    ];
    let methods = prop_oneof![
        Just(Method::GET),
        Just(Method::POST),
        Just(Method::PUT),
        Just(Method::DELETE)
    ];
    let body = prop::collection::vec(any::<u8>(), 0..200);
    let strategy = (methods, paths, id, content_types, auth, idempotency, body);
    run_cases(
        &app,
        &rt,
        300,
        strategy,
        |app, (method, path, id, ct, auth, key, body)| {
            Box::pin(async move {
                let encoded: String = form_urlencoded::byte_serialize(id.as_bytes()).collect();
                let path = path.replace("{}", &encoded);
                let mut request = app
                    .client
                    .request(method.clone(), app.url(&path))
                    .body(body);
                if let Some(ct) = &ct {
                    request = request.header("content-type", ct);
                }
                if let Some(auth) = &auth {
                    request = request.header("authorization", auth);
                }
                if let Some(key) = &key {
                    request = request.header("idempotency-key", key);
                }
                let r = request
                    .send()
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                assert_sane(r, &format!("{method} {path} ct={ct:?}")).await
            })
        },
    );
}

/// A string's bytes inside a JSON string literal: plain text, JSON escapes of control
/// characters (`\u0000` …), raw control bytes (not valid JSON), raw bytes that are not
/// UTF-8, or a mix.
fn hostile_json_string() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        3 => "[A-Za-z0-9@._:-]{1,8}".prop_map(String::into_bytes),
        3 => Just(b"\\u0000".to_vec()),
        2 => (0u8..0x20).prop_map(|c| format!("\\u{c:04x}").into_bytes()),
        1 => Just(b"\\u007f".to_vec()),
        1 => Just(b"\\u0085".to_vec()),
        1 => (0u8..0x20).prop_map(|c| vec![c]),
        1 => (0x80u8..=0xff).prop_map(|c| vec![c]),
        1 => Just(vec![0xed, 0xa0, 0x80]), // an encoded surrogate: not UTF-8
        1 => Just(b"\\ud800".to_vec()),    // a lone surrogate escape
    ];
    prop::collection::vec(piece, 0..6).prop_map(|pieces| pieces.concat())
}

/// A path segment of any bytes, percent-encoded (`%00`, `%ff`, …) or left as it is
/// where the URL allows.
fn hostile_segment() -> impl Strategy<Value = String> {
    let bytes = prop::collection::vec(any::<u8>(), 0..24);
    (bytes, any::<bool>()).prop_map(|(bytes, all)| {
        bytes
            .iter()
            .map(|b| {
                if !all && b.is_ascii_alphanumeric() {
                    char::from(*b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    })
}

/// Header value bytes an HTTP client can send: visible ASCII, tab, and obs-text
/// (0x80–0xff, which is not UTF-8 on its own).
fn hostile_header() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff], 0..40)
}

#[test]
fn nul_and_non_utf8_bytes_in_paths_headers_and_json_strings_never_get_a_5xx() {
    let (rt, app) = with_runtime();
    // (method, path, body shape): 0 a batch, 1 a job, 2 a token, 3 a retry.
    let routes = prop_oneof![
        6 => Just((Method::POST, "/v1/batches", 0)),
        3 => Just((Method::POST, "/v1/batches/preview", 0)),
        2 => Just((Method::PUT, "/v1/jobs/{}", 1)),
        1 => Just((Method::GET, "/v1/jobs/{}", 1)),
        1 => Just((Method::GET, "/v1/batches/{}", 0)),
        1 => Just((Method::GET, "/v1/batches/{}/items?status={}", 0)),
        2 => Just((Method::POST, "/v1/batches/{}/retry", 3)),
        1 => Just((Method::POST, "/v1/batches/{}/cancel", 0)),
        1 => Just((Method::GET, "/v1/batches?job_id={}&limit={}", 0)),
        1 => Just((Method::GET, "/v1/invitations?job_id={}&candidate_id={}", 0)),
        2 => Just((Method::POST, "/v1/invitations/redeem", 2)),
        1 => Just((Method::POST, "/v1/invitations/{}/revoke", 2)),
        1 => Just((Method::DELETE, "/v1/suppressions/{}", 2)),
        1 => Just((Method::GET, "/v1/suppressions?limit={}", 2)),
        1 => Just((Method::GET, "/{}", 2)),
        1 => Just((Method::GET, "/healthz/{}", 2)),
        1 => Just((Method::GET, "/v1/batches/{}/items/{}/attempts", 2)),
        1 => Just((Method::GET, "/v1/batches/00000000-0000-7000-8000-000000000000/items/{}/attempts?x={}", 2)),
        1 => Just((Method::GET, "/v1/batches/{}/failures", 2)),
        1 => Just((Method::DELETE, "/v1/candidates/{}", 2)),
        1 => Just((Method::GET, "/v1/audit?actor={}&action={}", 2)),
        1 => Just((Method::GET, "/v1/queue/dead?limit={}", 2)),
        1 => Just((Method::POST, "/v1/queue/dead/retry", 2)),
    ];
    // Bodies shaped like the real ones, with hostile bytes in their strings; each
    // route sends the shape it takes.
    // Each field is either a good value or hostile, so that one hostile field at a time
    // gets past the others' checks.
    let field = |good: &'static str| {
        prop_oneof![
            1 => Just(good.as_bytes().to_vec()),
            1 => hostile_json_string(),
        ]
    };
    let bodies = (field("c-1"), field("ada@example.com"), field("Ada")).prop_map(|(a, b, c)| {
        let q = |v: &[u8]| [b"\"".as_slice(), v, b"\""].concat();
        [
            [
                b"{\"job_id\":\"job-1\",\"duration_minutes\":30,\"candidates\":[{\"id\":"
                    .as_slice(),
                &q(&a),
                b",\"email\":",
                &q(&b),
                b",\"name\":",
                &q(&c),
                b"}]}",
            ]
            .concat(),
            [b"{\"title\":".as_slice(), &q(&c), b",\"status\":\"open\"}"].concat(),
            [b"{\"token\":".as_slice(), &q(&a), b"}"].concat(),
            [
                b"{\"candidates\":[{\"id\":".as_slice(),
                &q(&a),
                b",\"email\":",
                &q(&b),
                b"}]}",
            ]
            .concat(),
        ]
    });
    let auth = prop_oneof![
        3 => Just(format!("Bearer {KEY}").into_bytes()),
        1 => hostile_header(),
    ];
    let key = prop_oneof![3 => Just(None), 1 => hostile_header().prop_map(Some)];
    let strategy = (
        routes,
        hostile_segment(),
        hostile_segment(),
        bodies,
        auth,
        hostile_header(),
        key,
    );
    run_cases(
        &app,
        &rt,
        600,
        strategy,
        |app, ((method, template, shape), one, two, bodies, auth, other, key)| {
            Box::pin(async move {
                let body = bodies[shape].clone();
                let path = template.replacen("{}", &one, 1).replacen("{}", &two, 1);
                let header = |bytes: &[u8]| {
                    reqwest::header::HeaderValue::from_bytes(bytes)
                        .map_err(|e| TestCaseError::fail(e.to_string()))
                };
                let mut request = app
                    .client
                    .request(method.clone(), app.url(&path))
                    .header("authorization", header(&auth)?)
                    .header("content-type", "application/json")
                    .header("x-request-id", header(&other)?)
                    .body(body.clone());
                if let Some(key) = &key {
                    request = request.header("idempotency-key", header(key)?);
                }
                let r = request
                    .send()
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                assert_sane(
                    r,
                    &format!("{method} {path} {}", String::from_utf8_lossy(&body)),
                )
                .await
            })
        },
    );
}

#[tokio::test]
async fn oversized_and_deeply_nested_bodies_are_refused_and_write_nothing() {
    let app = spawn_app().await;
    app.open_job("job-1").await;
    let before = app.row_counts().await;

    let mut people = candidates("big", 100);
    people[0]["name"] = json!("x".repeat(1_100_000));
    let r = app
        .post_batch(&json!({"job_id": "job-1", "duration_minutes": 30, "candidates": people}))
        .await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let problem: Value = r.json().await.expect("problem");
    assert_eq!(problem["code"], "payload_too_large");

    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let r = app
        .client
        .post(app.url("/v1/batches"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(nested)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = r.json().await.expect("problem");
    assert_eq!(problem["code"], "validation_failed");

    assert_eq!(app.row_counts().await, before, "nothing was written");
}

/// Posts a one-candidate batch for job-1 to `path`: it must be 422 validation_failed
/// with a detail that starts with `field`.
async fn refused_naming(app: &TestApp, path: &str, person: Value, field: &str) {
    let body = json!({"job_id": "job-1", "duration_minutes": 30, "candidates": [person]});
    let r = app.post_json(path, &body).await;
    let problem = expect_problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with(field)),
        "{path} names {field}: {problem}"
    );
}

#[tokio::test]
async fn line_breaks_in_names_and_addresses_are_refused_and_never_reach_a_header() {
    let app = spawn_app().await;
    app.open_job("job-1").await;
    let before = app.row_counts().await;
    for (person, field) in [
        (
            json!({"id": "crlf-name", "email": "eve@example.com", "name": "Eve\r\nBcc: spy@evil.example\r\nX-Evil: 1"}),
            "candidates[0].name",
        ),
        (
            json!({"id": "crlf-mail", "email": "mallory@example.com\r\nBcc: spy@evil.example", "name": "Mallory"}),
            "candidates[0].email",
        ),
        (
            json!({"id": "lf-name", "email": "trent@example.com", "name": "Trent\nTo: spy@evil.example"}),
            "candidates[0].name",
        ),
    ] {
        refused_naming(&app, "/v1/batches", person, field).await;
    }
    assert_eq!(app.row_counts().await, before, "nothing was written");

    let people =
        json!([{"id": "unicode", "email": "zoe@example.com", "name": "Zoë Ångström 山田"}]);
    let id = app
        .create_batch_with(json!({"job_id": "job-1", "duration_minutes": 30, "candidates": people}))
        .await;
    let batch = app.wait_until_completed(&id).await;
    assert_eq!(batch["summary"], "1 sent, 0 failed");
    for m in app.smtp.deliveries() {
        assert_eq!(m.rcpt_to.len(), 1, "one recipient per message");
        let head = m
            .data
            .split("\r\n\r\n")
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        assert!(!head.contains("\nbcc:"), "{head}");
    }
    let zoe = app
        .smtp
        .messages()
        .into_iter()
        .find(|m| m.rcpt_to[0] == "zoe@example.com")
        .expect("zoe got mail");
    let to = zoe.header("To").expect("To header");
    assert!(to.is_ascii(), "non-ASCII names are encoded: {to}");
    assert!(to.contains("=?utf-8?"), "as an RFC 2047 encoded word: {to}");
    assert!(to.contains("<zoe@example.com>"), "{to}");
}

#[tokio::test]
async fn a_nul_or_control_character_in_a_stored_string_is_422_on_preview_and_create_alike() {
    let app = spawn_app().await;
    app.open_job("job-1").await;
    let before = app.row_counts().await;
    for (person, field) in [
        (
            json!({"id": "c-1", "email": "ada@example.com", "name": "Ada\u{0}"}),
            "candidates[0].name",
        ),
        (
            json!({"id": "c-1", "email": "ada@example.com\u{0}", "name": "Ada"}),
            "candidates[0].email",
        ),
        (
            json!({"id": "c-1", "email": "ada@example.com", "name": "Ada\u{1b}[31m"}),
            "candidates[0].name",
        ),
        (
            json!({"id": "c-1", "email": "ada@exa\tmple.com", "name": "Ada"}),
            "candidates[0].email",
        ),
        (
            json!({"id": "c-1", "email": "ada@example.com", "name": "Ada\u{85}"}),
            "candidates[0].name",
        ),
    ] {
        for path in ["/v1/batches/preview", "/v1/batches"] {
            refused_naming(&app, path, person.clone(), field).await;
        }
    }
    // The token and a job's title too.
    let r = app.redeem("abc\u{0}def").await;
    expect_problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    let r = app.put_job("job-2", "Title\u{0}", "open").await;
    expect_problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    assert_eq!(app.row_counts().await, before, "nothing was written");

    // A tab is free text's one allowed control character.
    let people = json!([{"id": "c-tab", "email": "ada@example.com", "name": "Ada\tLovelace"}]);
    let id = app
        .create_batch_with(json!({"job_id": "job-1", "duration_minutes": 30, "candidates": people}))
        .await;
    assert_eq!(app.items(&id, None).await[0]["name"], "Ada\tLovelace");
}

#[tokio::test]
async fn a_path_that_is_not_utf8_once_decoded_is_a_problem_not_plain_text() {
    let app = spawn_app().await;
    for (method, path, status, code) in [
        (
            Method::GET,
            "/v1/jobs/%ff",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::PUT,
            "/v1/jobs/%ff%fe",
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        ),
        (
            Method::DELETE,
            "/v1/suppressions/%ff@example.com",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::DELETE,
            "/v1/suppressions/a%00@example.com",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::GET,
            "/v1/batches/%ff",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (Method::GET, "/%ff", StatusCode::NOT_FOUND, "not_found"),
    ] {
        let r = app
            .client
            .request(method.clone(), app.url(path))
            .bearer_auth(KEY)
            .json(&json!({"title": "T", "status": "open"}))
            .send()
            .await
            .expect("request");
        expect_problem(r, status, code).await;
    }
}

#[tokio::test]
async fn data_after_the_json_document_is_malformed_json() {
    let app = spawn_app().await;
    app.open_job("job-1").await;
    let before = app.row_counts().await;
    let batch = r#"{"job_id": "job-1", "duration_minutes": 30, "candidates": [{"id": "c-1", "email": "ada@example.com"}]}"#;
    for (path, body) in [
        ("/v1/batches", format!("{batch} trailing")),
        ("/v1/batches", format!("{batch}{batch}")),
        ("/v1/batches/preview", format!("{batch}]")),
        (
            "/v1/invitations/redeem",
            r#"{"token": "x"} {"token": "y"}"#.to_owned(),
        ),
    ] {
        let r = app
            .client
            .post(app.url(path))
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request");
        let problem =
            expect_problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|d| d.contains("malformed JSON")),
            "{path}: {problem}"
        );
    }
    let r = app
        .client
        .put(app.url("/v1/jobs/job-2"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(r#"{"title": "T", "status": "open"}x"#)
        .send()
        .await
        .expect("request");
    expect_problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    assert_eq!(app.row_counts().await, before, "nothing was written");
}

#[tokio::test]
async fn the_retry_route_takes_only_json_and_ids_of_the_contract() {
    let app = spawn_app().await;
    app.open_job("job-1").await;
    let id = app
        .create_batch_with(json!({"job_id": "job-1", "duration_minutes": 30,
            "candidates": [{"id": "c-1", "email": "not-an-address"}]}))
        .await;
    app.wait_until_completed(&id).await;
    let path = format!("/v1/batches/{id}/retry");

    let r = app
        .client
        .post(app.url(&path))
        .bearer_auth(KEY)
        .header("content-type", "text/plain")
        .body(r#"{"candidates": [{"id": "c-1", "email": "ada@example.com"}]}"#)
        .send()
        .await
        .expect("request");
    expect_problem(
        r,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;

    for bad in [
        "x".repeat(129),
        "c-1/../c-2".to_owned(),
        String::new(),
        "c 1".to_owned(),
    ] {
        let r = app
            .post_json(&path, &json!({"candidates": [{"id": bad}]}))
            .await;
        let problem =
            expect_problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("candidates[0].id")),
            "{problem}"
        );
    }
    assert_eq!(
        app.items(&id, None).await[0]["status"],
        "failed",
        "nothing changed"
    );
}

#[tokio::test]
async fn a_retry_that_names_a_candidate_twice_is_refused_and_changes_nothing() {
    let app = spawn_app().await;
    app.open_job("job-1").await;
    let id = app
        .create_batch_with(json!({"job_id": "job-1", "duration_minutes": 30,
            "candidates": [{"id": "c-1", "email": "not-an-address"},
                           {"id": "c-2", "email": "also-not-one"}]}))
        .await;
    app.wait_until_completed(&id).await;
    let twice = json!({"candidates": [{"id": "c-1", "email": "ada@example.com"},
                                      {"id": "c-1", "email": "ada@example.com"}]});
    let r = app
        .post_json(&format!("/v1/batches/{id}/retry"), &twice)
        .await;
    let problem = expect_problem(r, StatusCode::UNPROCESSABLE_ENTITY, "duplicate_candidates").await;
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("c-1")),
        "{problem}"
    );
    let batch = app.batch(&id).await;
    assert_eq!(batch["status"], "completed");
    assert_eq!(
        batch["counts"],
        json!({"pending": 0, "sent": 0, "failed": 2, "skipped": 0})
    );

    // Once each, the retry goes through and the tally ends exact.
    let once = json!({"candidates": [{"id": "c-1", "email": "ada@example.com"}]});
    let r = app
        .post_json(&format!("/v1/batches/{id}/retry"), &once)
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let batch = app.wait_until_completed(&id).await;
    assert_eq!(
        batch["counts"],
        json!({"pending": 0, "sent": 1, "failed": 1, "skipped": 0})
    );
}

#[tokio::test]
async fn ids_and_names_with_sql_or_html_are_stored_and_returned_verbatim() {
    let app = spawn_app().await;
    let title = "Engineer'); DROP TABLE jobs;-- <script>alert(1)</script> & \"quotes\"";
    let r = app.put_job("job.sql:--1", title, "open").await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let job = app.get_json("/v1/jobs/job.sql:--1").await;
    assert_eq!(job["title"], title);

    let name = "Robert'); DROP TABLE candidates;-- <img src=x onerror=alert(1)>";
    let people = json!([{"id": "c:1--'x", "email": "bobby@example.com", "name": name}]);
    let r = app
        .post_batch(&json!({"job_id": "job.sql:--1", "duration_minutes": 30, "candidates": people}))
        .await;
    // A quote is outside the id alphabet: refused, naming the field.
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = r.json().await.expect("problem");
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("candidates[0].id")),
        "{problem}"
    );

    let people = json!([{"id": "c:1--x", "email": "bobby@example.com", "name": name}]);
    let id = app
        .create_batch_with(
            json!({"job_id": "job.sql:--1", "duration_minutes": 30, "candidates": people}),
        )
        .await;
    app.wait_until_completed(&id).await;
    let items = app.items(&id, None).await;
    assert_eq!(items[0]["candidate_id"], "c:1--x");
    assert_eq!(items[0]["name"], name);
}
