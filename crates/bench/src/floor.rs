//! Measurement 4: the floor under the service on the same PostgreSQL server.
//!
//! - apalis-postgres with a handler that does nothing, once as apalis' examples set it
//!   up (defaults) and once as `queue::worker` sets it up for the service;
//! - a claim-and-complete loop in plain SQL (`FOR UPDATE SKIP LOCKED`);
//! - the latency of one commit, which paces anything serialised on one row.
//!
//! Each runs in a database of its own, created fresh for it.

use std::{
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail};
use apalis::prelude::*;
use apalis_postgres::{Config, PgTask, PostgresStorage, Pubsub};
use sqlx::{
    ConnectOptions, Connection, PgConnection, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use super::report::{self, Commit, QueueFloor, RawFloor};
use invite_worker::{
    config::{DatabaseSettings, Secret, Settings},
    queue::worker::RawPayload,
};

/// Which apalis worker set-up to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    /// `Config::default()` (batch_size 10), `.with_pubsub()`, no `.concurrency()`
    /// (unbounded), JSON codec, a default sqlx pool (10 connections).
    Defaults,
    /// What `queue::worker::run` builds from the service's settings: batch_size =
    /// `fetch_size(worker.concurrency)`, concurrency limit = `worker.concurrency`,
    /// pubsub + interval poll, raw payloads, heartbeat settings, a pool of
    /// `database.max_connections`; with apalis' own acks (the service finishes tasks
    /// in its outcome statement, and a no-op has no outcome to record).
    Service,
}

async fn noop_json(_n: u64, done: Data<Arc<AtomicUsize>>) -> Result<(), BoxDynError> {
    done.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

async fn noop_raw(_payload: Vec<u8>, done: Data<Arc<AtomicUsize>>) -> Result<(), BoxDynError> {
    done.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Stops a worker started by [`spawn_worker`] when cancelled.
fn stop_on(token: CancellationToken) -> impl FnMut(WorkerContext) -> StopFuture + Send + 'static {
    move |ctx| {
        let token = token.clone();
        Box::pin(async move {
            token.cancelled().await;
            ctx.stop()
        })
    }
}

type StopFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), WorkerError>> + Send>>;

fn spawn_worker(
    setup: Setup,
    pool: &PgPool,
    queue: &str,
    name: &str,
    settings: &Settings,
    done: Arc<AtomicUsize>,
    stop: CancellationToken,
) -> JoinHandle<Result<(), WorkerError>> {
    match setup {
        Setup::Defaults => {
            let backend = PostgresStorage::<u64>::new(pool)
                .with_config(Config::default().queue(queue))
                .with_pubsub();
            let worker = WorkerBuilder::new(name)
                .backend(backend)
                .data(done)
                .build(noop_json);
            tokio::spawn(worker.run_with_ctx(stop_on(stop)))
        }
        Setup::Service => {
            let w = &settings.worker;
            let missed =
                usize::try_from(w.recover_after_secs / w.heartbeat_secs).unwrap_or(usize::MAX);
            let config = Config::default()
                .queue(queue)
                .batch_size(invite_worker::queue::worker::fetch_size(w.concurrency))
                .heartbeat_interval(Duration::from_secs(w.heartbeat_secs))
                .missed_heartbeats(missed.max(2));
            let backend = PostgresStorage::<Vec<u8>>::new(pool)
                .with_config(config)
                .with_codec(RawPayload)
                .poll_with_strategy(
                    Strategy::new()
                        .stream(Pubsub::new(pool.clone(), queue.to_owned()))
                        .interval(Duration::from_millis(w.poll_interval_ms)),
                );
            let worker = WorkerBuilder::new(name)
                .backend(backend)
                .concurrency(w.concurrency)
                .data(done)
                .build(noop_raw);
            tokio::spawn(worker.run_with_ctx(stop_on(stop)))
        }
    }
}

/// 4a: `tasks` no-op tasks through apalis-postgres in the fresh database at `url`: the
/// worker is started and registered first, then every task is pushed with one
/// `push_tasks` INSERT; timed from the push until the last row is `Done`.
pub async fn apalis(
    setup: Setup,
    url: &str,
    settings: &Settings,
    tasks: usize,
    timeout: Duration,
) -> anyhow::Result<QueueFloor> {
    let pool = match setup {
        // As apalis' examples connect.
        Setup::Defaults => PgPool::connect(url).await?,
        Setup::Service => {
            invite_worker::db::connect(&DatabaseSettings {
                url: Secret::new(url),
                max_connections: settings.database.max_connections,
            })
            .await?
        }
    };
    PostgresStorage::setup(&pool).await?;
    // The bench's own connection: counting Done rows must not take the worker's.
    let mut monitor = PgConnectOptions::from_str(url)?
        .disable_statement_logging()
        .connect()
        .await?;

    let (queue, describe) = match setup {
        Setup::Defaults => (
            "bench::noop-defaults",
            "Config::default() (batch 10), with_pubsub, concurrency unbounded, 10-conn pool"
                .to_owned(),
        ),
        Setup::Service => {
            let w = &settings.worker;
            (
                "bench::noop-service",
                format!(
                    "batch {} + concurrency {}, pubsub + {} ms poll, {}-conn pool",
                    invite_worker::queue::worker::fetch_size(w.concurrency),
                    w.concurrency,
                    w.poll_interval_ms,
                    settings.database.max_connections
                ),
            )
        }
    };
    let name = format!("bench-floor-{:?}@{}", setup, std::process::id()).to_lowercase();
    let done = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let mut worker = spawn_worker(
        setup,
        &pool,
        queue,
        &name,
        settings,
        done.clone(),
        stop.clone(),
    );
    let deadline = Instant::now() + timeout;

    let outcome = async {
        // Registered, so its LISTEN is in place before the tasks arrive.
        loop {
            let registered: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM apalis.workers WHERE id = $1)")
                    .bind(&name)
                    .fetch_one(&mut monitor)
                    .await?;
            if registered {
                break;
            }
            if worker.is_finished() || Instant::now() > deadline {
                bail!("the {setup:?} floor worker did not register");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;

        let batch: Vec<PgTask> = (0..tasks)
            .map(|i| serde_json::to_vec(&(i as u64)).map(|p| TaskBuilder::new(p).build()))
            .collect::<Result<_, _>>()?;
        let started = Instant::now();
        apalis_postgres::queries::push_tasks(&mut monitor, queue, batch).await?;
        let push_ms = started.elapsed().as_secs_f64() * 1000.0;

        let target = i64::try_from(tasks).unwrap_or(i64::MAX);
        let finished = loop {
            let count: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM apalis.jobs WHERE job_type = $1 AND status = 'Done'",
            )
            .bind(queue)
            .fetch_one(&mut monitor)
            .await?;
            let now = Instant::now();
            if count >= target {
                break now;
            }
            if worker.is_finished() {
                bail!("the {setup:?} floor worker stopped with {count} of {tasks} tasks done");
            }
            if now > deadline {
                bail!("the {setup:?} floor: {count} of {tasks} tasks done before the deadline");
            }
            // Coarse while the handler is far from done, fine near the end; this keeps
            // the counting query from competing with the worker.
            let pace = if done.load(Ordering::Relaxed) >= tasks {
                5
            } else {
                100
            };
            tokio::time::sleep(Duration::from_millis(pace)).await;
        };
        let secs = finished.duration_since(started).as_secs_f64();
        Ok(QueueFloor {
            setup: describe,
            tasks,
            push_ms,
            secs,
            tasks_per_sec: report::ratio(tasks as f64, secs),
        })
    }
    .await;

    stop.cancel();
    if tokio::time::timeout(Duration::from_secs(10), &mut worker)
        .await
        .is_err()
    {
        worker.abort();
    }
    let _ = monitor.close().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), pool.close()).await;
    outcome
}

/// 4b: `rows` rows of a plain table claimed `claim` at a time by `connections`
/// connections in a loop: `UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED
/// LIMIT claim) RETURNING id`, then one `UPDATE … SET status = 'done'` for them; each
/// statement its own transaction (as apalis fetches and acks). Rows inserted first.
pub async fn raw_sql(
    url: &str,
    table: &str,
    rows: usize,
    connections: usize,
    claim: usize,
    timeout: Duration,
) -> anyhow::Result<RawFloor> {
    let pool = PgPoolOptions::new()
        .max_connections(u32::try_from(connections).unwrap_or(u32::MAX))
        .connect_with(PgConnectOptions::from_str(url)?)
        .await?;
    let ddl = format!(
        "CREATE TABLE {table} (
            id bigint PRIMARY KEY, status text NOT NULL DEFAULT 'pending',
            lock_by text, lock_at timestamptz, done_at timestamptz, payload bytea NOT NULL);
         CREATE INDEX ON {table} (id) WHERE status = 'pending';"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(ddl))
        .execute(&pool)
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {table} (id, payload)
         SELECT g, convert_to('{{\"item_id\":\"' || gen_random_uuid() || '\"}}', 'UTF8')
         FROM generate_series(1, $1) g"
    )))
    .bind(i64::try_from(rows).unwrap_or(i64::MAX))
    .execute(&pool)
    .await?;
    let claim_sql = format!(
        "UPDATE {table} SET status = 'running', lock_by = $1, lock_at = now()
         WHERE id IN (SELECT id FROM {table} WHERE status = 'pending'
                      ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
         RETURNING id"
    );
    let done_sql =
        format!("UPDATE {table} SET status = 'done', done_at = now() WHERE id = ANY($1)");
    let claim_i64 = i64::try_from(claim).unwrap_or(i64::MAX);

    // Every connection open before the clock starts.
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        conns.push(pool.acquire().await?);
    }
    let deadline = Instant::now() + timeout;
    let started = Instant::now();
    let mut loops = tokio::task::JoinSet::new();
    for (i, mut conn) in conns.into_iter().enumerate() {
        let (claim_sql, done_sql) = (claim_sql.clone(), done_sql.clone());
        loops.spawn(async move {
            let me = format!("raw-{i}");
            let mut handled = 0usize;
            loop {
                let ids: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(claim_sql.as_str()))
                    .bind(&me)
                    .bind(claim_i64)
                    .fetch_all(&mut *conn)
                    .await?;
                if ids.is_empty() {
                    return Ok::<usize, anyhow::Error>(handled);
                }
                sqlx::query(sqlx::AssertSqlSafe(done_sql.as_str()))
                    .bind(&ids)
                    .execute(&mut *conn)
                    .await?;
                handled += ids.len();
                if Instant::now() > deadline {
                    bail!("the raw SQL floor did not finish before the deadline");
                }
            }
        });
    }
    let mut handled = 0;
    while let Some(joined) = loops.join_next().await {
        handled += joined.context("a raw SQL loop panicked")??;
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = tokio::time::timeout(Duration::from_secs(5), pool.close()).await;
    if handled != rows {
        bail!("the raw SQL floor handled {handled} of {rows} rows");
    }
    Ok(RawFloor {
        setup: format!(
            "{connections} connections, {claim} row{} per claim, claim + complete = 2 commits",
            if claim == 1 { "" } else { "s" }
        ),
        rows,
        connections,
        claim,
        secs,
        rows_per_sec: report::ratio(rows as f64, secs),
    })
}

/// The latency of `commits` serial single-row UPDATE commits of one row on one
/// connection (each its own transaction).
pub async fn commit_latency(url: &str, commits: usize) -> anyhow::Result<Commit> {
    let mut conn = PgConnection::connect(url).await?;
    sqlx::raw_sql(
        "CREATE TABLE bench_one (id int PRIMARY KEY, n bigint NOT NULL);
         INSERT INTO bench_one VALUES (1, 0);",
    )
    .execute(&mut conn)
    .await?;
    let mut times = Vec::with_capacity(commits);
    for _ in 0..commits {
        let t = Instant::now();
        sqlx::query("UPDATE bench_one SET n = n + 1 WHERE id = 1")
            .execute(&mut conn)
            .await?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let _ = conn.close().await;
    let mean = report::mean(&times);
    let sorted = report::sorted(times);
    Ok(Commit {
        commits,
        p50_ms: report::percentile(&sorted, 50.0),
        p99_ms: report::percentile(&sorted, 99.0),
        per_sec: report::ratio(1000.0, mean),
    })
}
