//! Abuse limits (operations.md §2), against the real server over real sockets: slow
//! or silent clients are cut at their timeouts, the connection cap holds, and failed
//! authentications and redeem calls are rate limited per client address.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::{Instant, timeout},
};

use crate::{
    helpers::{KEY, expect_problem, prepare_app_with, spawn_app_with},
    process::Service,
};

async fn connect(app_base: &str) -> TcpStream {
    let addr = app_base.trim_start_matches("http://");
    TcpStream::connect(addr).await.expect("connects")
}

/// Reads until the server closes the connection (EOF or reset), within `within`;
/// returns what it sent and when it closed, or `None` if it is still open.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<(String, Duration)> {
    let start = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = start + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Some((
                    String::from_utf8_lossy(&received).into_owned(),
                    start.elapsed(),
                ));
            }
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads one response with a `Content-Length` body; returns its head and body.
async fn read_response(stream: &mut TcpStream) -> (String, String) {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("a response within 5 s")
            .expect("read");
        assert!(n > 0, "the connection closed before a whole response");
        received.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&received).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= length {
                return (head.to_owned(), body.to_owned());
            }
        }
    }
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

#[tokio::test]
async fn a_connection_that_sends_nothing_or_dribbles_its_head_is_closed_at_the_header_timeout() {
    let app = spawn_app_with(|s| {
        s.http.header_timeout_secs = 1;
        s.http.idle_timeout_secs = 30;
        s.http.request_timeout_secs = 30;
    })
    .await;

    let mut silent = connect(&app.base).await;
    let closed = closed_within(&mut silent, Duration::from_secs(5)).await;
    let (_, after) = closed.expect("a silent connection is closed");
    assert!(
        after >= Duration::from_millis(900),
        "not before the timeout: {after:?}"
    );

    // A head sent one byte every 100 ms (2.3 s in all) never completes.
    let mut slow = connect(&app.base).await;
    let started = Instant::now();
    let mut cut = false;
    for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" {
        if slow.write_all(&[*byte]).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (sent, _) = closed_within(&mut slow, Duration::from_secs(3))
        .await
        .expect("the slow head's connection is closed");
    assert!(
        cut || !sent.contains("200 OK"),
        "a head dribbled past the timeout is not answered: {sent:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(6));
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_at_the_idle_timeout_and_not_before() {
    let app = spawn_app_with(|s| {
        s.http.header_timeout_secs = 1;
        s.http.idle_timeout_secs = 3;
    })
    .await;
    let mut conn = connect(&app.base).await;
    conn.write_all(HEALTHZ).await.expect("write");
    let (head, _) = read_response(&mut conn).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // Idle longer than the header timeout, shorter than the idle timeout: still open.
    tokio::time::sleep(Duration::from_secs(2)).await;
    conn.write_all(HEALTHZ).await.expect("write");
    let (head, _) = read_response(&mut conn).await;
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "the connection was kept: {head}"
    );

    let (_, after) = closed_within(&mut conn, Duration::from_secs(8))
        .await
        .expect("an idle keep-alive connection is closed");
    assert!(
        after >= Duration::from_millis(2_500),
        "closed at the idle timeout, not the header timeout: {after:?}"
    );
}

#[tokio::test]
async fn a_body_sent_byte_by_byte_is_cut_at_the_request_timeout_with_a_408_problem() {
    let app = spawn_app_with(|s| {
        s.http.header_timeout_secs = 5;
        s.http.request_timeout_secs = 2;
    })
    .await;
    app.open_job("job-1").await;
    let before = app.row_counts().await;
    let conn = connect(&app.base).await;
    let (mut read, mut write) = conn.into_split();
    let head = format!(
        "POST /v1/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
    );
    write.write_all(head.as_bytes()).await.expect("write head");
    let started = Instant::now();
    // One byte every 100 ms, until the server stops taking them (or 10 s).
    let dribble = tokio::spawn(async move {
        while started.elapsed() < Duration::from_secs(10) {
            if write.write_all(b" ").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match timeout(Duration::from_secs(8), read.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
        }
    };
    dribble.abort();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        closed,
        "the connection is closed after the answer: {answer}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "cut at the request timeout, took {:?}",
        started.elapsed()
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    assert_eq!(app.row_counts().await, before, "nothing was written");
}

#[tokio::test]
async fn connections_above_the_cap_wait_until_one_closes() {
    let app = spawn_app_with(|s| {
        s.http.max_connections = 2;
        s.http.header_timeout_secs = 30;
    })
    .await;
    let first = connect(&app.base).await;
    let mut second = connect(&app.base).await;
    second.write_all(HEALTHZ).await.expect("write");
    let (head, _) = read_response(&mut second).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // Both permits are held: a third connection's request waits.
    let mut third = connect(&app.base).await;
    third.write_all(HEALTHZ).await.expect("write");
    let mut buf = [0u8; 64];
    let early = timeout(Duration::from_millis(1_500), third.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "the third connection is not served while two are open"
    );

    drop(first);
    let (head, _) = read_response(&mut third).await;
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "served once one closed: {head}"
    );
}

#[tokio::test]
async fn redeems_above_the_per_minute_limit_are_429_with_retry_after() {
    let app = spawn_app_with(|s| s.limits.redeems_per_minute = 3).await;
    for _ in 0..3 {
        let r = app.redeem("no-such-token").await;
        expect_problem(r, StatusCode::NOT_FOUND, "token_invalid").await;
    }
    let r = app.redeem("no-such-token").await;
    let retry_after: u64 = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After in seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    expect_problem(r, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;

    // Other routes are not counted against it.
    let r = app.get("/v1/batches").await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn after_too_many_failed_keys_wrong_keys_from_that_address_get_429_and_are_logged() {
    let secret_guess = "guess-7c1e0f3a9b";
    let mut app = prepare_app_with(|_| {}).await;
    let mut api = Service::new("api", &app.settings)
        .env("INVITES_LIMITS__AUTH_FAILURES_PER_MINUTE", "3")
        .start("api");
    api.wait_ready(Duration::from_secs(30)).await;
    app.base = api.base();

    for _ in 0..3 {
        let r = app
            .client
            .get(app.url("/v1/batches"))
            .bearer_auth(secret_guess)
            .send()
            .await
            .expect("request");
        expect_problem(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    let r = app
        .client
        .get(app.url("/v1/batches"))
        .bearer_auth(secret_guess)
        .send()
        .await
        .expect("request");
    assert!(r.headers().contains_key("retry-after"));
    expect_problem(r, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;

    // While the address is over its budget, a right key still works: clients behind
    // one proxy address cannot be locked out by a stranger's wrong guesses.
    let r = app.get("/v1/batches").await;
    assert_eq!(r.status(), StatusCode::OK);
    // The service routes need no key and stay open.
    let r = app
        .client
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);

    let log = api.stderr();
    let failures = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("authentication failed"))
        .collect::<Vec<_>>();
    assert_eq!(failures.len(), 4, "every failure is logged at WARN: {log}");
    assert!(
        failures.iter().all(|l| l.contains("client=127.0.0.1")),
        "{log}"
    );
    let limited = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("rate limited"))
        .count();
    assert_eq!(limited, 1, "every 429 is logged at WARN: {log}");
    assert!(
        !log.contains(secret_guess),
        "the presented secret is never logged"
    );
    assert!(!log.contains(KEY), "nor a right key");
}

#[tokio::test]
async fn a_work_process_serves_only_health_readiness_and_metrics() {
    let app = prepare_app_with(|_| {}).await;
    let mut work = Service::new("work", &app.settings).start("work");
    work.wait_ready(Duration::from_secs(30)).await;
    let get = |path: &str| app.client.get(format!("{}{path}", work.base())).send();
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            get(path).await.expect("request").status(),
            StatusCode::OK,
            "{path}"
        );
    }
    for path in ["/openapi.json", "/v1/batches"] {
        let r = get(path).await.expect("request");
        let problem: Value = expect_problem(r, StatusCode::NOT_FOUND, "not_found").await;
        assert_eq!(problem["status"], json!(404));
    }
}

#[tokio::test]
async fn a_request_head_larger_than_64_kib_is_refused_and_the_connection_closed() {
    let app = spawn_app_with(|_| {}).await;
    // Within the limit, a large header is fine.
    let mut fits = connect(&app.base).await;
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(48 * 1024)
    );
    fits.write_all(head.as_bytes()).await.expect("write");
    let (head, _) = read_response(&mut fits).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // Past it, the connection is answered 431 and closed without buffering the rest
    // (hyper's default buffer is ~400 KiB per connection).
    let mut large = connect(&app.base).await;
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(200 * 1024)
    );
    let _ = large.write_all(head.as_bytes()).await; // may be cut mid-way
    let (answer, _) = closed_within(&mut large, Duration::from_secs(5))
        .await
        .expect("the connection is closed");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
}
