//! Sending: one `Mailer` for SMTP or an outbox folder, a per-process rate limit, a
//! whole-command timeout, and the classification every retry decision rests on.

pub mod render;

use std::{
    num::NonZeroU32,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use lettre::{
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
    message::Mailbox,
    transport::smtp::{
        PoolConfig,
        authentication::Credentials,
        client::{Tls, TlsParameters},
    },
};

use crate::config::{MailTransport, Settings, SmtpTls};

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

type Smtp = AsyncSmtpTransport<Tokio1Executor>;

enum Transport {
    /// Replaced after a timeout: a cancelled send may leave a half-finished connection
    /// in lettre's pool, which would hand the next send someone else's reply.
    Smtp(Arc<SmtpSlot>),
    File {
        dir: PathBuf,
    },
}

/// Sends invitation emails. Cheap to share (`Arc<Mailer>`).
pub struct Mailer {
    transport: Transport,
    from: Mailbox,
    timeout: Duration,
    limiter: DefaultDirectRateLimiter,
}

impl Mailer {
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        let from: Mailbox = settings
            .mail
            .from
            .parse()
            .map_err(|e| anyhow::anyhow!("mail.from: {e}"))?;
        let transport = match settings.mail.transport {
            MailTransport::Smtp => Transport::Smtp(Arc::new(SmtpSlot {
                current: RwLock::new(Arc::new(build_smtp(settings)?)),
                settings: settings.clone(),
            })),
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
        })
    }

    pub(crate) fn from(&self) -> &Mailbox {
        &self.from
    }

    /// Sends one message, waiting for the rate limit first. `key` names the message
    /// (the item's Message-ID); the file transport writes `{key}.eml`, so a repeated
    /// attempt overwrites rather than duplicates.
    ///
    /// Cancel-safe: the SMTP exchange runs in a task of its own, so a caller dropped
    /// mid-send (a worker ended by a database error drops its handlers) never leaves a
    /// half-finished connection in the pool for the next send to trip over.
    pub async fn send(&self, key: &str, message: &Message) -> Result<(), SendError> {
        self.limiter.until_ready().await;
        match &self.transport {
            Transport::File { dir } => write_eml(dir, key, message).await,
            Transport::Smtp(slot) => {
                let (slot, message, timeout) = (Arc::clone(slot), message.clone(), self.timeout);
                tokio::spawn(async move { slot.send(message, timeout).await })
                    .await
                    .unwrap_or_else(|e| Err(SendError::Transient(format!("send task failed: {e}"))))
            }
        }
    }
}

/// The SMTP transport in use, replaceable as a whole.
struct SmtpSlot {
    current: RwLock<Arc<Smtp>>,
    settings: Settings,
}

impl SmtpSlot {
    async fn send(&self, message: Message, timeout: Duration) -> Result<(), SendError> {
        let smtp = self
            .current
            .read()
            .map(|t| Arc::clone(&t))
            .unwrap_or_else(|poisoned| Arc::clone(&poisoned.into_inner()));
        match tokio::time::timeout(timeout, smtp.send(message)).await {
            Ok(Ok(_response)) => Ok(()),
            Ok(Err(e)) => {
                let (error, connection_suspect) = classify(&e);
                if connection_suspect {
                    self.replace(&smtp);
                }
                Err(error)
            }
            Err(_elapsed) => {
                self.replace(&smtp);
                Err(SendError::Transient(format!(
                    "timeout: no reply within {} s",
                    timeout.as_secs()
                )))
            }
        }
    }

    /// Swaps in a fresh transport (a new, empty pool) unless another send did already.
    fn replace(&self, stale: &Arc<Smtp>) {
        let Ok(fresh) = build_smtp(&self.settings) else {
            return;
        };
        let mut slot = self.current.write().unwrap_or_else(|p| p.into_inner());
        if Arc::ptr_eq(&slot, stale) {
            tracing::warn!("discarding the SMTP connection pool");
            *slot = Arc::new(fresh);
        }
    }
}

fn build_smtp(settings: &Settings) -> anyhow::Result<Smtp> {
    let s = &settings.smtp;
    let mut builder = Smtp::builder_dangerous(&s.host)
        .port(s.port)
        .timeout(Some(settings.smtp_timeout()))
        .pool_config(
            PoolConfig::new()
                .max_size(u32::try_from(settings.worker.concurrency).unwrap_or(u32::MAX))
                .idle_timeout(Duration::from_secs(30)),
        );
    builder = match s.tls {
        SmtpTls::None => builder.tls(Tls::None),
        SmtpTls::Starttls => builder.tls(Tls::Required(TlsParameters::new(s.host.clone())?)),
        SmtpTls::Tls => builder.tls(Tls::Wrapper(TlsParameters::new(s.host.clone())?)),
    };
    if !s.username.is_empty() {
        builder = builder.credentials(Credentials::new(
            s.username.clone(),
            s.password.expose().to_owned(),
        ));
    }
    Ok(builder.build())
}

/// 5xx is permanent for the recipient; a 4xx, a refused or dropped connection, a
/// timeout or anything else the network did is transient (a drop after DATA is
/// ambiguous: the server may have kept the message, so the retry carries the same
/// Message-ID and link). Some 5xx replies are not about the recipient at all but about
/// us — a protocol slip (503, 5.5.x), authentication (530, 534, 535, 538), the sender
/// address (5.1.7, 5.1.8) — and must not fail a candidate for good: they are treated
/// as transient and logged as configuration problems. The flag says whether the
/// connection itself is suspect and should not be reused.
fn classify(e: &lettre::transport::smtp::Error) -> (SendError, bool) {
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
        let suspect = e.status().is_none();
        return (SendError::Transient(detail), suspect);
    }
    let code = e.status().map(|c| c.to_string()).unwrap_or_default();
    let enhanced = detail.split_whitespace().nth(1).unwrap_or_default();
    let ours = code == "503"
        || matches!(code.as_str(), "530" | "534" | "535" | "538")
        || enhanced.starts_with("5.5.")
        || matches!(enhanced, "5.1.7" | "5.1.8");
    if ours {
        tracing::error!(reply = %detail, "the mail server refused us, not the recipient: check [smtp] and mail.from");
        (SendError::Transient(detail), true)
    } else {
        (SendError::Permanent(detail), false)
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
    tokio::fs::write(&tmp, message.formatted())
        .await
        .map_err(io)?;
    tokio::fs::rename(&tmp, &path).await.map_err(io)?;
    Ok(())
}
