//! The real binary as a child process, for tests where a process must die, be stopped
//! by a signal or run next to others.
//!
//! [`Service::start`] runs `invite-worker <role>` configured only through environment
//! variables built from a [`Settings`] (plus any extra ones), with its working
//! directory in a temporary directory (so no `./worker.toml` applies) and its stderr
//! written to a file there. The returned [`ServiceProcess`] is a guard: dropping it
//! kills the process (SIGKILL) and reaps it, on every exit path of a test, and when the
//! test is failing it prints the process' stderr first.
//!
//! Every wait here has a deadline; none asserts on speed.

#![allow(dead_code)]

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use invite_worker::config::{MailTransport, Settings};

/// The binary under test, built by Cargo for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_invite-worker");

/// A free TCP port on 127.0.0.1 (bound, read and released; the usual small race).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The `INVITES_*` variables that make a child process run with `settings`: the
/// database, API keys, mail transport and rate, SMTP, worker, batch, retry and webhook
/// values.
/// `http.bind` is set by [`Service::start`] (a free port per process).
pub fn env_for(settings: &Settings) -> Vec<(String, String)> {
    let s = settings;
    // Every key as a named-key table, in the env form figment reads.
    let keys: Vec<String> = s
        .api
        .keys
        .iter()
        .map(|k| {
            let scopes: Vec<String> = k
                .scopes
                .iter()
                .map(|s| format!("{:?}", s.as_str()))
                .collect();
            let secret = match k.key() {
                Some(key) => format!("key={:?}", key.expose()),
                None => format!(
                    "key_sha256={:?}",
                    k.sha256()
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>()
                ),
            };
            format!(
                "{{name={:?}, {secret}, scopes=[{}]}}",
                k.name,
                scopes.join(",")
            )
        })
        .collect();
    let transport = match s.mail.transport {
        MailTransport::Smtp => "smtp",
        MailTransport::File => "file",
    };
    [
        ("DATABASE__URL", s.database.url.expose().to_owned()),
        (
            "DATABASE__MAX_CONNECTIONS",
            s.database.max_connections.to_string(),
        ),
        ("API__KEYS", format!("[{}]", keys.join(","))),
        ("MAIL__TRANSPORT", transport.to_owned()),
        ("MAIL__RATE_PER_SECOND", s.mail.rate_per_second.to_string()),
        ("SMTP__HOST", s.smtp.host.clone()),
        ("SMTP__PORT", s.smtp.port.to_string()),
        ("SMTP__TIMEOUT_SECS", s.smtp.timeout_secs.to_string()),
        ("WORKER__CONCURRENCY", s.worker.concurrency.to_string()),
        (
            "WORKER__POLL_INTERVAL_MS",
            s.worker.poll_interval_ms.to_string(),
        ),
        (
            "WORKER__HEARTBEAT_SECS",
            s.worker.heartbeat_secs.to_string(),
        ),
        (
            "WORKER__RECOVER_AFTER_SECS",
            s.worker.recover_after_secs.to_string(),
        ),
        (
            "WORKER__SHUTDOWN_TIMEOUT_SECS",
            s.worker.shutdown_timeout_secs.to_string(),
        ),
        (
            "WORKER__MAINTENANCE_INTERVAL_SECS",
            s.worker.maintenance_interval_secs.to_string(),
        ),
        (
            "WORKER__TASK_RETENTION_SECS",
            s.worker.task_retention_secs.to_string(),
        ),
        ("INVITE__LINK_BASE_URL", s.invite.link_base_url.clone()),
        (
            "INVITE__TOKEN_SECRET",
            s.invite.token_secret.expose().to_owned(),
        ),
        ("RETRY__MAX_ATTEMPTS", s.retry.max_attempts.to_string()),
        (
            "RETRY__INITIAL_DELAY_MS",
            s.retry.initial_delay_ms.to_string(),
        ),
        ("RETRY__MAX_DELAY_MS", s.retry.max_delay_ms.to_string()),
        ("RETRY__MULTIPLIER", format!("{:?}", s.retry.multiplier)),
        ("RETRY__JITTER", format!("{:?}", s.retry.jitter)),
        (
            "WEBHOOKS__TIMEOUT_SECS",
            s.webhooks.timeout_secs.to_string(),
        ),
        (
            "WEBHOOKS__RETRY_SCHEDULE_SECS",
            format!("{:?}", s.webhooks.retry_schedule_secs),
        ),
        (
            "WEBHOOKS__ALLOW_PRIVATE_TARGETS",
            s.webhooks.allow_private_targets.to_string(),
        ),
        (
            "WEBHOOKS__POLL_INTERVAL_MS",
            s.webhooks.poll_interval_ms.to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (format!("INVITES_{k}"), v))
    .collect()
}

/// How to start a child process: a role (`serve`, `api`, `work`) and its environment.
/// One `Service` can start any number of processes (a restart is a second `start`).
pub struct Service {
    role: String,
    env: Vec<(String, String)>,
}

impl Service {
    /// `invite-worker <role>` configured from `settings` (see [`env_for`]), logging at
    /// `RUST_LOG=info` without colours unless [`Service::env`] says otherwise.
    pub fn new(role: &str, settings: &Settings) -> Self {
        let mut env = env_for(settings);
        env.push(("RUST_LOG".into(), "info".into()));
        env.push(("NO_COLOR".into(), "1".into()));
        Self {
            role: role.to_owned(),
            env,
        }
    }

    /// Adds or replaces one environment variable.
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.into()));
        self
    }

    /// Starts a process on a free port of its own (`INVITES_HTTP__BIND`). `label` names
    /// it in failure output (e.g. `"serve #2"`).
    pub fn start(&self, label: &str) -> ServiceProcess {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).expect("a stderr file");
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let mut command = Command::new(BIN);
        command
            .arg(&self.role)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            // Nothing from the test runner's environment may configure the child.
            .env_remove("DATABASE_URL");
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("INVITES_")) {
            command.env_remove(key);
        }
        command
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("INVITES_HTTP__BIND", addr.to_string());
        let child = command.spawn().expect("the invite-worker binary starts");
        ServiceProcess {
            label: label.to_owned(),
            child,
            exited: None,
            addr,
            stderr_path,
            _dir: dir,
        }
    }
}

/// A running (or exited) child process. Dropping it kills and reaps the process; if the
/// test is failing, its stderr is printed first.
pub struct ServiceProcess {
    label: String,
    child: Child,
    exited: Option<ExitStatus>,
    addr: SocketAddr,
    stderr_path: PathBuf,
    /// Working directory and stderr file; removed when the guard drops.
    _dir: tempfile::TempDir,
}

impl ServiceProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The exit status, if the process has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
        }
        self.exited
    }

    /// Polls `GET /readyz` until it answers 200 (database reachable, migrated), within
    /// `within`. Panics with the process' stderr if it exits or the deadline passes.
    pub async fn wait_ready(&mut self, within: Duration) {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        let url = format!("{}/readyz", self.base());
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.try_exit() {
                panic!(
                    "{} exited before it was ready ({status}); stderr:\n{}",
                    self.label,
                    self.stderr()
                );
            }
            if let Ok(r) = client.get(&url).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} not ready within {within:?}",
                self.label
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, then reap: the process gets no chance to finish anything.
    pub fn kill(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }

    /// Sends SIGTERM (through `kill -TERM`); does not wait.
    pub fn terminate(&mut self) {
        assert!(self.try_exit().is_none(), "{} already exited", self.label);
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill -TERM runs");
        assert!(status.success(), "kill -TERM {} failed", self.pid());
    }

    /// Waits for the process to exit by itself, within `within`; returns its status.
    /// Panics at the deadline (the guard then kills it).
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.try_exit() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not exit within {within:?}",
                self.label
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- stderr of {} (pid {}) ----\n{}---- end of {} ----",
                self.label,
                self.pid(),
                self.stderr(),
                self.label
            );
        }
    }
}
