//! The web console in a real browser (operations.md §3, "The web console"): Debian's
//! headless Chromium, driven over WebDriver by its chromedriver, against the real binary
//! on a database of its own, with the scriptable SMTP server behind it.
//!
//! Every test starts one chromedriver (its own process group, so dropping the guard ends
//! the browsers it started too, on a failing test as well) and a batch that ends with
//! failures in two groups: `rejected` (`550 5.1.1`, for good) and `retries_exhausted`
//! (`451 4.3.0` until the test switches the server to accept). Operators are made with
//! the real CLI. A missing chromium or chromedriver fails the test: `scripts/test`
//! installs both.
//!
//! `UPDATE_SCREENSHOTS=1` writes the overview and a batch page to `docs/` (always to
//! Cargo's temporary directory for tests as well).

use std::{
    net::Ipv4Addr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use fantoccini::{Client, ClientBuilder, Locator, elements::Element, wd::Capabilities};
use reqwest::{StatusCode, header};
use serde_json::{Value, json};
use smtp_testkit::Step;
use tokio::time::Instant;

use crate::{
    helpers::{TestApp, candidates, prepare_app_with},
    operations::{push_undecodable_task, wait_for_dead},
    operator_cli::cli_with_stdin,
    process::{Service, ServiceProcess, free_port},
};

/// The bound on every wait: generous, since the browser shares two cores with the rest
/// of the suite. None of them asserts on speed.
const PATIENCE: Duration = Duration::from_secs(60);

const OPERATOR: (&str, &str) = ("olga", "olga-operator-password-2026");
const VIEWER: (&str, &str) = ("victor", "victor-viewer-password-2026");

/// A candidate named like a script.
const SCRIPT_NAME: &str = "<script>alert(1)</script>";

/// The batch every test starts with: (candidate id, name, email, what its viewer sees).
/// Two are sent, two are refused for good, three run out of retries.
const PEOPLE: [(&str, &str, &str, &str); 7] = [
    ("ada", "Ada Lovelace", "ada@example.com", "a***@example.com"),
    (
        "mallory",
        SCRIPT_NAME,
        "mallory@example.com",
        "m***@example.com",
    ),
    (
        "grace",
        "Grace Hopper",
        "grace.hopper@example.org",
        "g***@example.org",
    ),
    (
        "alan",
        "Alan Turing",
        "alan.turing@example.org",
        "a***@example.org",
    ),
    (
        "edsger",
        "Edsger Dijkstra",
        "edsger@busy.example.net",
        "e***@busy.example.net",
    ),
    (
        "barbara",
        "Barbara Liskov",
        "barbara@busy.example.net",
        "b***@busy.example.net",
    ),
    (
        "ken",
        "Ken Thompson",
        "ken@busy.example.net",
        "k***@busy.example.net",
    ),
];
const SENT: [&str; 2] = ["ada", "mallory"];
const REJECTED: [&str; 2] = ["grace", "alan"];
const EXHAUSTED: [&str; 3] = ["edsger", "barbara", "ken"];

// ---- chromedriver and the browser ----

const MISSING: &str = "the console's browser test needs Debian's chromium and \
     chromium-driver (`chromium` and `chromedriver` on PATH); scripts/test installs them \
     when missing, or run: apt-get install chromium chromium-driver";

/// The file `program` names in a directory of `PATH`.
fn on_path(program: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// A chromedriver on a free port, in a process group of its own. Dropping it kills the
/// whole group (chromedriver and every Chromium it started) and, when the test is
/// failing, prints the end of chromedriver's log.
struct Chromedriver {
    child: Child,
    port: u16,
    chromium: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Chromedriver {
    async fn start() -> Self {
        let (Some(driver), Some(chromium)) = (on_path("chromedriver"), on_path("chromium")) else {
            panic!("{MISSING}");
        };
        let dir = tempfile::tempdir().expect("a temporary directory");
        let log = dir.path().join("chromedriver.log");
        let port = free_port();
        let mut child = Command::new(driver)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromedriver starts");

        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("a client");
        let status = format!("http://{}:{port}/status", Ipv4Addr::LOCALHOST);
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(exit) = child.try_wait().expect("try_wait") {
                panic!(
                    "chromedriver exited ({exit}); its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if let Ok(r) = client.get(&status).send().await
                && let Ok(body) = r.json::<Value>().await
                && body["value"]["ready"] == true
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver not ready within {PATIENCE:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child,
            port,
            chromium,
            log,
            _dir: dir,
        }
    }

    /// A new browser (a fresh profile: no cookies) on the console at `base`.
    async fn browser(&self, base: &str) -> Browser {
        let capabilities = json!({
            "browserName": "chrome",
            // A prompt that opens stays open, so a test can see it.
            "unhandledPromptBehavior": "ignore",
            "goog:chromeOptions": {
                "binary": self.chromium,
                // Root in CI needs --no-sandbox; /dev/shm may be small in a container.
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--window-size=1280,900",
                    "--force-device-scale-factor=1",
                    "--hide-scrollbars",
                    "--lang=en-US",
                ],
            },
        });
        let capabilities: Capabilities = match capabilities {
            Value::Object(map) => map,
            _ => unreachable!("an object"),
        };
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://{}:{}", Ipv4Addr::LOCALHOST, self.port))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "a Chromium session: {e}; chromedriver's log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                )
            });
        Browser {
            client,
            base: base.to_owned(),
        }
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // The group's id is chromedriver's pid (process_group(0)).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "---- end of chromedriver's log ----\n{}\n---- end ----",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

/// One browser window on the console, with what a person does there.
struct Browser {
    client: Client,
    base: String,
}

impl Browser {
    async fn goto(&self, path: &str) {
        self.client
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap_or_else(|e| panic!("GET {path} in the browser: {e}"));
    }

    /// The path of the page shown.
    async fn path(&self) -> String {
        self.client
            .current_url()
            .await
            .expect("the current URL")
            .path()
            .to_owned()
    }

    async fn find(&self, css: &str) -> Element {
        match self.client.find(Locator::Css(css)).await {
            Ok(element) => element,
            Err(e) => panic!(
                "{css} on {}: {e}\n---- page ----\n{}",
                self.path().await,
                self.client.source().await.unwrap_or_default()
            ),
        }
    }

    async fn count(&self, css: &str) -> usize {
        self.client
            .find_all(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .len()
    }

    /// The rendered text of the first element `css` selects.
    async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await.expect("text")
    }

    async fn click(&self, css: &str) {
        self.find(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// The whole document as the browser holds it now.
    async fn source(&self) -> String {
        self.client.source().await.expect("the page source")
    }

    /// Polls until the page shown is `path` (a bound, not a speed assertion).
    async fn wait_for_path(&self, path: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let now = self.path().await;
            if now == path {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the browser did not reach {path} within {PATIENCE:?}: it shows {now}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls the text of `css` until `done` holds for it; returns it. The page is not
    /// reloaded: whatever changes it is the page itself.
    async fn wait_for_text(&self, css: &str, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let text = match self.client.find(Locator::Css(css)).await {
                Ok(element) => element.text().await.unwrap_or_default(),
                Err(e) if e.is_no_such_element() => String::new(),
                Err(e) => panic!("{css}: {e}"),
            };
            if done(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{css} on {}: {what} did not happen within {PATIENCE:?} (it reads {text:?})",
                self.path().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Types a name and password into the sign-in form and submits it.
    async fn submit_sign_in(&self, name: &str, password: &str) {
        self.goto("/console/login").await;
        let form = "form#login";
        self.find(&format!("{form} input[name=name]"))
            .await
            .send_keys(name)
            .await
            .expect("type the name");
        self.find(&format!("{form} input[name=password]"))
            .await
            .send_keys(password)
            .await
            .expect("type the password");
        self.click(&format!("{form} button[type=submit]")).await;
    }

    /// Signs in and lands on the overview, which names who is signed in.
    async fn sign_in(&self, (name, password): (&str, &str), role: &str) {
        self.submit_sign_in(name, password).await;
        self.wait_for_path("/console").await;
        assert_eq!(
            self.text("header span#whoami").await,
            format!("{name} ({role})")
        );
    }

    /// `Cookie:` for a request made outside the browser with the browser's session.
    async fn cookie_header(&self) -> String {
        let cookies = self.client.get_all_cookies().await.expect("cookies");
        assert!(!cookies.is_empty(), "a signed-in browser holds a cookie");
        cookies
            .iter()
            .map(|c| format!("{}={}", c.name(), c.value()))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The value of the first `input[name=csrf]` in `form_css`.
    async fn csrf_of(&self, form_css: &str) -> String {
        self.find(&format!("{form_css} input[name=csrf]"))
            .await
            .prop("value")
            .await
            .expect("the csrf input's value")
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| panic!("{form_css} carries a csrf token"))
    }

    async fn assert_no_alert(&self) {
        match self.client.get_alert_text().await {
            Err(e) if e.is_no_such_alert() => {}
            Ok(text) => panic!("an alert is open: {text:?}"),
            Err(e) => panic!("asking for an alert: {e}"),
        }
    }

    /// Saves the viewport as `file` (PNG) in Cargo's temporary directory for tests, and
    /// in `docs/` when `UPDATE_SCREENSHOTS=1`.
    async fn screenshot(&self, file: &str) {
        let png = self.client.screenshot().await.expect("a screenshot");
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
            "a PNG of a rendered page ({} bytes)",
            png.len()
        );
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join(file);
        std::fs::write(&tmp, &png).expect("write the screenshot");
        if std::env::var("UPDATE_SCREENSHOTS").is_ok_and(|v| v == "1") {
            let docs = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("docs")
                .join(file);
            std::fs::write(&docs, &png).expect("write the screenshot to docs/");
        }
    }

    async fn close(self) {
        self.client.close().await.expect("the browser closes");
    }
}

// ---- the service, its operators and a batch with failures ----

/// How the service under the browser runs.
#[derive(Clone, Copy, PartialEq)]
enum Deployment {
    /// `serve`: API, console and workers in one process (the default deployment).
    Serve,
    /// `api` (the console) and `work` as two processes, so a test can stop the workers
    /// and hold a batch still while a page shows it.
    Split,
}

/// Fields drop in this order: the processes before the database they use.
struct Console {
    /// `serve` or `api`: what the browser talks to (a guard: dropping it kills it).
    _web: ServiceProcess,
    /// `work` ([`Deployment::Split`] only) while it runs.
    worker: Option<ServiceProcess>,
    app: TestApp,
    /// The batch with failures.
    batch: String,
    /// Requests made outside the browser: redirects are answers, not followed.
    http: reqwest::Client,
}

impl Console {
    /// The service, its two operators (made with the CLI) and the batch with failures,
    /// completed: "2 sent, 5 failed".
    async fn start(deployment: Deployment) -> Self {
        let mut app = prepare_app_with(|s| {
            s.retry.max_attempts = 2;
            s.retry.initial_delay_ms = 100;
            s.retry.max_delay_ms = 200;
        })
        .await;
        // Until the test says otherwise, every recipient without a script of its own
        // gets a transient failure after DATA.
        app.smtp
            .set_default(Step::DataReply(451, "4.3.0 try again later".into()));
        for (id, _, email, _) in PEOPLE {
            if SENT.contains(&id) {
                app.smtp.script(email, [Step::Accept]);
            }
            if REJECTED.contains(&id) {
                let reply = format!("5.1.1 <{email}>: user unknown");
                app.smtp.script(email, [Step::RcptReply(550, reply)]);
            }
        }

        for ((name, password), role) in [(OPERATOR, "operator"), (VIEWER, "viewer")] {
            cli_with_stdin(
                &app.settings,
                &["operators", "add", name, "--role", role, "--password-stdin"],
                &format!("{password}\n"),
            )
            .ok();
        }

        let (mut web, worker) = match deployment {
            Deployment::Serve => (service(&app, "serve").start("serve"), None),
            Deployment::Split => (
                service(&app, "api").start("api"),
                Some(service(&app, "work").start("work")),
            ),
        };
        web.wait_ready(PATIENCE).await;
        app.base = web.base();
        let mut console = Self {
            _web: web,
            worker,
            app,
            batch: String::new(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(10))
                .build()
                .expect("a client"),
        };
        if let Some(worker) = console.worker.as_mut() {
            worker.wait_ready(PATIENCE).await;
        }

        console.app.open_job("job-console").await;
        let people: Vec<Value> = PEOPLE
            .iter()
            .map(|(id, name, email, _)| json!({"id": id, "name": name, "email": email}))
            .collect();
        console.batch = console.app.create_batch("job-console", people).await;
        let batch = console
            .app
            .wait_for_status(&console.batch, "completed", PATIENCE)
            .await;
        assert_eq!(batch["summary"], "2 sent, 5 failed", "{batch}");
        console
    }

    fn batch_page(&self) -> String {
        format!("/console/batches/{}", self.batch)
    }

    /// Stops the workers (SIGTERM, then waits for the exit): nothing is sent until
    /// [`Console::start_worker`].
    async fn stop_worker(&mut self) {
        let mut worker = self.worker.take().expect("a worker runs");
        worker.terminate();
        let status = worker.wait_exit(PATIENCE).await;
        assert!(status.success(), "the worker stops cleanly: {status}");
    }

    async fn start_worker(&mut self) {
        let mut worker = service(&self.app, "work").start("work #2");
        worker.wait_ready(PATIENCE).await;
        self.worker = Some(worker);
    }

    /// `POST path` as a form, with `cookie` and these fields; returns status and body.
    async fn post_form(
        &self,
        path: &str,
        cookie: &str,
        fields: &[(&str, &str)],
    ) -> (StatusCode, String) {
        let r = self
            .http
            .post(self.app.url(path))
            .header(header::COOKIE, cookie)
            .form(fields)
            .send()
            .await
            .expect("request");
        let status = r.status();
        (status, r.text().await.expect("a body"))
    }

    /// The `batch.retried` entries of the audit log.
    async fn retries_audited(&self) -> Vec<Value> {
        let audit = self.app.get_json("/v1/audit?action=batch.retried").await;
        audit["entries"].as_array().cloned().unwrap_or_default()
    }
}

/// `invite-worker <role>` on the test's database and SMTP server, with the console's
/// cookie allowed over plain HTTP.
fn service(app: &TestApp, role: &str) -> Service {
    Service::new(role, &app.settings).env("INVITES_CONSOLE__INSECURE_COOKIE", "true")
}

fn row(candidate: &str) -> String {
    format!("table#items tr[data-candidate-id=\"{candidate}\"]")
}

// ---- the tests ----

#[tokio::test]
async fn an_operator_signs_in_retries_a_failure_group_sees_the_counts_move_live_and_signs_out() {
    let mut console = Console::start(Deployment::Split).await;
    let driver = Chromedriver::start().await;
    let browser = driver.browser(&console.app.base).await;

    // Not signed in: every page sends the browser to the sign-in form.
    browser.goto(&console.batch_page()).await;
    browser.wait_for_path("/console/login").await;
    // A wrong password is refused on the sign-in page.
    browser
        .submit_sign_in(OPERATOR.0, "not-the-password-at-all")
        .await;
    browser
        .wait_for_text("p.error", "an error", |t| !t.is_empty())
        .await;
    assert_eq!(browser.path().await, "/console/login");

    browser.sign_in(OPERATOR, "operator").await;
    for live in [
        "tasks.pending",
        "tasks.scheduled",
        "tasks.running",
        "tasks.done",
        "tasks.dead",
        "oldest_pending_age_secs",
        "sent_last_minute",
    ] {
        assert_eq!(
            browser.count(&format!("[data-live=\"{live}\"]")).await,
            1,
            "{live}"
        );
    }

    // From the batches list to the batch.
    browser.click("header a#nav-batches").await;
    browser.wait_for_path("/console/batches").await;
    let link = format!(
        "table#batches tr[data-batch-id=\"{}\"] a.batch-link",
        console.batch
    );
    browser.click(&link).await;
    browser.wait_for_path(&console.batch_page()).await;
    assert!(browser.text("h1").await.contains(&console.batch));
    assert_eq!(
        browser.text("[data-live=\"summary\"]").await,
        "2 sent, 5 failed"
    );
    for (id, name, email, _) in PEOPLE {
        assert_eq!(browser.text(&format!("{} td.name", row(id))).await, name);
        assert_eq!(
            browser.text(&format!("{} td.email", row(id))).await,
            email,
            "an operator sees the full address"
        );
    }
    let exhausted = "section#failure-groups div.failure-group[data-reason=\"retries_exhausted\"]";
    let rejected = "section#failure-groups div.failure-group[data-reason=\"rejected\"]";
    let group = browser.text(exhausted).await;
    assert!(group.contains("451 4.3.0"), "{group}");
    for id in EXHAUSTED {
        assert!(group.contains(id), "{id} in {group}");
        let status = browser.text(&format!("{} td.status", row(id))).await;
        assert_eq!(status, "failed", "{id}");
        let reason = browser.text(&format!("{} td.reason", row(id))).await;
        assert_eq!(reason, "retries_exhausted", "{id}");
        assert_eq!(browser.text(&format!("{} td.attempts", row(id))).await, "2");
    }
    let group = browser.text(rejected).await;
    assert!(group.contains("550 5.1.1"), "{group}");
    for id in REJECTED {
        assert!(group.contains(id), "{id} in {group}");
    }
    browser.screenshot("console-batch.png").await;

    // The workers stop, so the page shows the retry before anything is sent; the mail
    // server now accepts everyone.
    console.stop_worker().await;
    console.app.smtp.set_default(Step::Accept);
    browser
        .click(&format!("{exhausted} form.retry-group button"))
        .await;
    browser
        .wait_for_text("p.notice", "the retry's notice", |t| {
            // The contract says "Retrying 3 items"; the console writes "item(s)".
            t.contains("Retrying 3 item")
        })
        .await;
    assert_eq!(browser.path().await, console.batch_page());
    assert_eq!(browser.text("[data-live=\"counts.pending\"]").await, "3");
    assert_eq!(browser.text("[data-live=\"counts.sent\"]").await, "2");
    // A mark on this very document: a reload would lose it.
    let marked = browser
        .client
        .execute(
            "document.documentElement.dataset.testMark = 'kept'; return true;",
            vec![],
        )
        .await
        .expect("mark the document");
    assert_eq!(marked, json!(true));

    console.start_worker().await;
    browser
        .wait_for_text("[data-live=\"counts.sent\"]", "sent 2 → 5", |t| t == "5")
        .await;
    browser
        .wait_for_text("[data-live=\"status\"]", "completed", |t| t == "completed")
        .await;
    browser
        .wait_for_text("[data-live=\"summary\"]", "the new summary", |t| {
            t == "5 sent, 2 failed"
        })
        .await;
    for id in EXHAUSTED {
        let status = format!("[data-live=\"item.{id}.status\"]");
        browser
            .wait_for_text(&status, "sent", |t| t == "sent")
            .await;
    }
    let kept = browser
        .client
        .execute(
            "return document.documentElement.dataset.testMark === 'kept';",
            vec![],
        )
        .await
        .expect("read the mark");
    assert_eq!(kept, json!(true), "the counts moved without a reload");
    let batch = console.app.batch(&console.batch).await;
    assert_eq!(batch["summary"], "5 sent, 2 failed", "{batch}");

    // The retry is in the audit log, by this operator.
    let retried = console.retries_audited().await;
    assert_eq!(retried.len(), 1, "{retried:?}");
    assert_eq!(retried[0]["actor"], "operator:olga", "{retried:?}");
    browser.click("header a#nav-audit").await;
    browser.wait_for_path("/console/audit").await;
    let audit = browser.text("table#audit").await;
    assert!(
        audit.contains("operator:olga") && audit.contains("batch.retried"),
        "{audit}"
    );

    browser.click("header a#nav-overview").await;
    browser.wait_for_path("/console").await;
    let failures = browser.text("table#failures-24h").await;
    assert!(
        failures.contains("rejected") && failures.contains("550 5.1.1"),
        "{failures}"
    );
    browser.screenshot("console-overview.png").await;

    // Signing out ends the session in the database, not only in this browser.
    let cookie = browser.cookie_header().await;
    browser
        .click("header form#logout button, header form#logout input[type=submit]")
        .await;
    browser.wait_for_path("/console/login").await;
    browser.goto("/console").await;
    browser.wait_for_path("/console/login").await;
    let r = console
        .http
        .get(console.app.url("/console"))
        .header(header::COOKIE, &cookie)
        .send()
        .await
        .expect("request");
    assert_eq!(
        r.status(),
        StatusCode::SEE_OTHER,
        "the old cookie is no session"
    );
    assert_eq!(
        r.headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok()),
        Some("/console/login")
    );
    browser.close().await;
}

#[tokio::test]
async fn a_viewer_sees_masked_addresses_and_no_action_and_may_not_post_one() {
    let mut console = Console::start(Deployment::Split).await;
    // A task the worker cannot read, so the dead tasks' page has something to offer.
    push_undecodable_task(&console.app, "01J00000000000000000000009").await;
    wait_for_dead(&console.app, 1).await;
    // A second batch that stays queued while the workers are stopped: one a cancel
    // form would be offered for.
    console.stop_worker().await;
    let held = console
        .app
        .create_batch("job-console", candidates("held", 2))
        .await;
    let held_page = format!("/console/batches/{held}");
    let driver = Chromedriver::start().await;

    // An operator is offered the actions on these very pages.
    let operator = driver.browser(&console.app.base).await;
    operator.sign_in(OPERATOR, "operator").await;
    operator.goto(&console.batch_page()).await;
    assert_eq!(operator.count("form.retry-group").await, 2);
    operator.goto(&held_page).await;
    assert_eq!(operator.count("form#cancel").await, 1);
    operator.goto("/console/dead").await;
    assert_eq!(operator.count("form#retry-dead").await, 1);
    operator.close().await;

    let viewer = driver.browser(&console.app.base).await;
    viewer.sign_in(VIEWER, "viewer").await;
    viewer.goto(&console.batch_page()).await;
    for (id, name, _, masked) in PEOPLE {
        assert_eq!(viewer.text(&format!("{} td.name", row(id))).await, name);
        assert_eq!(viewer.text(&format!("{} td.email", row(id))).await, masked);
    }
    let page = viewer.source().await;
    for (_, _, email, _) in PEOPLE {
        assert!(!page.contains(email), "{email} appears on a viewer's page");
    }
    assert_eq!(
        viewer
            .count("section#failure-groups div.failure-group")
            .await,
        2
    );
    assert_eq!(viewer.count("form.retry-group").await, 0);
    assert_eq!(viewer.count("form#cancel").await, 0);

    viewer.goto(&held_page).await;
    assert_eq!(viewer.text("[data-live=\"status\"]").await, "queued");
    assert_eq!(viewer.count("form#cancel").await, 0);
    assert_eq!(viewer.count("form.retry-group").await, 0);
    for i in 0..2 {
        let cell = viewer
            .text(&format!("{} td.email", row(&format!("held-{i}"))))
            .await;
        assert_eq!(cell, "h***@example.com");
    }
    viewer.goto("/console/dead").await;
    assert_eq!(viewer.count("table#dead-tasks tr[data-task-id]").await, 1);
    assert_eq!(viewer.count("form#retry-dead").await, 0);

    // The action posted by hand, with the viewer's own valid token: forbidden.
    let cookie = viewer.cookie_header().await;
    let csrf = viewer.csrf_of("header form#logout").await;
    let cancel = format!("{held_page}/cancel");
    let (status, body) = console
        .post_form(&cancel, &cookie, &[("csrf", &csrf)])
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("forbidden"), "{body}");
    let retry = format!("{}/retry", console.batch_page());
    let fields = [("csrf", csrf.as_str()), ("reason", "retries_exhausted")];
    let (status, body) = console.post_form(&retry, &cookie, &fields).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(console.app.batch(&held).await["status"], "queued");
    assert!(console.retries_audited().await.is_empty());
    viewer.close().await;
}

#[tokio::test]
async fn a_form_without_the_csrf_token_is_refused_and_changes_nothing() {
    let console = Console::start(Deployment::Serve).await;
    let driver = Chromedriver::start().await;
    let browser = driver.browser(&console.app.base).await;
    browser.sign_in(OPERATOR, "operator").await;
    browser.goto(&console.batch_page()).await;
    let before = console.app.batch(&console.batch).await;
    let retry = format!("{}/retry", console.batch_page());

    // A form built in the page, as another site's page would post it: the browser sends
    // the session cookie (same origin), but no token.
    browser
        .client
        .execute(
            "const f = document.createElement('form');
             f.method = 'post';
             f.action = arguments[0];
             const reason = document.createElement('input');
             reason.type = 'hidden';
             reason.name = 'reason';
             reason.value = 'retries_exhausted';
             f.appendChild(reason);
             document.body.appendChild(f);
             f.submit();",
            vec![json!(retry)],
        )
        .await
        .expect("submit the forged form");
    browser.wait_for_path(&retry).await;
    browser
        .wait_for_text("body", "the refusal", |t| t.contains("csrf_failed"))
        .await;

    // The same by hand with the session's cookie: no token, an empty one, a wrong one.
    browser.goto(&console.batch_page()).await;
    let cookie = browser.cookie_header().await;
    let token = browser.csrf_of("form.retry-group").await;
    let wrong = format!("{}x", &token[..token.len() - 1]);
    for fields in [
        vec![("reason", "retries_exhausted")],
        vec![("csrf", ""), ("reason", "retries_exhausted")],
        vec![("csrf", wrong.as_str()), ("reason", "retries_exhausted")],
    ] {
        let (status, body) = console.post_form(&retry, &cookie, &fields).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{fields:?}: {body}");
        assert!(body.contains("csrf_failed"), "{fields:?}: {body}");
    }
    // Signing out needs the token too: the session lives on.
    let (status, _) = console.post_form("/console/logout", &cookie, &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    assert_eq!(
        console.app.batch(&console.batch).await,
        before,
        "nothing changed"
    );
    assert_eq!(console.app.live_tasks_of_batch(&console.batch).await, 0);
    assert!(
        console.retries_audited().await.is_empty(),
        "nothing audited"
    );

    // The token is what was missing: with it, the same request retries.
    let fields = [("csrf", token.as_str()), ("reason", "retries_exhausted")];
    let (status, body) = console.post_form(&retry, &cookie, &fields).await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{body}");
    assert_eq!(console.retries_audited().await.len(), 1);
    browser.close().await;
}

#[tokio::test]
async fn a_candidate_named_like_a_script_renders_as_text() {
    let console = Console::start(Deployment::Serve).await;
    let driver = Chromedriver::start().await;
    let browser = driver.browser(&console.app.base).await;
    browser.sign_in(OPERATOR, "operator").await;
    browser.goto(&console.batch_page()).await;

    let name = browser.text(&format!("{} td.name", row("mallory"))).await;
    assert_eq!(name, SCRIPT_NAME);
    browser.assert_no_alert().await;
    // The only scripts are the console's own files.
    let inline = browser
        .client
        .execute(
            "return Array.from(document.scripts).filter(s => !s.src).length;",
            vec![],
        )
        .await
        .expect("count inline scripts");
    assert_eq!(inline, json!(0));

    // On the wire: escaped, and a policy that would not run an inline script anyway.
    let r = console
        .http
        .get(console.app.url(&console.batch_page()))
        .header(header::COOKIE, browser.cookie_header().await)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    let csp = r
        .headers()
        .get(header::CONTENT_SECURITY_POLICY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    let html = r.text().await.expect("a body");
    assert!(!html.contains(SCRIPT_NAME), "the name is escaped");
    assert!(
        html.contains("&lt;script&gt;alert(1)&lt;/script&gt;")
            || html.contains("&#60;script&#62;alert(1)&#60;/script&#62;"),
        "the name is there, escaped"
    );
    // The API key is still needed for the API: the console's cookie opens nothing there.
    let r = console
        .http
        .get(console.app.url(&format!("/v1/batches/{}", console.batch)))
        .header(header::COOKIE, browser.cookie_header().await)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    browser.close().await;
}
