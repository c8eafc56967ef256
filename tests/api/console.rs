//! The operators' web console over HTTP (the browser test drives it in Chromium):
//! sign-in and sessions, cookies, CSRF, roles, escaping, the security headers, and the
//! audit entries its actions write.

use invite_worker::domain::access::hash_password;
use reqwest::{StatusCode, header};
use serde_json::{Value, json};

use crate::{
    helpers::{TestApp, spawn_app_with},
    operations::batch_with_failures,
};

const PASSWORD: &str = "correct horse battery staple";

/// A browser of one operator: its cookies, by hand (the console's cookies are `Secure`
/// by default, which a cookie store would not send over plain HTTP).
struct Browser<'a> {
    app: &'a TestApp,
    client: reqwest::Client,
    session: String,
    csrf: String,
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

async fn add_operator(app: &TestApp, name: &str, role: &str) {
    let hash = hash_password(PASSWORD).expect("hash");
    sqlx::query("INSERT INTO operators (name, role, password_hash) VALUES ($1, $2, $3)")
        .bind(name)
        .bind(role)
        .bind(hash)
        .execute(&app.pool)
        .await
        .expect("operator added");
}

/// The value of the hidden `csrf` field of the first form in `html`.
fn csrf_in(html: &str) -> String {
    let start = html.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    html[start..].split('"').next().expect("value").to_owned()
}

/// The `Set-Cookie` header of `name`, whole.
fn set_cookie<'r>(r: &'r reqwest::Response, name: &str) -> Option<&'r str> {
    r.headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
}

fn cookie_value(set_cookie: &str) -> String {
    let pair = set_cookie.split(';').next().expect("pair");
    pair.split_once('=').expect("name=value").1.to_owned()
}

/// The sign-in page's form token and the cookie that goes with it.
async fn login_form(app: &TestApp, client: &reqwest::Client) -> (String, String) {
    let r = client
        .get(app.url("/console/login"))
        .send()
        .await
        .expect("login page");
    assert_eq!(r.status(), StatusCode::OK);
    let cookie = cookie_value(set_cookie(&r, "iw_login").expect("a login cookie"));
    let html = r.text().await.expect("html");
    (csrf_in(&html), cookie)
}

async fn try_sign_in(app: &TestApp, name: &str, password: &str) -> reqwest::Response {
    let client = no_redirects();
    let (csrf, cookie) = login_form(app, &client).await;
    client
        .post(app.url("/console/login"))
        .header(header::COOKIE, format!("iw_login={cookie}"))
        .form(&[("name", name), ("password", password), ("csrf", &csrf)])
        .send()
        .await
        .expect("sign-in")
}

async fn sign_in<'a>(app: &'a TestApp, name: &str) -> Browser<'a> {
    let r = try_sign_in(app, name, PASSWORD).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[header::LOCATION], "/console");
    let cookie = set_cookie(&r, "iw_session").expect("a session cookie");
    let session = cookie_value(cookie);
    let mut browser = Browser {
        app,
        client: no_redirects(),
        session,
        csrf: String::new(),
    };
    let html = browser.page("/console").await;
    browser.csrf = csrf_in(&html);
    browser
}

impl Browser<'_> {
    async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.app.url(path))
            .header(header::COOKIE, format!("iw_session={}", self.session))
            .send()
            .await
            .expect("request")
    }

    /// A page that must answer 200 with the console's headers; its HTML.
    async fn page(&self, path: &str) -> String {
        let r = self.get(path).await;
        assert_eq!(r.status(), StatusCode::OK, "GET {path}");
        assert_security_headers(&r);
        r.text().await.expect("html")
    }

    async fn post(&self, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        self.client
            .post(self.app.url(path))
            .header(header::COOKIE, format!("iw_session={}", self.session))
            .form(form)
            .send()
            .await
            .expect("request")
    }
}

fn assert_security_headers(r: &reqwest::Response) {
    let csp = r.headers()[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .expect("csp");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(r.headers()[header::X_FRAME_OPTIONS], "DENY");
}

async fn failed_items(app: &TestApp, id: &str) -> i64 {
    app.batch(id).await["counts"]["failed"]
        .as_i64()
        .expect("failed")
}

#[tokio::test]
async fn sign_in_sets_a_strict_http_only_secure_cookie_and_sign_out_ends_the_session() {
    let app = spawn_app_with(|_| {}).await;
    add_operator(&app, "ada", "operator").await;

    // Not signed in: every page leads to the sign-in page.
    let anonymous = no_redirects();
    for path in [
        "/console",
        "/console/batches",
        "/console/audit",
        "/console/dead",
    ] {
        let r = anonymous.get(app.url(path)).send().await.expect("request");
        assert_eq!(r.status(), StatusCode::SEE_OTHER, "{path}");
        assert_eq!(r.headers()[header::LOCATION], "/console/login", "{path}");
    }

    let r = try_sign_in(&app, "ada", PASSWORD).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let cookie = set_cookie(&r, "iw_session").expect("session cookie");
    for attribute in [
        "HttpOnly",
        "Secure",
        "SameSite=Strict",
        "Path=/console",
        "Max-Age=28800",
    ] {
        assert!(cookie.contains(attribute), "{attribute} in {cookie}");
    }
    // The database knows the session only by its token's digest.
    let token = cookie_value(cookie);
    let stored: Vec<Vec<u8>> = sqlx::query_scalar("SELECT token_sha256 FROM console_sessions")
        .fetch_all(&app.pool)
        .await
        .expect("sessions");
    assert_eq!(stored.len(), 1);
    assert_ne!(stored[0], token.as_bytes());

    let browser = sign_in(&app, "ada").await;
    let html = browser.page("/console").await;
    assert!(
        html.contains("<span id=\"whoami\">ada (operator)</span>"),
        "{html}"
    );

    let r = browser
        .post("/console/logout", &[("csrf", &browser.csrf)])
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[header::LOCATION], "/console/login");
    assert!(
        set_cookie(&r, "iw_session")
            .expect("cleared")
            .contains("Max-Age=0")
    );
    // The session row is gone (the first sign-in's remains), and its cookie signs
    // nobody in any more.
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM console_sessions")
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(left, 1);
    let r = browser.get("/console").await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[header::LOCATION], "/console/login");
}

#[tokio::test]
async fn an_insecure_cookie_is_only_sent_when_configured_and_sessions_expire() {
    let app = spawn_app_with(|s| {
        s.console.insecure_cookie = true;
        s.console.session_hours = 1;
    })
    .await;
    add_operator(&app, "ada", "viewer").await;
    let r = try_sign_in(&app, "ada", PASSWORD).await;
    let cookie = set_cookie(&r, "iw_session").expect("session cookie");
    assert!(!cookie.contains("Secure"), "{cookie}");
    assert!(cookie.contains("Max-Age=3600"), "{cookie}");

    let browser = sign_in(&app, "ada").await;
    sqlx::query("UPDATE console_sessions SET expires_at = now() - interval '1 second'")
        .execute(&app.pool)
        .await
        .expect("expire");
    let r = browser.get("/console").await;
    assert_eq!(
        r.status(),
        StatusCode::SEE_OTHER,
        "an expired session signs nobody in"
    );
}

#[tokio::test]
async fn wrong_passwords_are_refused_and_count_toward_the_auth_failure_limit() {
    let app = spawn_app_with(|s| s.limits.auth_failures_per_minute = 3).await;
    add_operator(&app, "ada", "operator").await;

    for (name, password) in [("ada", "wrong"), ("nobody", PASSWORD), ("ada", "")] {
        let r = try_sign_in(&app, name, password).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{name}/{password}");
        assert!(set_cookie(&r, "iw_session").is_none());
        let html = r.text().await.expect("html");
        assert!(
            html.contains("<p class=\"error\">Wrong name or password.</p>"),
            "{html}"
        );
    }
    // The budget is spent: the right password is refused until it refills, and so is a
    // wrong API key from the same address (one budget for both).
    let r = try_sign_in(&app, "ada", "wrong again").await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key(header::RETRY_AFTER));
    let r = try_sign_in(&app, "ada", PASSWORD).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let r = app
        .client
        .get(app.url("/v1/audit"))
        .bearer_auth("not-the-key")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn a_sign_in_without_its_form_token_is_refused() {
    let app = spawn_app_with(|_| {}).await;
    add_operator(&app, "ada", "operator").await;
    let client = no_redirects();
    let (csrf, _cookie) = login_form(&app, &client).await;
    // The token without the cookie it was issued with (a form posted from elsewhere).
    let r = client
        .post(app.url("/console/login"))
        .form(&[("name", "ada"), ("password", PASSWORD), ("csrf", &csrf)])
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.text().await.expect("html").contains("csrf_failed"));
}

#[tokio::test]
async fn an_operator_retries_a_failure_group_and_the_audit_log_names_them() {
    let app = spawn_app_with(|_| {}).await;
    add_operator(&app, "ada", "operator").await;
    let id = batch_with_failures(&app).await;
    let browser = sign_in(&app, "ada").await;

    let html = browser.page(&format!("/console/batches/{id}")).await;
    assert!(html.contains("class=\"retry-group\""), "{html}");
    assert!(
        !html.contains("id=\"cancel\""),
        "a completed batch has no cancel"
    );
    // Operators see whole addresses.
    assert!(html.contains("gone.0@example.com"), "{html}");

    let before = failed_items(&app, &id).await;
    let r = browser
        .post(
            &format!("/console/batches/{id}/retry"),
            &[("csrf", &browser.csrf), ("reason", "rejected")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let location = r.headers()[header::LOCATION]
        .to_str()
        .expect("location")
        .to_owned();
    assert_eq!(location, format!("/console/batches/{id}?done=retried&n=4"));
    let html = browser.page(&location).await;
    assert!(
        html.contains("<p class=\"notice\">Retrying 4 item(s).</p>"),
        "{html}"
    );
    assert_eq!(failed_items(&app, &id).await, before - 4);

    let audit = app.get_json("/v1/audit?actor=operator:ada").await;
    assert_eq!(audit["entries"][0]["action"], "batch.retried", "{audit}");
    assert_eq!(audit["entries"][0]["target"], json!(id));
    let html = browser.page("/console/audit?actor=operator%3Aada").await;
    assert!(html.contains("batch.retried"), "{html}");
}

#[tokio::test]
async fn a_form_without_a_valid_csrf_token_is_refused_and_changes_nothing() {
    let app = spawn_app_with(|_| {}).await;
    add_operator(&app, "ada", "operator").await;
    let id = batch_with_failures(&app).await;
    let browser = sign_in(&app, "ada").await;
    let before = app.batch(&id).await;

    let retry = format!("/console/batches/{id}/retry");
    let cancel = format!("/console/batches/{id}/cancel");
    let forged: [(&str, Vec<(&str, &str)>); 5] = [
        (retry.as_str(), vec![("reason", "rejected")]),
        (
            retry.as_str(),
            vec![("csrf", "forged"), ("reason", "rejected")],
        ),
        (cancel.as_str(), vec![]),
        ("/console/dead/retry", vec![("all", "true")]),
        ("/console/logout", vec![("csrf", "")]),
    ];
    for (path, form) in forged {
        let r = browser.post(path, &form).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path} {form:?}");
        assert!(r.text().await.expect("html").contains("csrf_failed"));
    }
    // A JSON body is no form of ours either.
    let r = browser
        .client
        .post(app.url(&retry))
        .header(header::COOKIE, format!("iw_session={}", browser.session))
        .json(&json!({"csrf": browser.csrf}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    assert_eq!(app.batch(&id).await, before);
    let audit = app.get_json("/v1/audit?actor=operator:ada").await;
    assert_eq!(audit["entries"], json!([]));
    // Still signed in: the forged sign-out did nothing.
    browser.page("/console").await;
}

#[tokio::test]
async fn a_viewer_sees_masked_addresses_and_no_actions_and_may_not_act() {
    let app = spawn_app_with(|_| {}).await;
    add_operator(&app, "vic", "viewer").await;
    let id = batch_with_failures(&app).await;
    let browser = sign_in(&app, "vic").await;

    let html = browser.page(&format!("/console/batches/{id}")).await;
    assert!(html.contains("<span id=\"whoami\">vic (viewer)</span>"));
    assert!(!html.contains("gone.0@example.com"), "{html}");
    assert!(html.contains("g***@example.com"), "{html}");
    assert!(
        !html.contains("retry-group") && !html.contains("id=\"cancel\""),
        "{html}"
    );

    let before = app.batch(&id).await;
    let r = browser
        .post(
            &format!("/console/batches/{id}/retry"),
            &[("csrf", &browser.csrf), ("reason", "rejected")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(
        r.text()
            .await
            .expect("html")
            .contains("<code id=\"error-code\">forbidden</code>")
    );
    assert_eq!(app.batch(&id).await, before);
}

#[tokio::test]
async fn names_titles_and_replies_are_escaped_everywhere() {
    let app = spawn_app_with(|_| {}).await;
    add_operator(&app, "ada", "operator").await;
    app.open_job("job-x").await;
    let evil = "<script>alert(1)</script>";
    app.smtp.script(
        "x.1@example.com",
        [smtp_testkit::Step::RcptReply(550, format!("5.1.1 {evil}"))],
    );
    let id = app
        .create_batch(
            "job-x",
            vec![
                json!({"id": "x-0", "email": "x.0@example.com", "name": evil}),
                json!({"id": "x-1", "email": "x.1@example.com", "name": "\" onmouseover=\"alert(2)"}),
            ],
        )
        .await;
    app.wait_until_completed(&id).await;
    let browser = sign_in(&app, "ada").await;
    for path in [
        format!("/console/batches/{id}"),
        "/console".to_owned(),
        "/console/batches?job=%3Cscript%3E".to_owned(),
        "/console/audit?actor=%3Cscript%3E".to_owned(),
    ] {
        let html = browser.page(&path).await;
        assert!(!html.contains("<script>alert"), "{path}: {html}");
        assert!(!html.contains("\" onmouseover"), "{path}: {html}");
    }
    let html = browser.page(&format!("/console/batches/{id}")).await;
    assert!(
        html.contains("&#60;script&#62;alert(1)&#60;/script&#62;"),
        "{html}"
    );
}

#[tokio::test]
async fn the_live_figures_follow_the_batch() {
    let app = spawn_app_with(|_| {}).await;
    add_operator(&app, "ada", "viewer").await;
    let id = batch_with_failures(&app).await;
    let browser = sign_in(&app, "ada").await;

    let r = browser.get(&format!("/console/live/batches/{id}")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let live: Value = r.json().await.expect("json");
    assert_eq!(live["counts.sent"], "1");
    assert_eq!(live["counts.failed"], "27");
    assert_eq!(live["summary"], "1 sent, 27 failed");
    assert_eq!(live["item.gone-0.reason"], "rejected");
    // Every figure the page shows has a live value, and every live value an element.
    let html = browser.page(&format!("/console/batches/{id}")).await;
    for key in live.as_object().expect("object").keys() {
        assert!(html.contains(&format!("data-live=\"{key}\"")), "{key}");
    }
    let overview: Value = browser
        .get("/console/live/overview")
        .await
        .json()
        .await
        .expect("json");
    let html = browser.page("/console").await;
    for key in overview.as_object().expect("object").keys() {
        assert!(html.contains(&format!("data-live=\"{key}\"")), "{key}");
    }
    // Signed out, the figures are not served.
    let r = no_redirects()
        .get(app.url(&format!("/console/live/batches/{id}")))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn the_pages_and_assets_answer_and_unknown_ones_are_404() {
    let app = spawn_app_with(|_| {}).await;
    add_operator(&app, "ada", "operator").await;
    let browser = sign_in(&app, "ada").await;
    for path in [
        "/console",
        "/console/batches",
        "/console/batches?status=completed&job=j",
        "/console/dead",
        "/console/audit?action=batch.retried",
    ] {
        browser.page(path).await;
    }
    for (path, kind) in [
        ("/console/static/console.js", "text/javascript"),
        ("/console/static/console.css", "text/css"),
    ] {
        let r = browser.get(path).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(
            r.headers()[header::CONTENT_TYPE]
                .to_str()
                .expect("type")
                .starts_with(kind)
        );
    }
    for path in [
        "/console/batches/not-a-uuid",
        "/console/batches/0193a000-0000-7000-8000-000000000000",
        "/console/nothing",
        "/console/batches/%ff",
    ] {
        let r = browser.get(path).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        assert_security_headers(&r);
    }
}

#[tokio::test]
async fn the_console_is_not_served_when_disabled() {
    let app = spawn_app_with(|s| s.console.enabled = false).await;
    let r = no_redirects()
        .get(app.url("/console/login"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_webhooks_pages_list_deliveries_and_an_operator_replays_one() {
    let app = spawn_app_with(|s| s.webhooks.allow_private_targets = true).await;
    add_operator(&app, "ada", "operator").await;
    add_operator(&app, "vic", "viewer").await;
    // Nothing listens on port 1: every attempt is a refused connection.
    let r = app
        .post_json(
            "/v1/webhooks",
            &json!({"url": "http://127.0.0.1:1/hook?token=receivers-own", "events": ["item.failed"],
                    "description": "<b>recruiting</b> app"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let endpoint: Value = r.json().await.expect("json");
    let endpoint = endpoint["id"].as_str().expect("id").to_owned();
    app.open_job("job-w").await;
    let id = app
        .create_batch(
            "job-w",
            vec![json!({"id": "w-0", "email": "not-an-address"})],
        )
        .await;
    app.wait_until_completed(&id).await;
    let deliveries = format!("/v1/webhooks/{endpoint}/deliveries");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let delivery = loop {
        let list = app.get_json(&deliveries).await;
        let first = &list["deliveries"][0];
        if first["attempts"].as_i64().unwrap_or(0) >= 1 {
            break first["id"].as_str().expect("id").to_owned();
        }
        assert!(tokio::time::Instant::now() < deadline, "no attempt: {list}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };

    let viewer = sign_in(&app, "vic").await;
    let html = viewer.page("/console/webhooks").await;
    assert!(
        html.contains("&#60;b&#62;recruiting&#60;/b&#62; app"),
        "{html}"
    );
    assert!(
        html.contains(&format!("href=\"/console/webhooks/{endpoint}\"")),
        "{html}"
    );
    let page = format!("/console/webhooks/{endpoint}");
    for html in [html, viewer.page(&page).await] {
        assert!(
            html.contains("http://127.0.0.1/…") && !html.contains("receivers-own"),
            "a viewer sees the host, not the rest of the URL: {html}"
        );
    }
    let html = viewer.page(&page).await;
    assert!(
        html.contains(&format!("data-delivery-id=\"{delivery}\"")),
        "{html}"
    );
    assert!(html.contains("item.failed"), "{html}");
    assert!(
        !html.contains("class=\"replay\""),
        "a viewer gets no replay: {html}"
    );

    let operator = sign_in(&app, "ada").await;
    let html = operator.page(&page).await;
    assert!(html.contains("class=\"replay\""), "{html}");
    assert!(
        html.contains("receivers-own"),
        "an operator sees the whole URL: {html}"
    );
    let replay = format!("/console/webhooks/{endpoint}/deliveries/{delivery}/replay");
    let r = viewer.post(&replay, &[("csrf", &viewer.csrf)]).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = operator.post(&replay, &[("csrf", "forged")]).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = operator.post(&replay, &[("csrf", &operator.csrf)]).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        r.headers()[header::LOCATION],
        format!("/console/webhooks/{endpoint}?done=replayed").as_str()
    );
    let audit = app.get_json("/v1/audit?actor=operator:ada").await;
    assert_eq!(
        audit["entries"].as_array().expect("entries").len(),
        1,
        "{audit}"
    );
    assert_eq!(audit["entries"][0]["action"], "webhook.delivery_replayed");
    let list = app.get_json(&deliveries).await;
    assert_eq!(
        list["deliveries"].as_array().expect("deliveries").len(),
        2,
        "{list}"
    );
}
