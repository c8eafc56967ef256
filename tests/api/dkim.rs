//! DKIM: with `[dkim]` set, every message is signed, with an RSA key (PKCS#1 or PKCS#8
//! PEM) or an Ed25519 key (PKCS#8 PEM); the signature is checked by an independent
//! verifier, Python's dkimpy, against the public key as DNS would publish it. A message
//! changed after signing fails the check.

use std::{io::Write, path::Path, process::Command};

use base64::{Engine, engine::general_purpose::STANDARD};
use invite_worker::{config::MailTransport, mail::Mailer};
use smtp_testkit::SmtpServer;

use crate::helpers::test_settings;

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
    out.stdout
}

/// The `p=` value of the key's DNS record: the public key's DER (RSA), or its 32 raw
/// bytes (Ed25519).
fn dns_public_key(private_pem: &Path, ed25519: bool) -> String {
    let der = openssl(&[
        "pkey",
        "-in",
        &private_pem.to_string_lossy(),
        "-pubout",
        "-outform",
        "DER",
    ]);
    let key = if ed25519 {
        &der[der.len() - 32..]
    } else {
        &der[..]
    };
    STANDARD.encode(key)
}

/// dkimpy's verdict on `raw`, with the DNS record `v=DKIM1; k=…; p=…`.
fn dkimpy_verifies(raw: &[u8], k: &str, p: &str) -> bool {
    let script = "import dkim, sys\n\
                  record = ('v=DKIM1; k=%s; p=%s' % (sys.argv[1], sys.argv[2])).encode()\n\
                  ok = dkim.verify(sys.stdin.buffer.read(), dnsfunc=lambda name, timeout=5: record)\n\
                  sys.stdout.write('valid' if ok else 'invalid')";
    let mut python = Command::new("python3")
        .args(["-c", script, k, p])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs (pip install dkimpy pynacl)");
    python
        .stdin
        .take()
        .expect("stdin")
        .write_all(raw)
        .expect("writes");
    let out = python.wait_with_output().expect("python3 answers");
    assert!(out.status.success(), "dkimpy ran: {out:?}");
    String::from_utf8_lossy(&out.stdout) == "valid"
}

#[tokio::test]
async fn signatures_of_rsa_and_ed25519_keys_verify_with_dkimpy_and_a_changed_message_does_not() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = |name: &str| dir.path().join(name);
    let rsa8 = path("rsa-pkcs8.pem");
    let rsa1 = path("rsa-pkcs1.pem");
    let ed = path("ed25519.pem");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        &s(&rsa8),
    ]);
    openssl(&["rsa", "-in", &s(&rsa8), "-traditional", "-out", &s(&rsa1)]);
    openssl(&["genpkey", "-algorithm", "ED25519", "-out", &s(&ed)]);
    assert!(
        std::fs::read_to_string(&rsa1)
            .expect("pkcs1")
            .contains("BEGIN RSA PRIVATE KEY"),
        "a PKCS#1 file"
    );

    let smtp = SmtpServer::start().await.expect("SMTP server starts");
    for (key, k, ed25519) in [
        (&rsa8, "rsa", false),
        (&rsa1, "rsa", false),
        (&ed, "ed25519", true),
    ] {
        let mut settings = test_settings(smtp.port());
        settings.mail.transport = MailTransport::Smtp;
        settings.dkim.domain = "example.com".into();
        settings.dkim.selector = "invites".into();
        settings.dkim.private_key_path = Some(key.clone());
        let mailer = Mailer::new(&settings).expect("a mailer with a DKIM key");
        let to = format!(
            "{}@example.com",
            key.file_stem().unwrap_or_default().to_string_lossy()
        );
        let message = lettre::Message::builder()
            .from(settings.mail.from.parse().expect("mail.from"))
            .to(to.parse().expect("an address"))
            .subject("Interview invitation: Backend Engineer")
            .body("Your link: http://127.0.0.1:8080/i/abc\r\n".to_owned())
            .expect("a message");
        assert_eq!(mailer.send("dkim", &message).await, Ok(()));
        let received = smtp
            .messages()
            .into_iter()
            .find(|m| m.rcpt_to == [to.clone()])
            .expect("the message arrived");
        let raw = received.data.as_bytes();
        assert!(
            received.data.contains("DKIM-Signature:"),
            "signed: {}",
            received.data
        );

        let p = dns_public_key(key, ed25519);
        assert!(
            dkimpy_verifies(raw, k, &p),
            "{k} ({}) verifies",
            key.display()
        );
        let changed = received
            .data
            .replacen("Backend Engineer", "Frontend Engineer", 1);
        assert!(
            !dkimpy_verifies(changed.as_bytes(), k, &p),
            "{k}: a changed subject fails"
        );
    }
}

#[tokio::test]
async fn without_dkim_settings_nothing_is_signed_and_half_a_setting_is_refused() {
    let smtp = SmtpServer::start().await.expect("SMTP server starts");
    let settings = test_settings(smtp.port());
    assert!(!settings.dkim.enabled());
    let error = invite_worker::config::Settings::load_from(
        Path::new("/nonexistent/worker.toml"),
        false,
        [("INVITES_DKIM__DOMAIN".to_owned(), "example.com".to_owned())],
    )
    .expect_err("a domain without a selector and key is refused")
    .to_string();
    assert!(error.contains("dkim"), "{error}");
    let mailer = Mailer::new(&settings).expect("a mailer");
    let message = lettre::Message::builder()
        .from(settings.mail.from.parse().expect("mail.from"))
        .to("plain@example.com".parse().expect("an address"))
        .subject("Interview")
        .body("hello".to_owned())
        .expect("a message");
    assert_eq!(mailer.send("plain", &message).await, Ok(()));
    assert!(!smtp.messages()[0].data.contains("DKIM-Signature"));
}
