//! The mailer against an ordinary third-party SMTP server (aiosmtpd, installed by
//! `.ci/run`), over the three kinds of connection it offers: plain, STARTTLS with AUTH,
//! and implicit TLS. The server's certificate comes from a CA made for the test and
//! trusted through `smtp.tls_ca_file`; a server whose certificate nobody vouches for
//! is refused.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use invite_worker::{
    config::{MailTransport, Secret, SmtpTls},
    mail::{Mailer, SendError},
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use serde_json::Value;

use crate::helpers::test_settings;

/// aiosmtpd as a child process; killed when dropped.
pub(crate) struct Aiosmtpd {
    child: Child,
    pub(crate) port: u16,
    record: PathBuf,
}

impl Aiosmtpd {
    fn start(dir: &Path, tls: &str, auth: Option<&str>) -> Self {
        Self::start_with(dir, tls, auth, &[])
    }

    /// As `start`, with more options of `tests/support/aiosmtpd_server.py`
    /// (`--reject ADDRESS`, `--record-content`).
    pub(crate) fn start_with(dir: &Path, tls: &str, auth: Option<&str>, more: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let record = dir.join(format!("received-{tls}.jsonl"));
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/support/aiosmtpd_server.py"
        );
        let mut command = Command::new("python3");
        command
            .arg(script)
            .args(["--port", &port.to_string(), "--tls", tls])
            .arg("--record")
            .arg(&record)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if tls != "none" {
            command
                .arg("--cert")
                .arg(dir.join("server.pem"))
                .arg("--key")
                .arg(dir.join("server.key"));
        }
        if let Some(auth) = auth {
            command.args(["--auth", auth]);
        }
        command.args(more);
        let mut child = command
            .spawn()
            .expect("python3 runs tests/support/aiosmtpd_server.py (pip install aiosmtpd)");
        let stdout = child.stdout.take().expect("stdout");
        let mut first = String::new();
        BufReader::new(stdout)
            .read_line(&mut first)
            .expect("aiosmtpd answers");
        assert_eq!(first.trim(), "ready", "aiosmtpd started (is it installed?)");
        Self {
            child,
            port,
            record,
        }
    }

    pub(crate) fn received(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }
}

impl Drop for Aiosmtpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA, and a certificate for `localhost` signed by it, written to `dir` (ca.pem,
/// server.pem, server.key).
pub(crate) fn certificates(dir: &Path) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("a key")).expect("CA");
    let key = KeyPair::generate().expect("a key");
    let server = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("server params")
        .signed_by(&key, &ca)
        .expect("server certificate");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("ca.pem");
    std::fs::write(dir.join("server.pem"), server.pem()).expect("server.pem");
    std::fs::write(dir.join("server.key"), key.serialize_pem()).expect("server.key");
}

fn message(to: &str) -> lettre::Message {
    lettre::Message::builder()
        .from("Interviews <interviews@example.com>".parse().expect("from"))
        .to(to.parse().expect("an address"))
        .subject("Interview")
        .body("hello".to_owned())
        .expect("a message")
}

fn mailer(server: &Aiosmtpd, tls: SmtpTls, ca: Option<PathBuf>, auth: bool) -> Mailer {
    let mut settings = test_settings(server.port);
    settings.mail.transport = MailTransport::Smtp;
    settings.smtp.host = "localhost".into();
    settings.smtp.tls = tls;
    settings.smtp.tls_ca_file = ca;
    if auth {
        settings.smtp.username = "relay-user".into();
        settings.smtp.password = Secret::new("relay-password");
    }
    Mailer::new(&settings).expect("a mailer")
}

#[tokio::test]
async fn plain_starttls_with_auth_and_implicit_tls_all_deliver_to_a_third_party_server() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    certificates(dir.path());
    let ca = Some(dir.path().join("ca.pem"));

    let plain = Aiosmtpd::start(dir.path(), "none", None);
    let sent = mailer(&plain, SmtpTls::None, None, false)
        .send("p", &message("plain@example.com"))
        .await;
    assert_eq!(sent, Ok(()));

    let starttls = Aiosmtpd::start(dir.path(), "starttls", Some("relay-user:relay-password"));
    let m = mailer(&starttls, SmtpTls::Starttls, ca.clone(), true);
    // Two in a row: the second reuses the pooled, already encrypted connection.
    for to in ["one@example.com", "two@example.com"] {
        assert_eq!(m.send(to, &message(to)).await, Ok(()), "{to}");
    }

    let implicit = Aiosmtpd::start(dir.path(), "tls", None);
    let sent = mailer(&implicit, SmtpTls::Tls, ca, false)
        .send("t", &message("tls@example.com"))
        .await;
    assert_eq!(sent, Ok(()));

    let got = plain.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["tls"], false);
    let got = starttls.received();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got.iter().all(|m| m["tls"] == true && m["auth"] == true),
        "over TLS, authenticated: {got:?}"
    );
    let got = implicit.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["tls"], true);
}

#[tokio::test]
async fn a_server_whose_certificate_nobody_vouches_for_gets_nothing() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    certificates(dir.path());
    for (tls, mode) in [("starttls", SmtpTls::Starttls), ("tls", SmtpTls::Tls)] {
        let server = Aiosmtpd::start(dir.path(), tls, None);
        let sent = mailer(&server, mode, None, false)
            .send("x", &message("x@example.com"))
            .await;
        assert!(
            matches!(sent, Err(SendError::Transient(_))),
            "{tls}: refused, to be retried once the certificate is fixed: {sent:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(server.received().is_empty(), "{tls}: nothing delivered");
    }
}
