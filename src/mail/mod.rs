//! Sending: one `Mailer` for SMTP or an outbox folder, a per-process rate limit, a
//! whole-command timeout, and the classification every retry decision rests on.

mod dkim;
pub mod render;
mod smtp;

use std::{
    num::NonZeroU32,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use lettre::{
    Message,
    message::{Mailbox, dkim::DkimConfig},
};

use lettre::transport::smtp::response::Response;

use self::smtp::{SmtpClient, SmtpError};
use crate::{
    config::{MailTransport, Settings},
    domain::email::mask_addresses,
};

/// Why a send did not go through, split the way the retry policy needs it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Worth trying again later: a 4xx reply, a refused or dropped connection, a timeout.
    #[error("transient: {0}")]
    Transient(String),
    /// The server refused for good (5xx): retrying would not help.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl SendError {
    /// What a person reads in the item's `last_error`: the server's reply where there
    /// was one (`550 5.1.1 user unknown`), else what happened.
    pub(crate) fn detail(&self) -> &str {
        match self {
            SendError::Transient(d) | SendError::Permanent(d) => d,
        }
    }
}

enum Transport {
    Smtp(Arc<SmtpClient>),
    File { dir: PathBuf },
}

/// Sends invitation emails. Cheap to share (`Arc<Mailer>`).
pub struct Mailer {
    transport: Transport,
    from: Mailbox,
    timeout: Duration,
    limiter: DefaultDirectRateLimiter,
    /// `[dkim]`: every message is signed when set.
    dkim: Option<DkimConfig>,
}

impl Mailer {
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        let from: Mailbox = settings
            .mail
            .from
            .parse()
            .map_err(|e| anyhow::anyhow!("mail.from: {e}"))?;
        let transport = match settings.mail.transport {
            MailTransport::Smtp => Transport::Smtp(Arc::new(SmtpClient::new(settings)?)),
            MailTransport::File => {
                std::fs::create_dir_all(&settings.mail.outbox_dir).map_err(|e| {
                    anyhow::anyhow!(
                        "mail.outbox_dir: cannot create {}: {e}",
                        settings.mail.outbox_dir.display()
                    )
                })?;
                Transport::File {
                    dir: settings.mail.outbox_dir.clone(),
                }
            }
        };
        let per_second = NonZeroU32::new(settings.mail.rate_per_second).unwrap_or(NonZeroU32::MIN);
        Ok(Self {
            transport,
            from,
            timeout: settings.smtp_timeout(),
            limiter: RateLimiter::direct(Quota::per_second(per_second)),
            dkim: dkim::config(&settings.dkim)?,
        })
    }

    pub(crate) fn from(&self) -> &Mailbox {
        &self.from
    }

    /// Sends one message (DKIM-signed when `[dkim]` is set), waiting for the rate limit
    /// first. `key` names the message
    /// (the item's Message-ID); the file transport writes `{key}.eml`, so a repeated
    /// attempt overwrites rather than duplicates.
    ///
    /// Cancel-safe: the SMTP exchange runs in a task of its own, so a caller dropped
    /// mid-send (a worker ended by a database error drops its handlers) never leaves a
    /// half-finished connection in the pool for the next send to trip over; an exchange
    /// that outlasts `smtp.timeout_secs` is dropped with its connection.
    pub async fn send(&self, key: &str, message: &Message) -> Result<(), SendError> {
        self.until_ready().await;
        self.send_for_reply(key, message).await.map(|_reply| ())
    }

    /// Waits until the rate limit (`mail.rate_per_second`) lets one more message go,
    /// and takes its place. A delivery waits here before its attempt is stamped as on
    /// its way, so a cancel or an erasure never waits for a message that is only
    /// queued behind the rate limit.
    pub(crate) async fn until_ready(&self) {
        self.limiter.until_ready().await;
    }

    /// As [`Mailer::send`], without waiting for the rate limit (the caller has, with
    /// [`Mailer::until_ready`]), answering the server's reply to the message
    /// (`250 2.0.0 Ok: queued as …`; none for the file transport), for the attempt
    /// history.
    pub(crate) async fn send_for_reply(
        &self,
        key: &str,
        message: &Message,
    ) -> Result<Option<String>, SendError> {
        let signed;
        let message = match &self.dkim {
            Some(dkim) => {
                let mut copy = message.clone();
                copy.sign(dkim);
                signed = copy;
                &signed
            }
            None => message,
        };
        match &self.transport {
            Transport::File { dir } => write_eml(dir, key, message).await.map(|()| None),
            Transport::Smtp(client) => {
                let (client, timeout) = (Arc::clone(client), self.timeout);
                let (envelope, bytes) = (message.envelope().clone(), message.formatted());
                let exchange = async move {
                    match tokio::time::timeout(timeout, client.send(&envelope, &bytes)).await {
                        Ok(Ok(reply)) => Ok(Some(reply_line(&reply))),
                        Ok(Err(e)) => Err(classify(&e)),
                        Err(_elapsed) => Err(SendError::Transient(format!(
                            "timeout: no reply within {} s",
                            timeout.as_secs()
                        ))),
                    }
                };
                tokio::spawn(exchange)
                    .await
                    .unwrap_or_else(|e| Err(SendError::Transient(format!("send task failed: {e}"))))
            }
        }
    }
}

/// The first line of a reply as the server wrote it: `250 2.0.0 Ok: queued as X`.
fn reply_line(reply: &Response) -> String {
    match reply.first_line() {
        Some(line) => format!("{} {}", reply.code(), line.trim()),
        None => reply.code().to_string(),
    }
}

/// 5xx is permanent for the recipient; a 4xx, a refused or dropped connection, a
/// timeout or anything else the network did is transient (a drop after DATA is
/// ambiguous: the server may have kept the message, so the retry carries the same
/// Message-ID and link). Some 5xx replies are not about the recipient at all but about
/// us — a protocol slip (503, 5.5.x), authentication (530, 534, 535, 538), the sender
/// address (5.1.7, 5.1.8) — and must not fail a candidate for good: they are treated
/// as transient and logged as configuration problems.
fn classify(e: &SmtpError) -> SendError {
    let e = match e {
        SmtpError::Connect(io) => return SendError::Transient(format!("connection failed: {io}")),
        SmtpError::Smtp(e) => e,
    };
    let text = e.to_string();
    let detail = match e.status() {
        // "permanent error (550): 5.1.1 user unknown" → "550 5.1.1 user unknown"
        Some(code) => match text.split_once("): ") {
            Some((_, reply)) => format!("{code} {}", reply.trim()),
            None => code.to_string(),
        },
        None => text,
    };
    if !e.is_permanent() {
        return SendError::Transient(detail);
    }
    let code = e.status().map(|c| c.to_string()).unwrap_or_default();
    let enhanced = detail.split_whitespace().nth(1).unwrap_or_default();
    let ours = code == "503"
        || matches!(code.as_str(), "530" | "534" | "535" | "538")
        || enhanced.starts_with("5.5.")
        || matches!(enhanced, "5.1.7" | "5.1.8");
    if ours {
        tracing::error!(reply = %mask_addresses(&detail),
            "the mail server refused us, not the recipient: check [smtp] and mail.from");
        SendError::Transient(detail)
    } else {
        SendError::Permanent(detail)
    }
}

async fn write_eml(dir: &Path, key: &str, message: &Message) -> Result<(), SendError> {
    let safe: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let path = dir.join(format!("{safe}.eml"));
    let tmp = dir.join(format!(".{safe}.eml.tmp"));
    let io = |e: std::io::Error| SendError::Transient(format!("outbox: {e}"));
    write_private(&tmp, &message.formatted())
        .await
        .map_err(io)?;
    tokio::fs::rename(&tmp, &path).await.map_err(io)?;
    Ok(())
}

/// Writes `bytes` to `path`, readable and writable by the owner only (0600): a message
/// holds a live link and the candidate's address. The mode is set on the open file as
/// well, for a file left behind with other permissions (its creation mode would not
/// apply to it).
async fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    #[cfg(unix)]
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::AsyncWriteExt;
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path).await?;
    #[cfg(unix)]
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .await?;
    file.write_all(bytes).await?;
    file.flush().await
}
