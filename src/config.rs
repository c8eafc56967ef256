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
    pub limits: LimitsSettings,
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
    #[serde(deserialize_with = "list")]
    pub keys: Vec<Secret>,
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
        if self.api.keys.is_empty() || self.api.keys.iter().any(|k| k.expose().is_empty()) {
            return fail("api.keys", "must list at least one non-empty key");
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

    pub fn smtp_timeout(&self) -> Duration {
        Duration::from_secs(self.smtp.timeout_secs)
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
        assert_eq!(
            s.api.keys,
            vec![Secret::new("k1"), Secret::new("k2")],
            "comma-separated list"
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

    #[test]
    fn secrets_do_not_print() {
        let s = load(&[]).expect("loads");
        let printed = format!("{s:?}");
        assert!(!printed.contains("dev-secret-change-me"));
        assert!(!printed.contains("dev-key-change-me"));
    }
}
