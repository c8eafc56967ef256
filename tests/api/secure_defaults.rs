//! Secure by default (operations.md §1), with the real binary: `serve`, `api` and `work`
//! refuse shipped or weak secrets and an SMTP password in clear, with one line naming
//! the key; `demo` is exempt; `secret` prints a strong value; logs name the API key,
//! never show it.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use invite_worker::{config::ApiKey, domain::access::Scope};
use reqwest::StatusCode;
use serde_json::json;

use crate::{
    helpers::{
        TestDatabase, candidates, database_name, prepare_app_with, server_url, test_settings,
    },
    process::{BIN, Service},
};

const EXIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn serve_api_and_work_refuse_shipped_or_weak_secrets_naming_the_key() {
    let app = prepare_app_with(|_| {}).await;
    let cases = [
        ("INVITES_API__KEYS", "dev-key-change-me", "api.keys"),
        ("INVITES_API__KEYS", "only-23-characters-long", "api.keys"),
        (
            "INVITES_INVITE__TOKEN_SECRET",
            "dev-secret-change-me",
            "invite.token_secret",
        ),
        (
            "INVITES_INVITE__TOKEN_SECRET",
            "31-bytes-is-one-byte-too-short",
            "invite.token_secret",
        ),
        ("INVITES_SMTP__USERNAME", "mailer", "smtp.tls"),
    ];
    for role in ["serve", "api", "work"] {
        for (var, value, named) in cases {
            let mut process = Service::new(role, &app.settings)
                .env(var, value)
                .start(role);
            let status = process.wait_exit(EXIT).await;
            let stderr = process.stderr();
            assert_eq!(
                status.code(),
                Some(2),
                "{role} with {var}={value}: {stderr}"
            );
            let lines: Vec<&str> = stderr.lines().collect();
            assert_eq!(lines.len(), 1, "one line: {stderr}");
            assert!(lines[0].contains(named), "{role}, {var}: {stderr}");
            if var != "INVITES_SMTP__USERNAME" && !value.starts_with("dev-") {
                assert!(
                    !stderr.contains(value),
                    "the weak value is not printed: {stderr}"
                );
            }
        }
    }
}

#[tokio::test]
async fn an_smtp_password_in_clear_starts_only_when_allowed_and_then_with_a_warning() {
    let app = prepare_app_with(|_| {}).await;
    let mut serve = Service::new("serve", &app.settings)
        .env("INVITES_SMTP__USERNAME", "mailer")
        .env("INVITES_SMTP__PASSWORD", "hunter2-smtp-password")
        .env("INVITES_SMTP__ALLOW_PLAINTEXT_AUTH", "true")
        .start("serve");
    serve.wait_ready(Duration::from_secs(30)).await;
    let stderr = serve.stderr();
    let warning = stderr
        .lines()
        .find(|l| l.contains("WARN") && l.contains("smtp.allow_plaintext_auth"));
    assert!(warning.is_some(), "a warning at start: {stderr}");
    assert!(!stderr.contains("hunter2-smtp-password"), "{stderr}");
}

#[tokio::test]
async fn the_request_log_names_the_api_key_and_never_shows_it() {
    const WRITER: &str = "writer-key-for-the-log-test-0123456789";
    let mut app = prepare_app_with(|s| {
        s.api.keys.push(ApiKey::new(
            "recruiting-webapp",
            WRITER,
            &[Scope::BatchesWrite],
        ));
    })
    .await;
    let mut serve = Service::new("serve", &app.settings).start("serve");
    serve.wait_ready(Duration::from_secs(30)).await;
    app.base = serve.base();
    app.open_job("job-1").await;
    let r = app
        .client
        .post(app.url("/v1/batches"))
        .bearer_auth(WRITER)
        .json(&json!({"job_id": "job-1", "duration_minutes": 30, "candidates": candidates("c", 1)}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let stderr = serve.stderr();
    let enqueued = stderr
        .lines()
        .find(|l| l.contains("batch enqueued"))
        .unwrap_or_else(|| panic!("a batch enqueued line: {stderr}"));
    assert!(enqueued.contains("key=recruiting-webapp"), "{enqueued}");
    assert!(!stderr.contains(WRITER), "the key itself is never logged");
}

#[test]
fn secret_prints_a_strong_random_value_even_without_a_usable_configuration() {
    let run = || {
        let out = Command::new(BIN)
            .args(["--config", "/nonexistent/worker.toml", "secret"])
            .stdin(Stdio::null())
            .output()
            .expect("runs");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_owned()
    };
    let (a, b) = (run(), run());
    assert_ne!(a, b);
    assert!(a.len() >= 32, "{a}");
    assert!(
        a.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
        "URL-safe: {a}"
    );
}

#[tokio::test]
async fn the_demo_runs_with_the_shipped_values_on_loopback_and_says_so() {
    // The shipped worker.toml's values: no file in the working directory, no key in env.
    let settings = test_settings(0);
    let _database = TestDatabase {
        name: database_name(&settings),
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let url = format!("{}/{}", server_url(), database_name(&settings));
    let mut command = tokio::process::Command::new(BIN);
    command
        .arg("demo")
        .current_dir(dir.path())
        .env_remove("DATABASE_URL")
        .env("INVITES_DATABASE__URL", url)
        .env("INVITES_HTTP__BIND", "127.0.0.1:0")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("INVITES_")) {
        command.env_remove(key);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("the demo ends within 120 s")
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("94 sent, 6 failed"), "{stdout}");
    assert!(
        stdout.contains("shipped development key"),
        "says so: {stdout}"
    );
}
