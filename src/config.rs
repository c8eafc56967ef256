//! Settings: the shipped `worker.toml` (compiled in as defaults), then the file given
//! with `--config`, then `INVITES_<SECTION>__<KEY>` variables, then `DATABASE_URL`.
//!
//! Loading fails with one line naming the key when a value is missing, of the wrong
//! type or out of range, so nothing ever starts half-configured.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use figment::{
    Figment,
    providers::{Format, Serialized, Toml},
};
use serde::{Deserialize, Deserializer, de::DeserializeOwned};

use lettre::message::Mailbox;
use sha2::{Digest, Sha256};

/// The scopes an [`ApiKey`] holds.
pub use crate::domain::access::Scope;

/// The shipped configuration file; its values are the defaults.
pub const DEFAULTS: &str = include_str!("../worker.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub http: HttpSettings,
    pub api: ApiSettings,
    pub worker: WorkerSettings,
    pub batch: BatchSettings,
    pub invite: InviteSettings,
    pub mail: MailSettings,
    pub smtp: SmtpSettings,
    pub retry: RetrySettings,
    pub dkim: DkimSettings,
    pub retention: RetentionSettings,
    pub limits: LimitsSettings,
    pub metrics: MetricsSettings,
    pub console: ConsoleSettings,
    pub webhooks: WebhookSettings,
}

/// The operators' web console at `/console` (see `http::console`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSettings {
    /// Served by `serve` and `api`; false serves no `/console` route at all.
    pub enabled: bool,
    /// A signed-in session ends this long after sign-in.
    pub session_hours: u32,
    /// Session cookies without `Secure`, for plain-HTTP use on one's own machine.
    pub insecure_cookie: bool,
}

/// Webhook delivery (operations.md §4; see `queue::webhooks`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// A whole attempt (connect, TLS, request, answer) ends after this.
    pub timeout_secs: u64,
    /// The waits before the second, third, … attempt; after the last, the delivery fails.
    #[serde(deserialize_with = "list")]
    pub retry_schedule_secs: Vec<u64>,
    /// Allows `http://` and private, loopback and link-local targets (tests, local setups).
    pub allow_private_targets: bool,
    /// Attempts in flight per worker process.
    pub concurrency: usize,
    /// Attempts in flight to one endpoint, across all processes; below `concurrency`,
    /// so an endpoint that hangs leaves slots to the others.
    pub per_endpoint_concurrency: usize,
    /// Endpoints that may be registered (each event is fanned out to each one that
    /// subscribes, in the transaction that writes it).
    pub max_endpoints: usize,
    /// How often due retries are looked for (new events wake the loop at once).
    pub poll_interval_ms: u64,
    /// Events are deleted this long after they were written, once no delivery of theirs
    /// is pending.
    pub retention_days: u32,
}

impl WebhookSettings {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

/// `/metrics` (see `queue::gauges`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// How often the queue gauges are recomputed (by one process) and republished.
    pub refresh_secs: u64,
}

/// How long personal and request data is kept (see `queue::retention`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// An `Idempotency-Key` is remembered this long after its batch was created.
    pub idempotency_hours: u32,
    /// Items of batches finished this long ago lose their email and name; 0 keeps them.
    pub finished_batches_days: u32,
    /// Attempt history is kept this long.
    pub attempts_days: u32,
}

/// DKIM signing: all three set signs every message; all three empty signs none.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimSettings {
    #[serde(deserialize_with = "string")]
    pub domain: String,
    #[serde(deserialize_with = "string")]
    pub selector: String,
    #[serde(deserialize_with = "optional_path")]
    pub private_key_path: Option<PathBuf>,
}

impl DkimSettings {
    /// True when DKIM signing is configured.
    pub fn enabled(&self) -> bool {
        !self.domain.is_empty() || !self.selector.is_empty() || self.private_key_path.is_some()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: Secret,
    pub max_connections: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub bind: SocketAddr,
    /// From accept, a client must finish its request head within this.
    pub header_timeout_secs: u64,
    /// A whole request, body included, from its head to the answer.
    pub request_timeout_secs: u64,
    /// A keep-alive connection with no request is closed after this.
    pub idle_timeout_secs: u64,
    /// Open connections per process; above it new ones wait in the listen backlog.
    pub max_connections: usize,
}

impl HttpSettings {
    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_secs)
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
}

/// Abuse limits, per client IP (the TCP peer).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSettings {
    /// Failed authentications per minute; above it, 429 until the budget refills.
    pub auth_failures_per_minute: u32,
    /// `POST /v1/invitations/redeem` calls per minute.
    pub redeems_per_minute: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    /// A list of bearer keys (each with every scope, named `key:1`, `key:2`, … by
    /// position), or `[[api.keys]]` tables with `name`, `key` or `key_sha256`, `scopes`.
    #[serde(deserialize_with = "api_keys")]
    pub keys: Vec<ApiKey>,
}

/// The shipped development values, refused by `serve`, `api` and `work`.
pub const SHIPPED_API_KEY: &str = "dev-key-change-me";
pub const SHIPPED_TOKEN_SECRET: &str = "dev-secret-change-me";
/// The shortest API key and token secret `serve`, `api` and `work` accept.
pub const MIN_API_KEY_CHARS: usize = 24;
pub const MIN_TOKEN_SECRET_BYTES: usize = 32;

/// One API key: its name (in logs, `created_by` and the audit log), the SHA-256 of the
/// bearer token (all a request is checked against) and its scopes.
#[derive(Clone)]
pub struct ApiKey {
    pub name: String,
    /// The token itself when it was configured as `key` (absent for `key_sha256`).
    key: Option<Secret>,
    sha256: [u8; 32],
    pub scopes: Vec<Scope>,
}

impl ApiKey {
    /// A key given in full.
    pub fn new(name: &str, key: &str, scopes: &[Scope]) -> Self {
        Self {
            name: name.to_owned(),
            key: Some(Secret::new(key)),
            sha256: Sha256::digest(key.as_bytes()).into(),
            scopes: scopes.to_vec(),
        }
    }
    /// The bearer token, when it was configured in full.
    pub fn key(&self) -> Option<&Secret> {
        self.key.as_ref()
    }
    /// The SHA-256 of the bearer token.
    pub fn sha256(&self) -> &[u8; 32] {
        &self.sha256
    }
    /// True when this key may use a route that needs `scope`.
    pub fn allows(&self, scope: Scope) -> bool {
        scope.is_granted_by(&self.scopes)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    pub concurrency: usize,
    pub poll_interval_ms: u64,
    pub heartbeat_secs: u64,
    pub recover_after_secs: u64,
    pub shutdown_timeout_secs: u64,
    pub maintenance_interval_secs: u64,
    pub task_retention_secs: u64,
    /// What the attempt history and the worker names call this process; empty: its
    /// host and pid.
    #[serde(deserialize_with = "string")]
    pub name: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSettings {
    pub max_size: usize,
    #[serde(deserialize_with = "list")]
    pub durations_minutes: Vec<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InviteSettings {
    pub link_base_url: String,
    pub ttl_hours: u32,
    pub token_secret: Secret,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MailTransport {
    Smtp,
    File,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailSettings {
    pub transport: MailTransport,
    pub from: String,
    pub outbox_dir: PathBuf,
    pub rate_per_second: u32,
    pub suppress_rejected: bool,
    pub per_domain_concurrency: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    None,
    Starttls,
    Tls,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    #[serde(deserialize_with = "string")]
    pub username: String,
    pub password: Secret,
    pub timeout_secs: u64,
    /// A PEM certificate to trust for the server's TLS, besides the system's roots (a
    /// private relay's own CA); absent or empty: the system's roots only.
    #[serde(default, deserialize_with = "optional_path")]
    pub tls_ca_file: Option<PathBuf>,
    /// Lets `serve`, `api` and `work` start with `username` set and `tls = "none"`
    /// (the password then crosses the network in clear; a warning is logged at start).
    pub allow_plaintext_auth: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    pub max_attempts: u32,
    pub initial_delay_ms: u64,
    pub max_delay_ms: u64,
    pub multiplier: f64,
    pub jitter: f64,
}

/// A value that must not reach logs: `Debug` prints `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        string(d).map(Secret)
    }
}

/// A configuration problem, printed as one line that names the key.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(String);

impl Settings {
    /// Loads the settings. `path` is the `--config` file; `required` says whether it
    /// was named explicitly (then it must exist) or is the default `./worker.toml`
    /// (then a missing file means "use the defaults").
    pub fn load(path: &std::path::Path, required: bool) -> Result<Self, ConfigError> {
        Self::load_from(path, required, std::env::vars())
    }

    /// As [`Settings::load`], with the environment given explicitly (for tests).
    pub fn load_from(
        path: &std::path::Path,
        required: bool,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULTS));
        if path.exists() {
            figment = figment.merge(Toml::file_exact(path));
        } else if required {
            return Err(ConfigError(format!(
                "config file {} does not exist",
                path.display()
            )));
        }
        let env: Vec<(String, String)> = env.into_iter().collect();
        // Values are parsed the way figment's own Env provider parses them ("2525" is a
        // number, "a,b" a string that list fields split); env is passed in explicitly so
        // tests need not mutate the process environment.
        let overrides: Vec<(String, String)> = env
            .iter()
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix("INVITES_")?;
                let (section, key) = rest.split_once("__")?;
                Some((
                    format!("{}.{}", section.to_lowercase(), key.to_lowercase()),
                    v.clone(),
                ))
            })
            .collect();
        for (key, value) in overrides {
            figment = figment.merge(Serialized::default(&key, env_value(&value)));
        }
        if let Some((_, url)) = env.iter().find(|(k, _)| k == "DATABASE_URL") {
            figment = figment.merge(Serialized::default("database.url", url.clone()));
        }
        let settings: Settings = figment.extract().map_err(|e| {
            let e = e
                .into_iter()
                .next()
                .map(|e| one_line(&e))
                .unwrap_or_default();
            ConfigError(e)
        })?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let fail = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        if !self.database.url.expose().starts_with("postgres") {
            return fail("database.url", "must be a postgres:// URL");
        }
        if self.database.max_connections < 2 {
            return fail(
                "database.max_connections",
                "must be at least 2 (the queue listener holds one connection)",
            );
        }
        let h = &self.http;
        if !(1..=300).contains(&h.header_timeout_secs) {
            return fail("http.header_timeout_secs", "must be 1 to 300");
        }
        if !(1..=3600).contains(&h.request_timeout_secs) {
            return fail("http.request_timeout_secs", "must be 1 to 3600");
        }
        if !(1..=3600).contains(&h.idle_timeout_secs) {
            return fail("http.idle_timeout_secs", "must be 1 to 3600");
        }
        if !(1..=100_000).contains(&h.max_connections) {
            return fail("http.max_connections", "must be 1 to 100000");
        }
        if !(1..=1_000_000).contains(&self.limits.auth_failures_per_minute) {
            return fail("limits.auth_failures_per_minute", "must be 1 to 1000000");
        }
        if !(1..=1_000_000).contains(&self.limits.redeems_per_minute) {
            return fail("limits.redeems_per_minute", "must be 1 to 1000000");
        }
        if !(1..=15).contains(&self.metrics.refresh_secs) {
            return fail("metrics.refresh_secs", "must be 1 to 15");
        }
        if !(1..=720).contains(&self.console.session_hours) {
            return fail("console.session_hours", "must be 1 to 720");
        }
        if self.api.keys.is_empty() {
            return fail("api.keys", "must list at least one key");
        }
        if self.worker.concurrency == 0 {
            return fail("worker.concurrency", "must be at least 1");
        }
        if self.worker.poll_interval_ms == 0 {
            return fail("worker.poll_interval_ms", "must be at least 1");
        }
        if self.worker.heartbeat_secs == 0 {
            return fail("worker.heartbeat_secs", "must be at least 1");
        }
        if self.worker.recover_after_secs < self.worker.heartbeat_secs * 2 {
            return fail(
                "worker.recover_after_secs",
                "must be at least twice worker.heartbeat_secs",
            );
        }
        if self.worker.maintenance_interval_secs == 0 {
            return fail("worker.maintenance_interval_secs", "must be at least 1");
        }
        if self.worker.name.chars().count() > 100 || self.worker.name.chars().any(char::is_control)
        {
            return fail(
                "worker.name",
                "must be at most 100 characters, without control characters",
            );
        }
        if self.batch.max_size == 0 {
            return fail("batch.max_size", "must be at least 1");
        }
        if self.batch.durations_minutes.is_empty() || self.batch.durations_minutes.contains(&0) {
            return fail(
                "batch.durations_minutes",
                "must list at least one duration, each above 0",
            );
        }
        let base = &self.invite.link_base_url;
        if !(base.starts_with("http://") || base.starts_with("https://")) || base.ends_with('/') {
            return fail(
                "invite.link_base_url",
                "must be an http(s) URL without a trailing slash",
            );
        }
        if self.invite.ttl_hours == 0 {
            return fail("invite.ttl_hours", "must be at least 1");
        }
        if self.invite.token_secret.expose().len() < 8 {
            return fail("invite.token_secret", "must be at least 8 characters");
        }
        if let Err(e) = self.mail.from.parse::<Mailbox>() {
            return fail("mail.from", &format!("is not a valid mailbox ({e})"));
        }
        if self.mail.per_domain_concurrency == 0 {
            return fail("mail.per_domain_concurrency", "must be at least 1");
        }
        if self.mail.rate_per_second == 0 {
            return fail("mail.rate_per_second", "must be at least 1");
        }
        if self.smtp.host.is_empty() {
            return fail("smtp.host", "must not be empty");
        }
        if !(1..=60).contains(&self.smtp.timeout_secs) {
            // A task still sending is rescued (run again) after 5 minutes; a send must
            // end well before that.
            return fail("smtp.timeout_secs", "must be 1 to 60");
        }
        let d = &self.dkim;
        if d.enabled()
            && (d.domain.is_empty() || d.selector.is_empty() || d.private_key_path.is_none())
        {
            return fail(
                "dkim",
                "set domain, selector and private_key_path together (or none of them)",
            );
        }
        let r = &self.retention;
        if !(1..=87_600).contains(&r.idempotency_hours) {
            return fail(
                "retention.idempotency_hours",
                "must be 1 to 87600 (ten years)",
            );
        }
        if r.finished_batches_days > 36_500 {
            return fail(
                "retention.finished_batches_days",
                "must be 0 (keep for ever) to 36500",
            );
        }
        if !(1..=36_500).contains(&r.attempts_days) {
            return fail("retention.attempts_days", "must be 1 to 36500");
        }
        let w = &self.webhooks;
        if !(1..=60).contains(&w.timeout_secs) {
            return fail("webhooks.timeout_secs", "must be 1 to 60");
        }
        if w.retry_schedule_secs.len() > 50 || w.retry_schedule_secs.iter().any(|s| *s > 604_800) {
            return fail(
                "webhooks.retry_schedule_secs",
                "at most 50 waits, each at most 604800 (a week)",
            );
        }
        if !(1..=1000).contains(&w.concurrency) {
            return fail("webhooks.concurrency", "must be 1 to 1000");
        }
        if w.per_endpoint_concurrency == 0 || w.per_endpoint_concurrency >= w.concurrency {
            return fail(
                "webhooks.per_endpoint_concurrency",
                "must be at least 1 and below webhooks.concurrency",
            );
        }
        if !(1..=1000).contains(&w.max_endpoints) {
            return fail("webhooks.max_endpoints", "must be 1 to 1000");
        }
        if !(1..=60_000).contains(&w.poll_interval_ms) {
            return fail("webhooks.poll_interval_ms", "must be 1 to 60000");
        }
        if !(1..=36_500).contains(&w.retention_days) {
            return fail("webhooks.retention_days", "must be 1 to 36500");
        }
        if self.retry.max_attempts == 0 {
            return fail("retry.max_attempts", "must be at least 1");
        }
        if self.retry.initial_delay_ms == 0 {
            return fail("retry.initial_delay_ms", "must be at least 1");
        }
        if self.retry.max_delay_ms < self.retry.initial_delay_ms {
            return fail(
                "retry.max_delay_ms",
                "must be at least retry.initial_delay_ms",
            );
        }
        if !(self.retry.multiplier >= 1.0 && self.retry.multiplier.is_finite()) {
            return fail("retry.multiplier", "must be a number of at least 1.0");
        }
        if !(0.0..1.0).contains(&self.retry.jitter) {
            return fail("retry.jitter", "must be at least 0 and below 1");
        }
        Ok(())
    }

    /// What `serve`, `api` and `work` require besides a valid configuration: no shipped
    /// or weak API key or token secret, and no SMTP password over plain text unless
    /// `smtp.allow_plaintext_auth` says so. (`demo` and `migrate` do not ask.)
    pub fn refuse_insecure(&self) -> Result<(), ConfigError> {
        let fail = |key: &str, why: String| Err(ConfigError(format!("{key}: {why}")));
        let shipped: [u8; 32] = Sha256::digest(SHIPPED_API_KEY.as_bytes()).into();
        for key in &self.api.keys {
            let name = &key.name;
            if key.sha256 == shipped {
                return fail(
                    "api.keys",
                    format!(
                        "{name:?} is the shipped development key {SHIPPED_API_KEY:?}; \
                         set your own (`invite-worker secret` prints one)"
                    ),
                );
            }
            if let Some(plain) = &key.key
                && plain.expose().chars().count() < MIN_API_KEY_CHARS
            {
                return fail(
                    "api.keys",
                    format!(
                        "{name:?} is shorter than {MIN_API_KEY_CHARS} characters; \
                         `invite-worker secret` prints a strong one"
                    ),
                );
            }
        }
        let secret = self.invite.token_secret.expose();
        if secret == SHIPPED_TOKEN_SECRET {
            return fail(
                "invite.token_secret",
                format!(
                    "is the shipped development secret {SHIPPED_TOKEN_SECRET:?}: anyone could \
                     forge links; set your own (`invite-worker secret` prints one)"
                ),
            );
        }
        if secret.len() < MIN_TOKEN_SECRET_BYTES {
            return fail(
                "invite.token_secret",
                format!(
                    "is {} bytes; it must be at least {MIN_TOKEN_SECRET_BYTES} \
                     (`invite-worker secret` prints a strong one)",
                    secret.len()
                ),
            );
        }
        if self.sends_password_in_clear() && !self.smtp.allow_plaintext_auth {
            return fail(
                "smtp.tls",
                "is \"none\" while smtp.username is set: the password would cross the \
                 network in clear; use \"starttls\" or \"tls\" (or set \
                 smtp.allow_plaintext_auth = true)"
                    .into(),
            );
        }
        Ok(())
    }

    /// True when SMTP AUTH would go over an unencrypted connection.
    pub fn sends_password_in_clear(&self) -> bool {
        !self.smtp.username.is_empty() && self.smtp.tls == SmtpTls::None
    }

    pub fn smtp_timeout(&self) -> Duration {
        Duration::from_secs(self.smtp.timeout_secs)
    }

    /// How long a cancel waits for sends already on their way: one SMTP timeout and a
    /// margin for writing the outcome.
    pub fn cancel_window(&self) -> Duration {
        self.smtp_timeout() + Duration::from_secs(5)
    }
}

/// One line: the key, then what is wrong with its value.
fn one_line(e: &figment::Error) -> String {
    let what = e.kind.to_string().replace('\n', " ");
    if e.path.is_empty() {
        what
    } else {
        format!("{}: {what}", e.path.join("."))
    }
}

fn env_value(raw: &str) -> figment::value::Value {
    match raw.parse() {
        Ok(v) => v,
        Err(never) => match never {},
    }
}

/// A string, also when the value looks like a number.
fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Any {
        Str(String),
        Int(i64),
        Float(f64),
        Bool(bool),
    }
    Ok(match Any::deserialize(d)? {
        Any::Str(s) => s,
        Any::Int(i) => i.to_string(),
        Any::Float(f) => f.to_string(),
        Any::Bool(b) => b.to_string(),
    })
}

/// A path, or nothing for an empty string (env cannot unset a key).
fn optional_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let raw = string(d)?;
    Ok((!raw.trim().is_empty()).then(|| PathBuf::from(raw.trim())))
}

/// A TOML array, or a comma-separated string (lists given in env).
fn list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr + DeserializeOwned,
    T::Err: fmt::Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either<T> {
        Str(String),
        Seq(Vec<T>),
    }
    match Either::<T>::deserialize(d)? {
        Either::Seq(v) => Ok(v),
        Either::Str(s) => s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| p.parse().map_err(serde::de::Error::custom))
            .collect(),
    }
}

/// A strong random value for an API key or a token secret: 32 random bytes from the
/// operating system's generator, base64url without padding (43 characters).
pub fn generate_secret() -> String {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// `api.keys`: a list (TOML array, or a comma-separated string in env) whose entries
/// are bearer tokens (every scope, named `key:<position>`) or named-key tables.
fn api_keys<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ApiKey>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Entry {
        Plain(String),
        Named(NamedKey),
    }
    #[derive(Deserialize)]
    struct NamedKey {
        name: Option<String>,
        key: Option<String>,
        key_sha256: Option<String>,
        scopes: Option<Vec<String>>,
        #[serde(flatten)]
        other: std::collections::BTreeMap<String, serde::de::IgnoredAny>,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Keys {
        Str(String),
        Seq(Vec<Entry>),
    }
    let entries = match Keys::deserialize(d)? {
        Keys::Str(s) => s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| Entry::Plain(p.to_owned()))
            .collect(),
        Keys::Seq(v) => v,
    };
    let err = |n: usize, why: String| serde::de::Error::custom(format!("entry {n}: {why}"));
    let mut keys: Vec<ApiKey> = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let n = i + 1;
        let key = match entry {
            Entry::Plain(key) if key.trim().is_empty() => return Err(err(n, "is empty".into())),
            Entry::Plain(key) => ApiKey::new(&format!("key:{n}"), &key, &Scope::ALL),
            Entry::Named(named) => {
                if let Some(field) = named.other.keys().next() {
                    return Err(err(n, format!("unknown field {field:?}")));
                }
                let name = named.name.unwrap_or_default();
                let valid_name = (1..=64).contains(&name.len())
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b));
                if !valid_name {
                    return Err(err(
                        n,
                        "name: must be 1 to 64 of [A-Za-z0-9._:@-]".to_owned(),
                    ));
                }
                let scopes = named
                    .scopes
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| err(n, format!("{name:?}: scopes: list at least one")))?
                    .iter()
                    .map(|s| s.parse::<Scope>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|why| err(n, format!("{name:?}: scopes: {why}")))?;
                match (named.key, named.key_sha256) {
                    (Some(key), None) if !key.trim().is_empty() => {
                        ApiKey::new(&name, &key, &scopes)
                    }
                    (None, Some(hex)) => {
                        let sha256 = parse_sha256(&hex).ok_or_else(|| {
                            err(n, format!("{name:?}: key_sha256: must be 64 hex digits"))
                        })?;
                        ApiKey {
                            name,
                            key: None,
                            sha256,
                            scopes,
                        }
                    }
                    _ => {
                        return Err(err(
                            n,
                            format!("{name:?}: set exactly one of key and key_sha256"),
                        ));
                    }
                }
            }
        };
        if keys.iter().any(|k| k.name == key.name) {
            return Err(err(n, format!("the name {:?} is used twice", key.name)));
        }
        keys.push(key);
    }
    Ok(keys)
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks(2)) {
        let pair = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn load(env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::load_from(
            Path::new("/nonexistent/worker.toml"),
            false,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn the_shipped_file_is_a_valid_configuration() {
        let s = load(&[]).expect("defaults load");
        assert_eq!(s.batch.max_size, 100);
        assert_eq!(s.batch.durations_minutes, vec![15, 30, 45, 60]);
        assert_eq!(s.mail.transport, MailTransport::File);
        assert_eq!(s.retry.max_attempts, 8);
    }

    #[test]
    fn env_overrides_any_key_and_lists_take_commas() {
        let s = load(&[
            ("INVITES_SMTP__PORT", "2600"),
            ("INVITES_API__KEYS", "k1, k2"),
            ("INVITES_BATCH__DURATIONS_MINUTES", "20,40"),
            ("INVITES_SMTP__PASSWORD", "12345"),
            ("INVITES_MAIL__TRANSPORT", "smtp"),
            ("DATABASE_URL", "postgres://x@127.0.0.1/other"),
        ])
        .expect("loads");
        assert_eq!(s.smtp.port, 2600);
        let names: Vec<&str> = s.api.keys.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(
            names,
            ["key:1", "key:2"],
            "comma-separated list, named by position"
        );
        assert_eq!(s.api.keys[1].key().map(Secret::expose), Some("k2"));
        assert!(
            s.api.keys[1].allows(Scope::Admin),
            "a listed key has every scope"
        );
        assert_eq!(s.batch.durations_minutes, vec![20, 40]);
        assert_eq!(s.smtp.password.expose(), "12345");
        assert_eq!(s.mail.transport, MailTransport::Smtp);
        assert_eq!(s.database.url.expose(), "postgres://x@127.0.0.1/other");
    }

    #[test]
    fn a_bad_value_names_its_key_on_one_line() {
        let e = load(&[("INVITES_WORKER__CONCURRENCY", "lots")])
            .expect_err("must fail")
            .to_string();
        assert!(e.contains("worker.concurrency"), "{e}");
        assert!(!e.contains('\n'), "{e}");

        let e = load(&[("INVITES_SMTP__TLS", "maybe")])
            .expect_err("must fail")
            .to_string();
        assert!(e.contains("smtp.tls"), "{e}");

        let e = load(&[("INVITES_HTTP__IDLE_TIMEOUT_SECS", "0")])
            .expect_err("must fail")
            .to_string();
        assert!(e.contains("http.idle_timeout_secs"), "{e}");

        let e = load(&[("INVITES_LIMITS__REDEEMS_PER_MINUTE", "0")])
            .expect_err("must fail")
            .to_string();
        assert!(e.contains("limits.redeems_per_minute"), "{e}");

        let e = load(&[("INVITES_RETRY__JITTER", "1.5")])
            .expect_err("must fail")
            .to_string();
        assert!(e.contains("retry.jitter"), "{e}");
    }

    #[test]
    fn an_unknown_key_is_refused() {
        let e = load(&[("INVITES_SMTP__HOSTNAME", "x")])
            .expect_err("must fail")
            .to_string();
        assert!(e.contains("hostname"), "{e}");
    }

    #[test]
    fn a_named_config_file_must_exist() {
        let e = Settings::load_from(Path::new("/nonexistent.toml"), true, Vec::new())
            .expect_err("must fail")
            .to_string();
        assert!(e.contains("/nonexistent.toml"), "{e}");
    }

    fn load_toml(toml: &str) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("worker.toml");
        std::fs::write(&path, toml).expect("written");
        Settings::load_from(&path, true, Vec::new())
    }

    #[test]
    fn named_keys_carry_their_scopes_and_a_key_or_its_digest() {
        let digest = "a".repeat(64);
        let s = load_toml(&format!(
            r#"
            [[api.keys]]
            name = "recruiting-webapp"
            key = "k-webapp"
            scopes = ["batches:write", "batches:read"]
            [[api.keys]]
            name = "interviews"
            key_sha256 = "{digest}"
            scopes = ["invitations:redeem"]
            "#
        ))
        .expect("loads");
        let [webapp, interviews] = &s.api.keys[..] else {
            panic!("two keys: {:?}", s.api.keys)
        };
        assert_eq!(webapp.name, "recruiting-webapp");
        assert!(webapp.allows(Scope::BatchesWrite) && !webapp.allows(Scope::Admin));
        assert_eq!(
            webapp.sha256(),
            &<[u8; 32]>::from(Sha256::digest(b"k-webapp"))
        );
        assert!(interviews.key().is_none());
        assert_eq!(interviews.sha256(), &[0xaa; 32]);
        assert!(interviews.allows(Scope::InvitationsRedeem));
        assert!(!interviews.allows(Scope::BatchesRead));
    }

    #[test]
    fn named_keys_come_from_env_too() {
        let s = load(&[(
            "INVITES_API__KEYS",
            r#"[{name="ops", key="k-ops", scopes=["admin"]}]"#,
        )])
        .expect("loads");
        assert_eq!(s.api.keys[0].name, "ops");
        assert!(s.api.keys[0].allows(Scope::BatchesWrite));
    }

    #[test]
    fn a_bad_named_key_is_refused_on_one_line_naming_it() {
        for (entry, expected) in [
            (
                r#"name = "a"
                key = "k"
                scopes = ["root"]"#,
                "unknown scope",
            ),
            (
                r#"name = "a"
                key = "k"
                key_sha256 = "00"
                scopes = ["admin"]"#,
                "exactly one of key and key_sha256",
            ),
            (
                r#"name = "a"
                key_sha256 = "xyz"
                scopes = ["admin"]"#,
                "64 hex digits",
            ),
            (
                r#"name = "a"
                key = "k"
                scopes = []"#,
                "at least one",
            ),
            (
                r#"name = "a b"
                key = "k"
                scopes = ["admin"]"#,
                "name",
            ),
            (
                r#"name = "a"
                key = "k"
                scope = ["admin"]"#,
                "scope",
            ),
        ] {
            let e = load_toml(&format!("[[api.keys]]\n{entry}\n"))
                .expect_err(entry)
                .to_string();
            assert!(
                e.contains("api.keys") && e.contains(expected),
                "{entry}: {e}"
            );
            assert!(!e.contains('\n'), "{e}");
        }
        let e = load_toml(
            "[[api.keys]]\nname = \"a\"\nkey = \"k1\"\nscopes = [\"admin\"]\n\
             [[api.keys]]\nname = \"a\"\nkey = \"k2\"\nscopes = [\"admin\"]\n",
        )
        .expect_err("a name used twice")
        .to_string();
        assert!(e.contains("used twice"), "{e}");
    }

    #[test]
    fn shipped_or_weak_secrets_are_refused_for_serving() {
        let strong = generate_secret();
        let ok = load(&[
            ("INVITES_API__KEYS", strong.as_str()),
            ("INVITES_INVITE__TOKEN_SECRET", strong.as_str()),
        ])
        .expect("loads");
        ok.refuse_insecure().expect("strong values pass");
        for (key, secret, named) in [
            (SHIPPED_API_KEY, strong.as_str(), "api.keys"),
            ("short-key-of-23-chars-x", strong.as_str(), "api.keys"),
            (strong.as_str(), SHIPPED_TOKEN_SECRET, "invite.token_secret"),
            (
                strong.as_str(),
                "0123456789abcdef0123456789abcde",
                "invite.token_secret",
            ),
        ] {
            let s = load(&[
                ("INVITES_API__KEYS", key),
                ("INVITES_INVITE__TOKEN_SECRET", secret),
            ])
            .expect("loads");
            let e = s.refuse_insecure().expect_err(named).to_string();
            assert!(e.contains(named), "{e}");
            assert!(!e.contains(&strong), "the secret is not printed: {e}");
        }
        let digest: String = Sha256::digest(SHIPPED_API_KEY.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut s = ok.clone();
        s.api.keys = load_toml(&format!(
            "[[api.keys]]\nname = \"x\"\nkey_sha256 = \"{digest}\"\nscopes = [\"admin\"]\n"
        ))
        .expect("loads")
        .api
        .keys;
        assert!(
            s.refuse_insecure().is_err(),
            "the shipped key by its digest"
        );
    }

    #[test]
    fn an_smtp_password_in_clear_needs_an_explicit_yes() {
        let strong = generate_secret();
        let env = |extra: &[(&str, &str)]| {
            let mut env = vec![
                ("INVITES_API__KEYS", strong.as_str()),
                ("INVITES_INVITE__TOKEN_SECRET", strong.as_str()),
                ("INVITES_SMTP__USERNAME", "mailer"),
            ];
            env.extend_from_slice(extra);
            load(&env).expect("loads")
        };
        let e = env(&[]).refuse_insecure().expect_err("refused").to_string();
        assert!(e.contains("smtp.tls"), "{e}");
        env(&[("INVITES_SMTP__TLS", "starttls")])
            .refuse_insecure()
            .expect("STARTTLS is fine");
        env(&[("INVITES_SMTP__ALLOW_PLAINTEXT_AUTH", "true")])
            .refuse_insecure()
            .expect("allowed explicitly");
    }

    #[test]
    fn generated_secrets_are_long_and_differ() {
        let (a, b) = (generate_secret(), generate_secret());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert!(a.len() >= MIN_API_KEY_CHARS && a.len() >= MIN_TOKEN_SECRET_BYTES);
    }

    #[test]
    fn retention_and_the_worker_name_are_bounded() {
        let s = load(&[]).expect("loads");
        assert_eq!(s.retention.idempotency_hours, 24);
        assert_eq!(s.retention.finished_batches_days, 0);
        assert_eq!(s.retention.attempts_days, 30);
        assert_eq!(s.worker.name, "");
        for (key, value) in [
            ("INVITES_RETENTION__IDEMPOTENCY_HOURS", "0"),
            ("INVITES_RETENTION__ATTEMPTS_DAYS", "0"),
            ("INVITES_RETENTION__FINISHED_BATCHES_DAYS", "40000"),
            ("INVITES_WORKER__NAME", "a\u{1}b"),
        ] {
            let e = load(&[(key, value)]).expect_err(key).to_string();
            let named = key
                .trim_start_matches("INVITES_")
                .replace("__", ".")
                .to_lowercase();
            assert!(e.contains(&named), "{e}");
        }
        let s = load(&[("INVITES_WORKER__NAME", "worker-7")]).expect("loads");
        assert_eq!(s.worker.name, "worker-7");
    }

    #[test]
    fn secrets_do_not_print() {
        let s = load(&[]).expect("loads");
        let printed = format!("{s:?}");
        assert!(!printed.contains("dev-secret-change-me"));
        assert!(!printed.contains("dev-key-change-me"));
    }
}
