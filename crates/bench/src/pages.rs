//! `cargo bench --bench pages`: how fast the console's pages and the API's read routes
//! answer on a large history (issue #15: under 100 ms at p50 with 1,000,000 items).
//!
//! One run:
//! 1. creates a fresh database `invites_pages_<run>`, migrates it with the binary
//!    (`invite-worker migrate`) and seeds it with set-based SQL (`pages_seed.sql`:
//!    `--batches` × `--items-per-batch` items over `--jobs` job openings, with their
//!    invitations, attempt history, queue tasks and audit log), then `VACUUM ANALYZE`
//!    and `CHECKPOINT`;
//! 2. adds an operator with the binary (`operators add … --password-stdin`), starts the
//!    binary as `api` (HTTP only: nothing changes the data while it is measured) and
//!    signs in to the console as a browser does;
//! 3. times `--requests` sequential requests of each route (after `--warmup` more), over
//!    one kept-alive connection, and prints p50 and p99 per route;
//! 4. writes the figures as JSON (`--json`) and drops the database, also after an error
//!    or Ctrl-C.
//!
//! A benchmark prints numbers: it asserts nothing about time, but it fails when any
//! request answers other than 200.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, anyhow, bail};
use reqwest::{StatusCode, header};
use serde::Serialize;
use sqlx::{ConnectOptions, Connection, postgres::PgConnectOptions};
use tokio::time::Instant;

use super::{Scratch, progress, report::percentile, service::Service, supervise};
use invite_worker::config::Settings;

/// The history the seed writes, in one transaction (see the file's header).
const SEED: &str = include_str!("pages_seed.sql");

/// The p50 the issue asks of each page and route.
const TARGET_P50_MS: f64 = 100.0;

/// The page benchmark's flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "pages",
    about = "Time the console's pages and the API's read routes on a seeded history of 1,000,000 items, in a fresh database that is dropped afterwards"
)]
pub struct PagesArgs {
    /// Batches to seed.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub batches: u32,

    /// Items in each batch (the product's batches hold up to 100).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub items_per_batch: u32,

    /// Job openings the batches are spread over.
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub jobs: u32,

    /// Timed requests per route.
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub requests: usize,

    /// Untimed requests per route before those.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub warmup: usize,

    /// Where to write the figures as JSON.
    #[arg(long, value_name = "PATH", default_value = "pages-results.json")]
    pub json: PathBuf,

    /// Only the API's routes, no sign-in: for a build without the console (with
    /// `--service-bin`).
    #[arg(long)]
    pub api_only: bool,

    /// The service binary to measure (default: the one `cargo bench` built).
    #[arg(long, value_name = "PATH")]
    pub service_bin: Option<PathBuf>,

    /// Set by `cargo bench`; without it (`cargo test --all-targets` runs bench targets
    /// too) nothing is measured.
    #[arg(long, hide = true)]
    pub bench: bool,
}

/// Everything one run measured.
#[derive(Debug, Serialize)]
pub struct PagesResults {
    pub tool: String,
    pub started_at: String,
    pub cpus: usize,
    pub postgres: String,
    pub load_average_at_start: String,
    pub data: Data,
    pub requests_per_route: usize,
    pub warmup_per_route: usize,
    pub target_p50_ms: f64,
    pub routes: Vec<RouteFigures>,
    pub wall_secs: f64,
}

/// What the seeded database holds.
#[derive(Debug, Serialize)]
pub struct Data {
    pub batches: i64,
    pub items: i64,
    pub invitations: i64,
    pub attempts: i64,
    pub audit_entries: i64,
    pub queue_tasks: i64,
    pub database_mb: i64,
    pub seed_secs: f64,
}

/// One route's timings.
#[derive(Debug, Serialize)]
pub struct RouteFigures {
    /// What was requested, ids shown as `{id}`.
    pub route: String,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub p50_under_target: bool,
    /// Requests that answered other than 200 (warm-up included).
    pub failures: usize,
}

/// Runs the benchmark against `exe` on the PostgreSQL server of `settings.database.url`.
pub async fn run(settings: Settings, args: PagesArgs, exe: PathBuf) -> anyhow::Result<()> {
    let started = Instant::now();
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let scratch = Arc::new(Scratch::new(settings.database.url.expose())?);
    // Named so that no `pkill -f invite-worker` elsewhere takes the service down mid-run.
    let dir = std::env::temp_dir().join(format!("iw-pages-{run_id}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    let mut results = supervise(
        measure(args.clone(), exe, scratch.clone(), dir.clone(), run_id),
        &scratch,
        &dir,
    )
    .await?;
    results.wall_secs = started.elapsed().as_secs_f64();
    println!();
    print!("{}", table(&results));
    println!("run took {:.0} s", results.wall_secs);
    let json = serde_json::to_string_pretty(&results)?;
    std::fs::write(&args.json, json + "\n")
        .with_context(|| format!("writing {}", args.json.display()))?;
    println!("figures written to {}", args.json.display());
    let failed: Vec<String> = results
        .routes
        .iter()
        .filter(|r| r.failures > 0)
        .map(|r| format!("{} ({} failed)", r.route, r.failures))
        .collect();
    if !failed.is_empty() {
        bail!("requests failed: {}", failed.join(", "));
    }
    Ok(())
}

async fn measure(
    args: PagesArgs,
    exe: PathBuf,
    scratch: Arc<Scratch>,
    dir: PathBuf,
    run_id: String,
) -> anyhow::Result<PagesResults> {
    let started_at = chrono::Utc::now().to_rfc3339();
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    progress(format!("invite-worker page bench — run {run_id}"));
    progress(format!("  machine   {cpus} CPUs, load average {load}"));

    // 1. The database: migrated by the binary, then seeded.
    let db = format!("invites_pages_{run_id}");
    let url = scratch.create(&db).await?;
    let base_env = vec![("INVITES_DATABASE__URL".to_owned(), url.clone())];
    cli(&exe, &dir, &base_env, &["migrate"], None)?;
    progress(format!("  database  {db} (created, migrated)"));
    let mut conn = sqlx::PgConnection::connect_with(
        &PgConnectOptions::from_str(&url)?
            .application_name("invite-worker-bench")
            .disable_statement_logging(),
    )
    .await?;
    let postgres: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&mut conn)
        .await?;
    let total_items = u64::from(args.batches) * u64::from(args.items_per_batch);
    progress(format!(
        "  seeding   {} batches × {} items = {total_items} items over {} jobs …",
        args.batches, args.items_per_batch, args.jobs
    ));
    let seeding = Instant::now();
    seed(&mut conn, &args).await?;
    let seed_secs = seeding.elapsed().as_secs_f64();
    let data = data(&mut conn, seed_secs).await?;
    progress(format!(
        "            {} items, {} invitations, {} attempts, {} audit entries, {} tasks; {} MB; {seed_secs:.0} s",
        data.items,
        data.invitations,
        data.attempts,
        data.audit_entries,
        data.queue_tasks,
        data.database_mb
    ));
    // A finished batch of a full page of items, with failures, and its job.
    let (batch_id, job_id): (uuid::Uuid, String) = sqlx::query_as(
        "SELECT id, job_id FROM batches
          WHERE status = 'completed' AND failed > 0 AND total = $1
          ORDER BY created_at DESC LIMIT 1",
    )
    .bind(i32::try_from(args.items_per_batch)?)
    .fetch_one(&mut conn)
    .await
    .context("finding a completed batch with failures")?;
    let _ = conn.close().await;

    // 2. An operator, the service (HTTP only), a console session.
    let password = invite_worker::config::generate_secret();
    if !args.api_only {
        cli(
            &exe,
            &dir,
            &base_env,
            &[
                "operators",
                "add",
                "bench-operator",
                "--role",
                "operator",
                "--password-stdin",
            ],
            Some(&password),
        )?;
    }
    let key = invite_worker::config::generate_secret();
    let port = super::service::free_port()?;
    let mut env = base_env;
    env.extend([
        ("INVITES_HTTP__BIND".to_owned(), format!("127.0.0.1:{port}")),
        ("INVITES_API__KEYS".to_owned(), key.clone()),
        (
            "INVITES_INVITE__TOKEN_SECRET".to_owned(),
            invite_worker::config::generate_secret(),
        ),
    ]);
    if !args.api_only {
        // Plain HTTP: a Secure cookie would not come back over it.
        env.push((
            "INVITES_CONSOLE__INSECURE_COOKIE".to_owned(),
            "true".to_owned(),
        ));
    }
    let mut svc = Service::spawn_role(&exe, &dir, &env, port, "api")?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let ready_in = svc.wait_ready(&client, Duration::from_secs(60)).await?;
    progress(format!(
        "  service   {} api, pid {}, ready in {} ms at {}",
        exe.display(),
        svc.pid,
        ready_in.as_millis(),
        svc.base
    ));
    let session = if args.api_only {
        String::new()
    } else {
        sign_in(&client, &svc.base, "bench-operator", &password).await?
    };

    // 3. The routes.
    let console = |path: String| Route {
        label: path.replace(&batch_id.to_string(), "{id}"),
        path,
        auth: Auth::Cookie(format!("iw_session={session}")),
    };
    let api = |path: String| Route {
        label: path.replace(&batch_id.to_string(), "{id}"),
        path,
        auth: Auth::Bearer(key.clone()),
    };
    let mut routes = vec![
        console("/console".into()),
        console("/console/live/overview".into()),
        console("/console/batches".into()),
        console("/console/batches?status=running".into()),
        console(format!("/console/batches?job={job_id}")),
        console(format!("/console/batches?job={job_id}&status=completed")),
        console(format!("/console/batches/{batch_id}")),
        console(format!("/console/live/batches/{batch_id}")),
        console("/console/dead".into()),
        console("/console/audit".into()),
        console("/console/audit?actor=operator%3Aalice".into()),
        console("/console/audit?action=batch.cancelled".into()),
        api("/v1/batches".into()),
        api(format!("/v1/batches?job_id={job_id}&status=completed")),
        api(format!("/v1/batches/{batch_id}")),
        api(format!("/v1/batches/{batch_id}/items")),
        api(format!("/v1/batches/{batch_id}/failures")),
        api("/v1/queue".into()),
        api("/v1/audit".into()),
    ];
    if args.api_only {
        routes.retain(|r| matches!(r.auth, Auth::Bearer(_)));
    }
    progress(format!(
        "  timing    {} routes × {} requests (after {} untimed), one at a time; {job_id}'s batch {batch_id} has {} items",
        routes.len(),
        args.requests,
        args.warmup,
        args.items_per_batch
    ));
    let mut figures = Vec::with_capacity(routes.len());
    for route in &routes {
        let f = time_route(&client, &svc.base, route, args.warmup, args.requests)
            .await
            .map_err(|e| super::with_service_exit(&mut svc, e))?;
        progress(format!(
            "            {:<48} p50 {:>7.2} ms  p99 {:>7.2} ms{}",
            f.route,
            f.p50_ms,
            f.p99_ms,
            if f.failures > 0 {
                format!("  ({} failed)", f.failures)
            } else {
                String::new()
            }
        ));
        figures.push(f);
    }
    svc.kill();
    Ok(PagesResults {
        tool: "invite-worker page bench".into(),
        started_at,
        cpus,
        postgres,
        load_average_at_start: load,
        data,
        requests_per_route: args.requests,
        warmup_per_route: args.warmup,
        target_p50_ms: TARGET_P50_MS,
        routes: figures,
        wall_secs: 0.0,
    })
}

/// Runs `exe ARGS` in `dir` with only `env` of the INVITES_* settings (and `stdin` on
/// its standard input); fails with its output when it fails.
fn cli(
    exe: &Path,
    dir: &Path,
    env: &[(String, String)],
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<()> {
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .current_dir(dir)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("INVITES_") || k == "DATABASE_URL" || k == "RUST_LOG" {
            cmd.env_remove(&key);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {} {}", exe.display(), args.join(" ")))?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input.write_all(text.as_bytes())?;
        input.write_all(b"\n")?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`invite-worker {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Writes the history (one transaction), vacuums and analyzes it as autovacuum would
/// have by the time such a history exists, and checkpoints.
async fn seed(conn: &mut sqlx::PgConnection, args: &PagesArgs) -> anyhow::Result<()> {
    let mut tx = conn.begin().await?;
    sqlx::query(
        "CREATE TEMPORARY TABLE seed ON COMMIT DROP AS
         SELECT $1::integer AS batches, $2::integer AS per_batch, $3::integer AS jobs",
    )
    .bind(i32::try_from(args.batches)?)
    .bind(i32::try_from(args.items_per_batch)?)
    .bind(i32::try_from(args.jobs)?)
    .execute(&mut *tx)
    .await?;
    sqlx::raw_sql(SEED)
        .execute(&mut *tx)
        .await
        .context("seeding")?;
    tx.commit().await?;
    sqlx::raw_sql("VACUUM ANALYZE")
        .execute(&mut *conn)
        .await
        .context("VACUUM ANALYZE")?;
    // The seed's gigabyte of writes, flushed now rather than by a checkpoint in the
    // middle of the first routes' timings (their p99 was 0.1-0.4 s once).
    if let Err(e) = sqlx::raw_sql("CHECKPOINT").execute(&mut *conn).await {
        eprintln!("warning: CHECKPOINT after seeding: {e} (timings may include its writes)");
    }
    Ok(())
}

/// Counts what the seed wrote.
async fn data(conn: &mut sqlx::PgConnection, seed_secs: f64) -> anyhow::Result<Data> {
    let (batches, items, invitations, attempts, audit_entries, queue_tasks, bytes): (
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
    ) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM batches), (SELECT count(*) FROM batch_items),
                (SELECT count(*) FROM invitations), (SELECT count(*) FROM attempts),
                (SELECT count(*) FROM audit_log), (SELECT count(*) FROM apalis.jobs),
                pg_database_size(current_database())",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(Data {
        batches,
        items,
        invitations,
        attempts,
        audit_entries,
        queue_tasks,
        database_mb: bytes / (1024 * 1024),
        seed_secs,
    })
}

/// How a route is called.
enum Auth {
    /// The console's session cookie (`Cookie` header value).
    Cookie(String),
    /// An API key.
    Bearer(String),
}

struct Route {
    label: String,
    path: String,
    auth: Auth,
}

/// Signs in to the console as a browser does (the sign-in page's cookie and hidden
/// CSRF field, then the form) and returns the session cookie's value.
async fn sign_in(
    client: &reqwest::Client,
    base: &str,
    name: &str,
    password: &str,
) -> anyhow::Result<String> {
    let page = client.get(format!("{base}/console/login")).send().await?;
    if page.status() != StatusCode::OK {
        bail!("GET /console/login answered {}", page.status());
    }
    let login = cookie(page.headers(), "iw_login")
        .ok_or_else(|| anyhow!("GET /console/login set no iw_login cookie"))?;
    let html = page.text().await?;
    let csrf = hidden_value(&html, "csrf")
        .ok_or_else(|| anyhow!("the sign-in page has no hidden csrf field"))?;
    let answer = client
        .post(format!("{base}/console/login"))
        .header(header::COOKIE, format!("iw_login={login}"))
        .form(&[("name", name), ("password", password), ("csrf", &csrf)])
        .send()
        .await?;
    if answer.status() != StatusCode::SEE_OTHER {
        bail!("POST /console/login answered {}", answer.status());
    }
    cookie(answer.headers(), "iw_session")
        .filter(|v| !v.is_empty())
        .ok_or_else(|| anyhow!("signing in set no iw_session cookie"))
}

/// The value of cookie `name` among the response's `Set-Cookie` headers.
fn cookie(headers: &header::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            let pair = v.split(';').next()?.trim();
            let (k, value) = pair.split_once('=')?;
            (k == name).then(|| value.to_owned())
        })
}

/// The `value` of the `<input … name="NAME" …>` in `html`.
fn hidden_value(html: &str, name: &str) -> Option<String> {
    let wanted = format!("name=\"{name}\"");
    html.split("<input").skip(1).find_map(|rest| {
        let tag = &rest[..rest.find('>')?];
        if !tag.contains(&wanted) {
            return None;
        }
        let start = tag.find("value=\"")? + "value=\"".len();
        let len = tag[start..].find('"')?;
        Some(tag[start..start + len].to_owned())
    })
}

/// `warmup` untimed then `n` timed requests of `route`, one at a time; each timed from
/// sending to the last byte of the body.
async fn time_route(
    client: &reqwest::Client,
    base: &str,
    route: &Route,
    warmup: usize,
    n: usize,
) -> anyhow::Result<RouteFigures> {
    let url = format!("{base}{}", route.path);
    let mut samples = Vec::with_capacity(n);
    let mut failures = 0;
    for i in 0..warmup + n {
        let request = match &route.auth {
            Auth::Cookie(c) => client.get(&url).header(header::COOKIE, c),
            Auth::Bearer(k) => client.get(&url).bearer_auth(k),
        };
        let sent = Instant::now();
        let response = request
            .send()
            .await
            .with_context(|| format!("GET {}", route.label))?;
        let status = response.status();
        let body = response.bytes().await?;
        let took = sent.elapsed();
        if status != StatusCode::OK {
            if failures == 0 {
                eprintln!(
                    "GET {} answered {status}: {}",
                    route.label,
                    String::from_utf8_lossy(&body[..body.len().min(300)])
                );
            }
            failures += 1;
        }
        if i >= warmup {
            samples.push(took.as_secs_f64() * 1000.0);
        }
    }
    samples.sort_by(f64::total_cmp);
    let p50_ms = percentile(&samples, 50.0);
    Ok(RouteFigures {
        route: route.label.clone(),
        p50_ms,
        p99_ms: percentile(&samples, 99.0),
        max_ms: samples.last().copied().unwrap_or(0.0),
        p50_under_target: p50_ms < TARGET_P50_MS,
        failures,
    })
}

/// The figures as a table.
pub fn table(r: &PagesResults) -> String {
    let mut out = format!(
        "{} items in {} batches ({} invitations, {} attempts, {} audit entries); {} requests per route\n",
        r.data.items,
        r.data.batches,
        r.data.invitations,
        r.data.attempts,
        r.data.audit_entries,
        r.requests_per_route
    );
    out.push_str(&format!(
        "| {:<48} | {:>8} | {:>8} | {:<9} |\n|{}|{}|{}|{}|\n",
        "route",
        "p50 ms",
        "p99 ms",
        "p50 < 100",
        "-".repeat(50),
        "-".repeat(10),
        "-".repeat(10),
        "-".repeat(11)
    ));
    for f in &r.routes {
        out.push_str(&format!(
            "| {:<48} | {:>8.2} | {:>8.2} | {:<9} |\n",
            f.route,
            f.p50_ms,
            f.p99_ms,
            if f.failures > 0 {
                "FAILED"
            } else if f.p50_under_target {
                "yes"
            } else {
                "NO"
            }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_csrf_field_is_read_whatever_the_attribute_order() {
        let html = r#"<form id="login"><input name="name"><input type="hidden" value="abc123" name="csrf"></form>"#;
        assert_eq!(hidden_value(html, "csrf").as_deref(), Some("abc123"));
        let html = r#"<input type="hidden" name="csrf" value="x-y"/>"#;
        assert_eq!(hidden_value(html, "csrf").as_deref(), Some("x-y"));
        assert_eq!(
            hidden_value("<input name=\"other\" value=\"1\">", "csrf"),
            None
        );
    }

    #[test]
    fn a_cookie_is_found_among_several_set_cookie_headers() {
        let mut h = header::HeaderMap::new();
        h.append(
            header::SET_COOKIE,
            "iw_login=; Max-Age=0; Path=/console".parse().unwrap(),
        );
        h.append(
            header::SET_COOKIE,
            "iw_session=tok; HttpOnly; Path=/console".parse().unwrap(),
        );
        assert_eq!(cookie(&h, "iw_session").as_deref(), Some("tok"));
        assert_eq!(cookie(&h, "iw_login").as_deref(), Some(""));
        assert_eq!(cookie(&h, "nope"), None);
    }
}
