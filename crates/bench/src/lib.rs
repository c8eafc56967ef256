//! `cargo bench --bench pipeline`: a reproducible benchmark of the whole pipeline against its
//! floor and its ceiling, on the configured PostgreSQL server.
//!
//! One run:
//! 1. creates a fresh database `invites_bench_<run>` and migrates it
//!    ([`app::migrate`]);
//! 2. starts an in-process SMTP server that accepts everything (bodies not kept);
//! 3. starts the service as a child process, the real binary with `serve`, in an empty
//!    temporary directory (so no `./worker.toml` applies), configured only through
//!    `INVITES_*` variables: the database, a free port, SMTP to the sink, an API key and
//!    `mail.rate_per_second` (`--rate-per-second`: the shipped 50/s would cap every
//!    figure); everything else is the shipped default;
//! 4. measures through the real HTTP API: enqueue latency (sequential posts), time to
//!    a full batch on an idle service, sustained throughput from concurrent clients
//!    (with the service's peak RSS, CPU split and sampled database sessions), and checks
//!    every tally and the SMTP count exactly;
//! 5. stops the service, then measures the floor on the same server, each in a fresh
//!    database: apalis-postgres with a no-op handler (its defaults, and the service's
//!    worker settings), a raw `FOR UPDATE SKIP LOCKED` claim loop and one commit;
//! 6. prints a table, writes the same figures as JSON (`--json`), and drops every
//!    database it created, also after an error or Ctrl-C.
//!
//! Every wait has a deadline (`--phase-timeout-secs`); the child is killed on every
//! exit path (its guard's `Drop`), except when this process is killed with SIGKILL.

mod floor;
pub mod pages;
mod pipeline;
mod report;
mod service;
mod third_party;
mod webhook_sink;

use std::{
    io::Write,
    path::PathBuf,
    str::FromStr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, anyhow, bail};
use sqlx::{
    ConnectOptions, Connection,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tokio::time::Instant;

use self::{
    floor::Setup,
    pipeline::Api,
    report::{Floor, Machine, Ratios, Results, ServiceSetup, ThirdParty},
    service::Service,
};
use invite_worker::{
    app,
    config::{Secret, Settings},
};
use smtp_testkit::SmtpServer;

/// The benchmark's flags. The service under test runs as a child process with the
/// shipped defaults; only the database, bind address, SMTP port, API key and
/// `mail.rate_per_second` are set (plus any `--service-env`).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "pipeline",
    about = "Benchmark the whole pipeline (HTTP → queue → SMTP) against apalis' and raw SQL's floor, in a fresh database that is dropped afterwards"
)]
pub struct BenchArgs {
    /// `mail.rate_per_second` for the service under test (its default of 50/s would cap
    /// every figure at 50 invites/s).
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub rate_per_second: u32,

    /// Where to write the figures as JSON.
    #[arg(long, value_name = "PATH", default_value = "bench-results.json")]
    pub json: PathBuf,

    /// Smaller counts for a smoke run (well under a minute): 20 enqueue posts, 3
    /// full-batch samples, 2,000 sustained invites, 2,000 floor tasks.
    #[arg(long)]
    pub quick: bool,

    /// Extra setting for the service under test (and the "service settings" floor),
    /// e.g. `--service-env INVITES_WORKER__CONCURRENCY=32`. Repeatable; keys must start
    /// with INVITES_.
    #[arg(long = "service-env", value_name = "KEY=VALUE")]
    pub service_env: Vec<String>,

    /// Webhooks on: a receiver in the bench is registered for `item.failed` and
    /// `batch.completed` (with `webhooks.allow_private_targets`, as it listens on
    /// loopback), and the run checks that every batch's `batch.completed` arrived.
    /// Compare the sustained figure with a run without it.
    #[arg(long)]
    pub webhooks: bool,

    /// Deadline for each wait (service start, a phase draining, a floor run).
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub phase_timeout_secs: u64,

    /// The service binary to measure (default: the one `cargo bench` built).
    #[arg(long, value_name = "PATH")]
    pub service_bin: Option<PathBuf>,

    /// Set by `cargo bench`; without it (`cargo test --all-targets` runs bench targets
    /// too) nothing is measured.
    #[arg(long, hide = true)]
    pub bench: bool,
}

/// How much work each measurement does.
#[derive(Debug, Clone, Copy)]
struct Counts {
    enqueue_posts: usize,
    batch_size: usize,
    full_batch_samples: usize,
    sustained_batches: usize,
    clients: usize,
    floor_tasks: usize,
    commits: usize,
}

impl Counts {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                enqueue_posts: 20,
                batch_size: 100,
                full_batch_samples: 3,
                sustained_batches: 20,
                clients: 8,
                floor_tasks: 2_000,
                commits: 100,
            }
        } else {
            Self {
                enqueue_posts: 200,
                batch_size: 100,
                full_batch_samples: 10,
                sustained_batches: 200,
                clients: 8,
                floor_tasks: 20_000,
                commits: 500,
            }
        }
    }
}

/// Keys the bench sets itself; `--service-env` may not change them.
const RESERVED: [&str; 8] = [
    "INVITES_DATABASE__",
    "INVITES_HTTP__",
    "INVITES_API__",
    "INVITES_SMTP__HOST",
    "INVITES_SMTP__PORT",
    "INVITES_SMTP__TLS",
    "INVITES_MAIL__TRANSPORT",
    "INVITES_MAIL__RATE_PER_SECOND",
];

/// Runs the benchmark against the service binary `exe`, on the PostgreSQL server of
/// `settings.database.url` (the invite-worker settings of the current directory).
pub async fn run(settings: Settings, args: BenchArgs, exe: PathBuf) -> anyhow::Result<()> {
    let started = Instant::now();
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let scratch = Arc::new(Scratch::new(settings.database.url.expose())?);
    // Named so that nothing matching "invite-worker" by name (another engineer's
    // `pkill -f 'invite-worker serve'`) takes the service under test down mid-run.
    let dir = std::env::temp_dir().join(format!("iw-bench-{run_id}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    let mut results = supervise(
        measure(
            settings,
            args.clone(),
            exe,
            scratch.clone(),
            dir.clone(),
            run_id,
        ),
        &scratch,
        &dir,
    )
    .await?;
    results.wall_secs = started.elapsed().as_secs_f64();

    println!();
    print!("{}", report::table(&results));
    print!("{}", report::sessions(&results.sustained.db_sessions));
    print!("{}", report::tables(&results.sustained.tables));
    print!("{}", report::phase_table("3", &results.sustained.phases));
    println!("{}", report::cpu("3", &results.sustained.cpu));
    let third = &results.third_party.sustained;
    print!("{}", report::phase_table("3b", &third.phases));
    println!("{}", report::cpu("3b", &third.cpu));
    println!(
        "run took {:.0} s; service: {} WARN / {} ERROR log lines",
        results.wall_secs, results.service.log_warnings, results.service.log_errors
    );
    let json = serde_json::to_string_pretty(&results)?;
    std::fs::write(&args.json, json + "\n")
        .with_context(|| format!("writing {}", args.json.display()))?;
    println!("figures written to {}", args.json.display());
    if !results.ok {
        for p in &results.problems {
            eprintln!("problem: {p}");
        }
        bail!("{} check(s) failed", results.problems.len());
    }
    Ok(())
}

/// Runs a benchmark's `measurement` in a task of its own, stopped by SIGINT or SIGTERM
/// (dropping it kills the service under test, its guard), then drops every scratch
/// database whatever happened, and removes `dir` after a success (after a failure the
/// service's log in it is kept, and said so).
pub(crate) async fn supervise<T: Send + 'static>(
    measurement: impl std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
    scratch: &Scratch,
    dir: &std::path::Path,
) -> anyhow::Result<T> {
    let mut task = tokio::spawn(measurement);
    let outcome = tokio::select! {
        joined = &mut task => joined.unwrap_or_else(|e| Err(anyhow!("the benchmark failed: {e}"))),
        signal = interrupted() => {
            task.abort();
            let _ = task.await;
            Err(anyhow!("interrupted by {signal}"))
        }
    };
    for (name, result) in scratch.drop_all().await {
        match result {
            Ok(()) => println!("  dropped   database {name}"),
            Err(e) => eprintln!("warning: could not drop database {name}: {e:#}"),
        }
    }
    match outcome {
        Ok(results) => {
            let _ = std::fs::remove_dir_all(dir);
            Ok(results)
        }
        Err(e) => {
            let log = dir.join("service.log");
            if log.exists() {
                eprintln!("the service's log is kept at {}", log.display());
            }
            Err(e)
        }
    }
}

/// Resolves on SIGINT or SIGTERM, so that either still cleans up.
async fn interrupted() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            return tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            };
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    "SIGINT"
}

/// `e`, with the service's exit status and the end of its log when it has died.
fn with_service_exit(svc: &mut Service, e: anyhow::Error) -> anyhow::Error {
    match svc.check_alive() {
        Ok(()) => e,
        Err(dead) => e.context(format!("{dead:#}")),
    }
}

/// Prints one line of progress at once (stdout may be a pipe).
fn progress(line: impl AsRef<str>) {
    println!("{}", line.as_ref());
    let _ = std::io::stdout().flush();
}

async fn measure(
    settings: Settings,
    args: BenchArgs,
    exe: PathBuf,
    scratch: Arc<Scratch>,
    dir: PathBuf,
    run_id: String,
) -> anyhow::Result<Results> {
    let counts = Counts::new(args.quick);
    let timeout = Duration::from_secs(args.phase_timeout_secs);
    let started_at = chrono::Utc::now().to_rfc3339();
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());

    progress(format!(
        "invite-worker bench{} — run {run_id}",
        if args.quick { " --quick" } else { "" }
    ));
    progress(format!("  machine   {cpus} CPUs, load average {load}"));

    // 1. A fresh database, migrated by the service's own code.
    let main_db = format!("invites_bench_{run_id}");
    let url = scratch.create(&main_db).await?;
    let mut service_settings = settings.clone();
    service_settings.database.url = Secret::new(url.clone());
    app::migrate(&service_settings).await?;
    progress(format!("  database  {main_db} (created, migrated)"));
    let bench_pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(PgConnectOptions::from_str(&url)?.application_name("invite-worker-bench"))
        .await?;
    let postgres: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&bench_pool)
        .await?;
    let synchronous_commit: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&bench_pool)
        .await?;
    progress(format!(
        "  postgres  {postgres}, synchronous_commit = {synchronous_commit}"
    ));

    // 2. The SMTP sink.
    let smtp = SmtpServer::start()
        .await
        .context("starting the SMTP sink")?;
    smtp.set_store_bodies(false);

    // 3. The service, configured through its environment only.
    // Strong values: the service refuses shipped or short ones.
    let key = invite_worker::config::generate_secret();
    let port = service::free_port()?;
    let mut env: Vec<(String, String)> = vec![
        ("INVITES_DATABASE__URL".into(), url.clone()),
        ("INVITES_HTTP__BIND".into(), format!("127.0.0.1:{port}")),
        ("INVITES_MAIL__TRANSPORT".into(), "smtp".into()),
        ("INVITES_SMTP__PORT".into(), smtp.port().to_string()),
        ("INVITES_API__KEYS".into(), key.clone()),
        (
            "INVITES_INVITE__TOKEN_SECRET".into(),
            invite_worker::config::generate_secret(),
        ),
        (
            "INVITES_MAIL__RATE_PER_SECOND".into(),
            args.rate_per_second.to_string(),
        ),
    ];
    for extra in &args.service_env {
        let (k, v) = extra
            .split_once('=')
            .ok_or_else(|| anyhow!("--service-env {extra:?}: expected KEY=VALUE"))?;
        if !k.starts_with("INVITES_") {
            bail!("--service-env {k}: only INVITES_* settings can be passed");
        }
        if RESERVED.iter().any(|r| k.starts_with(r)) {
            bail!("--service-env {k}: the bench sets this itself");
        }
        env.push((k.to_owned(), v.to_owned()));
    }
    if args.webhooks {
        env.push((
            "INVITES_WEBHOOKS__ALLOW_PRIVATE_TARGETS".into(),
            "true".into(),
        ));
    }
    // Exactly what the child will load: the shipped defaults plus this environment.
    let child = Settings::load_from(&dir.join("worker.toml"), false, env.clone())
        .map_err(|e| anyhow!("the service's settings: {e}"))?;
    progress(format!(
        "  service   {} serve (pid below), mail.rate_per_second = {} — set by the bench; the shipped default (50/s) would cap every figure",
        exe.display(),
        child.mail.rate_per_second
    ));
    progress(format!(
        "            worker.concurrency = {}, database.max_connections = {}, worker.poll_interval_ms = {} (shipped defaults{})",
        child.worker.concurrency,
        child.database.max_connections,
        child.worker.poll_interval_ms,
        if args.service_env.is_empty() {
            String::new()
        } else {
            format!(" + {}", args.service_env.join(" "))
        }
    ));
    let mut svc = Service::spawn(&exe, &dir, &env, port)?;
    let ready_in = svc
        .wait_ready(&pipeline::client()?, timeout.min(Duration::from_secs(60)))
        .await?;
    progress(format!(
        "            pid {}, ready in {} ms at {}; SMTP sink on port {}",
        svc.pid,
        ready_in.as_millis(),
        svc.base,
        smtp.port()
    ));
    let api = Api::new(&svc.base, &key)?;
    let sink = if args.webhooks {
        let sink = webhook_sink::Sink::start().await?;
        sink.register(&svc.base, &key).await?;
        progress(format!(
            "            webhooks on: item.failed and batch.completed to {}",
            sink.url
        ));
        Some(sink)
    } else {
        None
    };
    // One job opening per measurement, so the duplicate checks of one measurement do
    // not search the invitations of another (candidate ids are fresh in every batch).
    let jobs: Vec<String> = ["enqueue", "full", "sustained"]
        .iter()
        .map(|m| format!("bench-{run_id}-{m}"))
        .collect();
    for job in &jobs {
        api.put_job(job).await?;
    }
    let mut problems = Vec::new();

    // 4. The pipeline.
    let c = counts;
    progress(format!(
        "[1/4] enqueue latency: {} sequential POST /v1/batches of {} …",
        c.enqueue_posts, c.batch_size
    ));
    let (enqueue, p) = pipeline::enqueue(
        &api,
        &smtp,
        &mut svc,
        &jobs[0],
        &run_id,
        c.enqueue_posts,
        c.batch_size,
        timeout,
    )
    .await
    .map_err(|e| with_service_exit(&mut svc, e))?;
    problems.extend(p);
    progress(format!(
        "      p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; all {} batches completed after {:.1} s",
        enqueue.p50_ms, enqueue.p99_ms, enqueue.max_ms, enqueue.posts, enqueue.drain_secs
    ));

    progress(format!(
        "[2/4] time to a full batch: {} × one batch of {} on an idle service …",
        c.full_batch_samples, c.batch_size
    ));
    let (full_batch, p) = pipeline::full_batch(
        &api,
        &smtp,
        &jobs[1],
        &run_id,
        c.full_batch_samples,
        c.batch_size,
        timeout,
    )
    .await
    .map_err(|e| with_service_exit(&mut svc, e))?;
    problems.extend(p);
    progress(format!(
        "      median {:.0} ms (samples: {})",
        full_batch.median_ms,
        full_batch
            .samples_ms
            .iter()
            .map(|s| format!("{s:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));

    progress(format!(
        "[3/4] sustained: {} invites = {} batches from {} concurrent clients …",
        c.sustained_batches * c.batch_size,
        c.sustained_batches,
        c.clients
    ));
    let (sustained, p) = pipeline::sustained(
        &api,
        &smtp,
        &mut svc,
        &bench_pool,
        &main_db,
        &jobs[2],
        &run_id,
        c.sustained_batches,
        c.batch_size,
        c.clients,
        timeout,
    )
    .await
    .map_err(|e| with_service_exit(&mut svc, e))?;
    problems.extend(p);
    progress(format!(
        "      {:.0} invites/s over {:.1} s, peak RSS {:.1} MB, tallies {}",
        sustained.invites_per_sec,
        sustained.secs,
        sustained.peak_rss_mb,
        if sustained.verified { "OK" } else { "FAILED" }
    ));

    if let Some(sink) = &sink {
        let batches = u64::try_from(c.enqueue_posts + c.full_batch_samples + c.sustained_batches)
            .unwrap_or(u64::MAX);
        let deadline = Instant::now() + timeout;
        while sink.count("batch.completed") < batches && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let got = sink.count("batch.completed");
        progress(format!(
            "      webhooks: {got} of {batches} batch.completed received, {} item.failed",
            sink.count("item.failed")
        ));
        if got != batches {
            problems.push(format!(
                "webhooks: {got} batch.completed received for {batches} batches"
            ));
        }
    }
    svc.kill();
    let (mut log_warnings, mut log_errors) = service::log_levels(&svc.log);
    drop(smtp);

    // 3b. The same sustained run against a third-party server, and its capacity alone.
    let server_version = third_party::ensure_installed()?;
    let aiosmtpd = third_party::Aiosmtpd::start().await?;
    let alone_messages = c.sustained_batches * c.batch_size / 2;
    let alone_connections = child.worker.concurrency;
    progress(format!(
        "[3b] aiosmtpd {server_version} alone: {alone_messages} messages over {alone_connections} connections …"
    ));
    let alone_per_sec =
        third_party::capacity_alone(&aiosmtpd, alone_messages, alone_connections).await?;
    progress(format!("      {alone_per_sec:.0} messages/s"));
    // A fresh server for the service, so its count starts at zero.
    drop(aiosmtpd);
    let aiosmtpd = third_party::Aiosmtpd::start().await?;
    let third_env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| match k.as_str() {
            "INVITES_SMTP__PORT" => (k.clone(), aiosmtpd.port.to_string()),
            _ => (k.clone(), v.clone()),
        })
        .collect();
    let mut svc = Service::spawn(&exe, &dir, &third_env, port)?;
    svc.wait_ready(&pipeline::client()?, timeout.min(Duration::from_secs(60)))
        .await?;
    let third_job = format!("bench-{run_id}-third-party");
    api.put_job(&third_job).await?;
    progress(format!(
        "[3b] sustained against aiosmtpd: {} invites = {} batches from {} concurrent clients …",
        c.sustained_batches * c.batch_size,
        c.sustained_batches,
        c.clients
    ));
    let (third_sustained, p) = pipeline::sustained(
        &api,
        &aiosmtpd,
        &mut svc,
        &bench_pool,
        &main_db,
        &third_job,
        &format!("{run_id}-t"),
        c.sustained_batches,
        c.batch_size,
        c.clients,
        timeout,
    )
    .await
    .map_err(|e| with_service_exit(&mut svc, e))?;
    problems.extend(p);
    let ratio = report::ratio(third_sustained.invites_per_sec, alone_per_sec);
    progress(format!(
        "      {:.0} invites/s ({ratio:.2} × the server alone), tallies {}",
        third_sustained.invites_per_sec,
        if third_sustained.verified {
            "OK"
        } else {
            "FAILED"
        }
    ));
    svc.kill();
    let (warnings, errors) = service::log_levels(&svc.log);
    (log_warnings, log_errors) = (log_warnings + warnings, log_errors + errors);
    drop(aiosmtpd);
    let third_party = ThirdParty {
        server: format!("aiosmtpd {server_version}"),
        alone_per_sec,
        alone_messages,
        alone_connections,
        sustained: third_sustained,
        ratio,
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), bench_pool.close()).await;

    // 5. The floor, each in a fresh database, with the service stopped.
    progress(format!(
        "[4/4] floor: apalis no-op × {} (defaults, service settings), raw SQL × {}, {} commits …",
        c.floor_tasks, c.floor_tasks, c.commits
    ));
    let fa = scratch.create(&format!("{main_db}_fa")).await?;
    let apalis_default =
        floor::apalis(Setup::Defaults, &fa, &child, c.floor_tasks, timeout).await?;
    progress(format!(
        "      apalis defaults:         {:.0} tasks/s",
        apalis_default.tasks_per_sec
    ));
    let fb = scratch.create(&format!("{main_db}_fb")).await?;
    let apalis_service = floor::apalis(Setup::Service, &fb, &child, c.floor_tasks, timeout).await?;
    progress(format!(
        "      apalis service settings: {:.0} tasks/s",
        apalis_service.tasks_per_sec
    ));
    let fr = scratch.create(&format!("{main_db}_raw")).await?;
    // As many connections as the service's pool holds: the most sessions it can use.
    let conns = usize::try_from(child.database.max_connections).unwrap_or(usize::MAX);
    let raw_sql = floor::raw_sql(
        &fr,
        "bench_raw",
        c.floor_tasks,
        conns,
        child.worker.concurrency,
        timeout,
    )
    .await?;
    progress(format!(
        "      raw SQL, {} per claim:   {:.0} rows/s",
        raw_sql.claim, raw_sql.rows_per_sec
    ));
    let raw_sql_single =
        floor::raw_sql(&fr, "bench_raw_single", c.floor_tasks, conns, 1, timeout).await?;
    progress(format!(
        "      raw SQL, 1 per claim:    {:.0} rows/s",
        raw_sql_single.rows_per_sec
    ));
    let commit = floor::commit_latency(&fr, c.commits).await?;
    progress(format!(
        "      one commit:              p50 {:.2} ms",
        commit.p50_ms
    ));

    let ips = sustained.invites_per_sec;
    let ratios = Ratios {
        service_vs_apalis_default: report::ratio(ips, apalis_default.tasks_per_sec),
        service_vs_apalis_service: report::ratio(ips, apalis_service.tasks_per_sec),
        service_vs_raw_sql: report::ratio(ips, raw_sql.rows_per_sec),
        service_vs_raw_sql_single: report::ratio(ips, raw_sql_single.rows_per_sec),
    };
    Ok(Results {
        tool: "invite-worker bench".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        started_at,
        quick: args.quick,
        wall_secs: 0.0,
        machine: Machine {
            cpus,
            postgres,
            synchronous_commit,
            load_average_at_start: load,
        },
        service: ServiceSetup {
            binary: exe.display().to_string(),
            env: env
                .iter()
                .map(|(k, v)| {
                    if k == "INVITES_API__KEYS" || k == "INVITES_INVITE__TOKEN_SECRET" {
                        format!("{k}=***")
                    } else {
                        format!("{k}={v}")
                    }
                })
                .collect(),
            rate_per_second: child.mail.rate_per_second,
            worker_concurrency: child.worker.concurrency,
            pool_max_connections: child.database.max_connections,
            poll_interval_ms: child.worker.poll_interval_ms,
            heartbeat_secs: child.worker.heartbeat_secs,
            log_warnings,
            log_errors,
        },
        enqueue,
        full_batch,
        sustained,
        third_party,
        floor: Floor {
            apalis_default,
            apalis_service,
            raw_sql,
            raw_sql_single,
            commit,
        },
        ratios,
        ok: problems.is_empty(),
        problems,
    })
}

/// The databases a run creates on the server, so they can all be dropped at the end.
struct Scratch {
    admin: PgConnectOptions,
    base: reqwest::Url,
    created: Mutex<Vec<String>>,
}

impl Scratch {
    fn new(url: &str) -> anyhow::Result<Self> {
        let admin = PgConnectOptions::from_str(url)
            .context("database.url")?
            .database("postgres")
            .application_name("invite-worker-bench")
            // CREATE/DROP DATABASE wait for a checkpoint: slow, and expected to be.
            .disable_statement_logging();
        let base = reqwest::Url::parse(url).context("database.url")?;
        Ok(Self {
            admin,
            base,
            created: Mutex::new(Vec::new()),
        })
    }

    fn url_for(&self, name: &str) -> String {
        let mut url = self.base.clone();
        url.set_path(&format!("/{name}"));
        url.to_string()
    }

    /// Creates the database `name` (which must not exist) and returns its URL.
    async fn create(&self, name: &str) -> anyhow::Result<String> {
        let mut conn = self
            .admin
            .connect()
            .await
            .context("connecting to the server")?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE {}",
            quote(name)
        )))
        .execute(&mut conn)
        .await
        .with_context(|| format!("creating database {name}"))?;
        self.created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.to_owned());
        let _ = conn.close().await;
        Ok(self.url_for(name))
    }

    /// Drops every database created, newest first (`WITH (FORCE)`: sessions left behind
    /// by a failed run are ended).
    async fn drop_all(&self) -> Vec<(String, anyhow::Result<()>)> {
        let names: Vec<String> =
            std::mem::take(&mut *self.created.lock().unwrap_or_else(|e| e.into_inner()));
        let mut out = Vec::new();
        for name in names.into_iter().rev() {
            let result = async {
                let mut conn = self.admin.connect().await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    quote(&name)
                )))
                .execute(&mut conn)
                .await?;
                let _ = conn.close().await;
                Ok(())
            }
            .await;
            out.push((name, result));
        }
        out
    }
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_urls_keep_the_server_and_swap_the_database() {
        let s = Scratch::new("postgres://postgres@127.0.0.1:5432/invites?sslmode=disable")
            .expect("parses");
        assert_eq!(
            s.url_for("invites_bench_x"),
            "postgres://postgres@127.0.0.1:5432/invites_bench_x?sslmode=disable"
        );
    }

    #[test]
    fn quick_counts_are_small() {
        let q = Counts::new(true);
        assert!(q.sustained_batches * q.batch_size <= 2_000 && q.floor_tasks <= 2_000);
        let f = Counts::new(false);
        assert_eq!(f.sustained_batches * f.batch_size, 20_000);
        assert_eq!(f.enqueue_posts, 200);
    }
}
