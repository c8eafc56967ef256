//! Nothing personal or secret leaves through logs or files (operations.md §5): the real
//! binary at `RUST_LOG=trace`, sending over STARTTLS with AUTH to a third-party server
//! (aiosmtpd) that refuses one recipient quoting its address, logs no token, no
//! message body, no SMTP password and no unmasked address; the `file` transport writes
//! messages only its owner can read.

use std::time::Duration;

use base64::Engine;
use invite_worker::{config::MailTransport, mail::Mailer};
use serde_json::json;

use crate::{
    helpers::{KEY, link_in, prepare_app_with, test_settings},
    process::Service,
    smtp_tls::{Aiosmtpd, certificates},
};

const USER: &str = "relay-user";
const PASSWORD: &str = "Relay-Pa55word-9f3c1e";

#[tokio::test]
async fn at_trace_level_the_logs_hold_no_token_body_password_or_unmasked_address() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    certificates(dir.path());
    let server = Aiosmtpd::start_with(
        dir.path(),
        "starttls",
        Some(&format!("{USER}:{PASSWORD}")),
        &["--record-content", "--reject", "grace.hopper@example.com"],
    );
    let mut app = prepare_app_with(|s| {
        s.smtp.port = server.port;
        s.mail.transport = MailTransport::Smtp;
    })
    .await;
    let ca = dir.path().join("ca.pem");
    let mut serve = Service::new("serve", &app.settings)
        .env("RUST_LOG", "trace")
        .env("INVITES_SMTP__HOST", "localhost")
        .env("INVITES_SMTP__TLS", "starttls")
        .env("INVITES_SMTP__USERNAME", USER)
        .env("INVITES_SMTP__PASSWORD", PASSWORD)
        .env("INVITES_SMTP__TLS_CA_FILE", ca.display().to_string())
        .start("serve");
    serve.wait_ready(Duration::from_secs(30)).await;
    app.base = serve.base();

    app.open_job("job-1").await;
    let batch = app
        .create_batch(
            "job-1",
            vec![
                json!({"id": "c-ada", "email": "ada.lovelace@example.com", "name": "Ada Lovelace"}),
                json!({"id": "c-grace", "email": "grace.hopper@example.com", "name": "Grace Hopper"}),
                json!({"id": "c-linus", "email": "Linus T <linus.t@example.com>", "name": "Linus T"}),
            ],
        )
        .await;
    let done = app.wait_until_completed(&batch).await;
    assert_eq!(done["summary"], "1 sent, 2 failed", "{done}");

    let received = server.received();
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0]["auth"], true, "sent with AUTH");
    let content = received[0]["content"]
        .as_str()
        .expect("the message")
        .to_owned();
    let link = link_in(&content, &app.settings.invite.link_base_url).expect("a link");
    let token = link.rsplit('/').next().expect("a token").to_owned();

    // Let the last lines of the outcome reach the file.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logs = serve.stderr();
    assert!(
        logs.contains("TRACE") && logs.contains("DEBUG"),
        "the process logged at TRACE and DEBUG"
    );
    assert!(
        logs.contains("g***@example.com"),
        "the refusal was logged, its address masked"
    );
    let engine = base64::engine::general_purpose::STANDARD;
    let forbidden = [
        ("the link token", token.clone()),
        ("the link", link.clone()),
        ("the SMTP password", PASSWORD.to_owned()),
        (
            "AUTH PLAIN's credentials",
            engine.encode(format!("\0{USER}\0{PASSWORD}")),
        ),
        ("AUTH LOGIN's password", engine.encode(PASSWORD)),
        ("the API key", KEY.to_owned()),
        ("the body", "You are invited to a".to_owned()),
        ("the body", "personal link".to_owned()),
        ("a name", "Ada Lovelace".to_owned()),
        ("a name", "Grace Hopper".to_owned()),
        ("an address", "ada.lovelace@example.com".to_owned()),
        ("an address", "grace.hopper@example.com".to_owned()),
        ("an address", "linus.t@example.com".to_owned()),
    ];
    let lower = logs.to_lowercase();
    let found: Vec<String> = forbidden
        .iter()
        .filter(|(_, text)| lower.contains(&text.to_lowercase()))
        .map(|(what, text)| {
            let at = lower.find(&text.to_lowercase()).unwrap_or_default();
            let line = logs[..at].rsplit('\n').next().unwrap_or_default();
            format!("{what} ({text}) in: {line}…")
        })
        .collect();
    assert!(found.is_empty(), "the logs leak:\n{}", found.join("\n"));
}

#[tokio::test]
async fn the_file_transport_writes_messages_only_their_owner_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut settings = test_settings(0);
    settings.mail.transport = MailTransport::File;
    settings.mail.outbox_dir = dir.path().join("outbox");
    let mailer = Mailer::new(&settings).expect("a mailer");
    let message = lettre::Message::builder()
        .from("Interviews <interviews@example.com>".parse().expect("from"))
        .to("ada@example.com".parse().expect("to"))
        .subject("Interview")
        .body("a link".to_owned())
        .expect("a message");
    // A file left behind readable by all is made private when written again.
    let path = settings.mail.outbox_dir.join("m-2.eml");
    std::fs::write(settings.mail.outbox_dir.join(".m-2.eml.tmp"), "old").expect("a stale file");
    std::fs::set_permissions(
        settings.mail.outbox_dir.join(".m-2.eml.tmp"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    for key in ["m-1", "m-2"] {
        assert_eq!(mailer.send(key, &message).await, Ok(()));
    }
    for file in [settings.mail.outbox_dir.join("m-1.eml"), path] {
        let mode = std::fs::metadata(&file)
            .expect("written")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{}: {mode:o}", file.display());
    }
    let files = std::fs::read_dir(&settings.mail.outbox_dir)
        .expect("the outbox")
        .count();
    assert_eq!(files, 2, "two messages, no temporary file left");
}
