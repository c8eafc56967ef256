//! Measurements 1–3: the whole pipeline, driven through the real HTTP API, counted at
//! the real SMTP server.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::{task::JoinSet, time::Instant};

use super::{
    report::{self, Cpu, Enqueue, FullBatch, Sessions, Sustained, TableScans},
    service::{self, Service},
};
use smtp_testkit::SmtpServer;

/// A mail server whose accepted messages the bench can count: our test sink, or a
/// third-party server (`third_party::Aiosmtpd`).
pub trait AcceptedCount: Sync {
    fn accepted_count(&self) -> usize;
}

impl AcceptedCount for SmtpServer {
    fn accepted_count(&self) -> usize {
        SmtpServer::accepted_count(self)
    }
}

/// The HTTP API of the service under test.
#[derive(Clone)]
pub struct Api {
    client: reqwest::Client,
    base: String,
    key: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BatchDoc {
    pub id: String,
    pub status: String,
    pub total: i64,
    pub counts: CountsDoc,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct CountsDoc {
    pub pending: i64,
    pub sent: i64,
    pub failed: i64,
    pub skipped: i64,
}

impl Api {
    pub fn new(base: &str, key: &str) -> anyhow::Result<Self> {
        Ok(Self {
            client: client()?,
            base: base.to_owned(),
            key: key.to_owned(),
        })
    }

    /// The same API through another client (its own connection pool), as another
    /// web-app process would be.
    pub fn another_client(&self) -> anyhow::Result<Self> {
        Self::new(&self.base, &self.key)
    }

    /// The service's `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let response = self
            .client
            .get(format!("{}/metrics", self.base))
            .send()
            .await?
            .error_for_status()?;
        Ok(response.text().await?)
    }

    pub async fn put_job(&self, job_id: &str) -> anyhow::Result<()> {
        let r = self
            .client
            .put(format!("{}/v1/jobs/{job_id}", self.base))
            .bearer_auth(&self.key)
            .json(&json!({"title": "Benchmark Engineer", "status": "open"}))
            .send()
            .await?;
        if !r.status().is_success() {
            let status = r.status();
            bail!("PUT /v1/jobs/{job_id}: {status}: {}", r.text().await?);
        }
        Ok(())
    }

    /// Posts a batch; returns its id and when the 202 arrived (before the body is read).
    pub async fn post_batch(&self, body: &Value) -> anyhow::Result<(String, Instant)> {
        let r = self
            .client
            .post(format!("{}/v1/batches", self.base))
            .bearer_auth(&self.key)
            .json(body)
            .send()
            .await
            .context("POST /v1/batches")?;
        let at = Instant::now();
        if r.status() != reqwest::StatusCode::ACCEPTED {
            let status = r.status();
            bail!("POST /v1/batches: {status}: {}", r.text().await?);
        }
        let doc: BatchDoc = r.json().await.context("POST /v1/batches: body")?;
        Ok((doc.id, at))
    }

    pub async fn get_batch(&self, id: &str) -> anyhow::Result<BatchDoc> {
        let r = self
            .client
            .get(format!("{}/v1/batches/{id}", self.base))
            .bearer_auth(&self.key)
            .send()
            .await
            .with_context(|| format!("GET /v1/batches/{id}"))?;
        if !r.status().is_success() {
            let status = r.status();
            bail!("GET /v1/batches/{id}: {status}: {}", r.text().await?);
        }
        r.json()
            .await
            .with_context(|| format!("GET /v1/batches/{id}: body"))
    }
}

pub fn client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// A batch request of `size` fresh candidates (ids and addresses unique to `tag`), all
/// with valid addresses, so every item should end `sent`.
pub fn batch_body(job_id: &str, tag: &str, size: usize) -> Value {
    let candidates: Vec<Value> = (0..size)
        .map(|i| {
            json!({
                "id": format!("{tag}-c{i:03}"),
                "email": format!("{tag}.c{i:03}@example.com"),
                "name": format!("Candidate {i}"),
            })
        })
        .collect();
    json!({
        "job_id": job_id, "duration_minutes": 30,
        "candidates": candidates, "expected_count": size,
    })
}

/// Waits until the SMTP server accepted at least `target` messages in all.
pub async fn wait_accepted(
    smtp: &dyn AcceptedCount,
    service: &mut Service,
    target: usize,
    deadline: Instant,
) -> anyhow::Result<Instant> {
    let mut checked = Instant::now();
    loop {
        if smtp.accepted_count() >= target {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {target} messages reached the SMTP server before the deadline",
                smtp.accepted_count()
            );
        }
        if checked.elapsed() > Duration::from_millis(500) {
            service.check_alive()?;
            checked = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Polls each batch until it is `completed` (or the deadline passes), then checks its
/// tally: `completed`, `size` total, all sent. Returns the problems found.
pub async fn verify_batches(
    api: &Api,
    ids: &[String],
    size: usize,
    deadline: Instant,
) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    let size = i64::try_from(size).unwrap_or(i64::MAX);
    for id in ids {
        let doc = loop {
            let doc = api.get_batch(id).await?;
            if doc.status == "completed" || Instant::now() > deadline {
                break doc;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let c = doc.counts;
        let exact = doc.status == "completed"
            && doc.total == size
            && c.sent == size
            && c.pending == 0
            && c.failed == 0
            && c.skipped == 0;
        if !exact {
            problems.push(format!(
                "batch {}: {} total {} pending {} sent {} failed {} skipped {}",
                doc.id, doc.status, doc.total, c.pending, c.sent, c.failed, c.skipped
            ));
        }
    }
    Ok(problems)
}

/// Checks that no more than `expected` messages reached the SMTP server in all.
fn check_exact(smtp: &dyn AcceptedCount, expected: usize, problems: &mut Vec<String>) {
    let got = smtp.accepted_count();
    if got != expected {
        problems.push(format!(
            "the SMTP server accepted {got} messages in all; expected exactly {expected}"
        ));
    }
}

/// Measurement 1: `posts` sequential `POST /v1/batches` of `size` candidates, then the
/// wait until all of them are completed. Returns the figures and the problems found.
#[allow(clippy::too_many_arguments)]
pub async fn enqueue(
    api: &Api,
    smtp: &dyn AcceptedCount,
    service: &mut Service,
    job_id: &str,
    run: &str,
    posts: usize,
    size: usize,
    timeout: Duration,
) -> anyhow::Result<(Enqueue, Vec<String>)> {
    let baseline = smtp.accepted_count();
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(posts);
    let mut ids = Vec::with_capacity(posts);
    for i in 0..posts {
        let body = batch_body(job_id, &format!("{run}-e{i:04}"), size);
        let t = Instant::now();
        let (id, at) = api.post_batch(&body).await?;
        latencies.push(at.duration_since(t).as_secs_f64() * 1000.0);
        ids.push(id);
    }
    let deadline = started + timeout;
    wait_accepted(smtp, service, baseline + posts * size, deadline).await?;
    let mut problems = verify_batches(api, &ids, size, deadline).await?;
    let drain_secs = started.elapsed().as_secs_f64();
    check_exact(smtp, baseline + posts * size, &mut problems);
    let mean_ms = report::mean(&latencies);
    let sorted = report::sorted(latencies);
    Ok((
        Enqueue {
            posts,
            candidates_per_post: size,
            p50_ms: report::percentile(&sorted, 50.0),
            p99_ms: report::percentile(&sorted, 99.0),
            max_ms: report::percentile(&sorted, 100.0),
            mean_ms,
            drain_secs,
        },
        problems,
    ))
}

/// Measurement 2: on an idle service, one batch at a time, from its 202 to the GET that
/// first shows it `completed` (polled every ~5 ms).
pub async fn full_batch(
    api: &Api,
    smtp: &dyn AcceptedCount,
    job_id: &str,
    run: &str,
    samples: usize,
    size: usize,
    timeout: Duration,
) -> anyhow::Result<(FullBatch, Vec<String>)> {
    let mut times = Vec::with_capacity(samples);
    let mut first = Vec::with_capacity(samples);
    let mut problems = Vec::new();
    for i in 0..samples {
        // Let the previous batch's acks and the pool settle: the service is idle.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let baseline = smtp.accepted_count();
        let body = batch_body(job_id, &format!("{run}-f{i:02}"), size);
        let (id, accepted_at) = api.post_batch(&body).await?;
        let deadline = accepted_at + timeout;
        let mut first_mail: Option<Instant> = None;
        let doc = loop {
            let doc = api.get_batch(&id).await?;
            let now = Instant::now();
            if first_mail.is_none() && smtp.accepted_count() > baseline {
                first_mail = Some(now);
            }
            if doc.status == "completed" {
                times.push(now.duration_since(accepted_at).as_secs_f64() * 1000.0);
                break doc;
            }
            if now > deadline {
                bail!("batch {id} did not complete within {} s", timeout.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        if let Some(at) = first_mail {
            first.push(at.duration_since(accepted_at).as_secs_f64() * 1000.0);
        }
        let size_i = i64::try_from(size).unwrap_or(i64::MAX);
        if doc.counts.sent != size_i || doc.total != size_i {
            problems.push(format!(
                "batch {id}: {} sent of {} (expected {size})",
                doc.counts.sent, doc.total
            ));
        }
    }
    let samples_ms = times.clone();
    let sorted = report::sorted(times);
    let first = report::sorted(first);
    Ok((
        FullBatch {
            samples,
            candidates: size,
            median_ms: report::median(&sorted),
            min_ms: sorted.first().copied().unwrap_or(0.0),
            max_ms: sorted.last().copied().unwrap_or(0.0),
            samples_ms,
            first_message_median_ms: report::median(&first),
        },
        problems,
    ))
}

/// Measurement 3: `batches` batches of `size` from `clients` concurrent clients, from
/// the first POST until the last invite reached the SMTP server; the service's CPU,
/// peak RSS and what its database sessions were doing meanwhile.
#[allow(clippy::too_many_arguments)]
pub async fn sustained(
    api: &Api,
    smtp: &dyn AcceptedCount,
    service: &mut Service,
    sampler_pool: &PgPool,
    database: &str,
    job_id: &str,
    run: &str,
    batches: usize,
    size: usize,
    clients: usize,
    timeout: Duration,
) -> anyhow::Result<(Sustained, Vec<String>)> {
    let invites = batches * size;
    let baseline = smtp.accepted_count();
    let target = baseline + invites;

    // Bodies are built before the clock starts.
    let mut work: Vec<Vec<(usize, Value)>> = vec![Vec::new(); clients];
    for b in 0..batches {
        work[b % clients].push((b, batch_body(job_id, &format!("{run}-s{b:04}"), size)));
    }
    let apis: Vec<Api> = (0..clients)
        .map(|_| api.another_client())
        .collect::<anyhow::Result<_>>()?;

    let stop_sampler = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(sample_sessions(
        sampler_pool.clone(),
        database.to_owned(),
        stop_sampler.clone(),
    ));

    let tables_before = table_scans(sampler_pool).await;
    let phases_before = api.metrics().await.unwrap_or_default();
    let cpu_before = CpuSnapshot::take(service, sampler_pool, database).await;
    let started = Instant::now();
    // Each client's (batch number, batch id) pairs and when its last 202 arrived.
    type Posted = anyhow::Result<(Vec<(usize, String)>, Instant)>;
    let mut posting: JoinSet<Posted> = JoinSet::new();
    for (client, mine) in apis.into_iter().zip(work) {
        posting.spawn(async move {
            let mut ids = Vec::with_capacity(mine.len());
            for (b, body) in mine {
                let (id, _) = client.post_batch(&body).await?;
                ids.push((b, id));
            }
            Ok((ids, Instant::now()))
        });
    }

    let deadline = started + timeout;
    let mut ids: Vec<(usize, String)> = Vec::with_capacity(batches);
    let mut posted_at = started;
    let mut timeline: Vec<[f64; 2]> = vec![[0.0, 0.0]];
    let mut next_mark = Duration::from_secs(1);
    let mut checked = Instant::now();
    let finished = loop {
        let now = Instant::now();
        let count = smtp.accepted_count();
        if count >= target {
            break now;
        }
        while let Some(joined) = posting.try_join_next() {
            let (mine, at) = joined.context("a posting client panicked")??;
            ids.extend(mine);
            posted_at = posted_at.max(at);
        }
        let elapsed = now.duration_since(started);
        if elapsed >= next_mark {
            timeline.push([elapsed.as_secs_f64(), count.saturating_sub(baseline) as f64]);
            next_mark += Duration::from_secs(1);
        }
        if now > deadline {
            stop_sampler.store(true, Ordering::Relaxed);
            bail!(
                "only {} of {invites} invites reached the SMTP server within {} s",
                count.saturating_sub(baseline),
                timeout.as_secs()
            );
        }
        if checked.elapsed() > Duration::from_millis(500) {
            service.check_alive()?;
            checked = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let cpu_after = CpuSnapshot::take(service, sampler_pool, database).await;
    let phases = report::phases(&phases_before, &api.metrics().await.unwrap_or_default());
    let tables = scans_between(tables_before, table_scans(sampler_pool).await);
    stop_sampler.store(true, Ordering::Relaxed);
    let secs = finished.duration_since(started).as_secs_f64();
    timeline.push([secs, invites as f64]);

    // Posting ends before the last send; collect every client's ids.
    while let Some(joined) = posting.join_next().await {
        let (mine, at) = joined.context("a posting client panicked")??;
        ids.extend(mine);
        posted_at = posted_at.max(at);
    }
    ids.sort();
    let ids: Vec<String> = ids.into_iter().map(|(_, id)| id).collect();
    let mut problems = verify_batches(api, &ids, size, deadline).await?;
    if ids.len() != batches {
        problems.push(format!("{} batches posted, expected {batches}", ids.len()));
    }
    check_exact(smtp, target, &mut problems);
    let peak_rss_mb = service.peak_rss_kib().unwrap_or(0) as f64 / 1024.0;
    let db_sessions = sampler.await.unwrap_or_default();

    let half = secs / 2.0;
    let at_half = count_at(&timeline, half);
    Ok((
        Sustained {
            invites,
            batches,
            clients,
            secs,
            invites_per_sec: report::ratio(invites as f64, secs),
            posting_secs: posted_at.duration_since(started).as_secs_f64(),
            peak_rss_mb,
            verified: problems.is_empty(),
            first_half_per_sec: report::ratio(at_half, half),
            second_half_per_sec: report::ratio(invites as f64 - at_half, secs - half),
            timeline,
            cpu: cpu_before.until(&cpu_after, secs),
            db_sessions,
            tables,
            phases,
        },
        problems,
    ))
}

/// `pg_stat_user_tables` of the bench database now (empty if unreadable).
async fn table_scans(pool: &PgPool) -> Vec<TableScans> {
    type Row = (String, i64, i64, i64, i64, i64, i64, i64, i64, i64);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT schemaname || '.' || relname, seq_scan, seq_tup_read,
                coalesce(idx_scan, 0), coalesce(idx_tup_fetch, 0), n_tup_ins, n_tup_upd,
                n_tup_hot_upd, n_live_tup, n_dead_tup
         FROM pg_stat_user_tables",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    rows.into_iter()
        .map(|r| TableScans {
            table: r.0,
            seq_scans: r.1,
            seq_rows_read: r.2,
            index_scans: r.3,
            index_rows_fetched: r.4,
            rows_inserted: r.5,
            rows_updated: r.6,
            hot_updates: r.7,
            live_rows: r.8,
            dead_rows: r.9,
        })
        .collect()
}

/// What moved between two snapshots, the tables read most (rows read or fetched) first.
fn scans_between(before: Vec<TableScans>, after: Vec<TableScans>) -> Vec<TableScans> {
    let before: HashMap<String, TableScans> =
        before.into_iter().map(|t| (t.table.clone(), t)).collect();
    let mut out: Vec<TableScans> = after
        .into_iter()
        .map(|a| {
            let b = before.get(&a.table).cloned().unwrap_or_default();
            TableScans {
                seq_scans: a.seq_scans - b.seq_scans,
                seq_rows_read: a.seq_rows_read - b.seq_rows_read,
                index_scans: a.index_scans - b.index_scans,
                index_rows_fetched: a.index_rows_fetched - b.index_rows_fetched,
                rows_inserted: a.rows_inserted - b.rows_inserted,
                rows_updated: a.rows_updated - b.rows_updated,
                hot_updates: a.hot_updates - b.hot_updates,
                ..a
            }
        })
        .collect();
    out.sort_by_key(|t| std::cmp::Reverse(t.seq_rows_read + t.index_rows_fetched));
    out
}

/// The count at time `t`, interpolated between timeline points.
fn count_at(timeline: &[[f64; 2]], t: f64) -> f64 {
    for w in timeline.windows(2) {
        let ([t0, c0], [t1, c1]) = (w[0], w[1]);
        if t >= t0 && t <= t1 {
            return if t1 > t0 {
                c0 + (c1 - c0) * (t - t0) / (t1 - t0)
            } else {
                c1
            };
        }
    }
    timeline.last().map(|p| p[1]).unwrap_or(0.0)
}

struct CpuSnapshot {
    service: Option<u64>,
    bench: Option<u64>,
    /// PostgreSQL backends serving the bench database (the service's sessions and the
    /// sampler's), by pid.
    backends: HashMap<i32, u64>,
    machine: Option<(u64, u64)>,
}

impl CpuSnapshot {
    async fn take(service: &Service, pool: &PgPool, database: &str) -> Self {
        let pids: Vec<i32> =
            sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = $1")
                .bind(database)
                .fetch_all(pool)
                .await
                .unwrap_or_default();
        let backends = pids
            .into_iter()
            .filter_map(|pid| {
                service::process_cpu_ticks(&format!("/proc/{pid}/stat")).map(|t| (pid, t))
            })
            .collect();
        Self {
            service: service.cpu_ticks(),
            bench: service::process_cpu_ticks("/proc/self/stat"),
            backends,
            machine: service::machine_cpu_ticks(),
        }
    }

    fn until(&self, later: &CpuSnapshot, wall_secs: f64) -> Cpu {
        let secs = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => b.saturating_sub(a) as f64 / service::TICKS_PER_SEC,
            _ => 0.0,
        };
        let service_secs = secs(self.service, later.service);
        let bench_secs = secs(self.bench, later.bench);
        // Backends alive at both ends (the pools keep theirs for the whole phase).
        let postgres_ticks: u64 = later
            .backends
            .iter()
            .filter_map(|(pid, t1)| self.backends.get(pid).map(|t0| t1.saturating_sub(*t0)))
            .sum();
        let postgres_secs = postgres_ticks as f64 / service::TICKS_PER_SEC;
        let (busy, idle) = match (self.machine, later.machine) {
            (Some((b0, i0)), Some((b1, i1))) => (
                b1.saturating_sub(b0) as f64 / service::TICKS_PER_SEC,
                i1.saturating_sub(i0) as f64 / service::TICKS_PER_SEC,
            ),
            _ => (0.0, 0.0),
        };
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Cpu {
            wall_secs,
            available_secs: wall_secs * cpus as f64,
            service_secs,
            postgres_secs,
            bench_secs,
            other_secs: (busy - service_secs - bench_secs - postgres_secs).max(0.0),
            idle_secs: idle,
        }
    }
}

const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// Samples `pg_stat_activity` for the service's sessions (`application_name =
/// 'invite-worker'`) until `stop`: what state or wait event each was in, and which
/// statement the busy ones ran.
async fn sample_sessions(pool: PgPool, database: String, stop: Arc<AtomicBool>) -> Sessions {
    let mut states: HashMap<String, usize> = HashMap::new();
    let mut statements: HashMap<String, usize> = HashMap::new();
    let (mut samples, mut open, mut busy) = (0usize, 0usize, 0usize);
    while !stop.load(Ordering::Relaxed) {
        // state, wait_event_type, wait_event, query
        type Activity = (Option<String>, Option<String>, Option<String>, String);
        let rows: Result<Vec<Activity>, _> = sqlx::query_as(
            "SELECT state, wait_event_type, wait_event, query FROM pg_stat_activity
                 WHERE datname = $1 AND application_name = 'invite-worker'
                   AND pid <> pg_backend_pid()",
        )
        .bind(&database)
        .fetch_all(&pool)
        .await;
        if let Ok(rows) = rows {
            samples += 1;
            for (state, wait_type, wait, query) in rows {
                open += 1;
                let state = state.unwrap_or_default();
                let key = match state.as_str() {
                    "idle" => "idle (in the pool, or the LISTEN connection)".to_owned(),
                    "idle in transaction" => {
                        "idle in transaction (the app holds a transaction open)".to_owned()
                    }
                    "active" => match (wait_type, wait) {
                        (Some(t), Some(w)) => format!("active, waiting on {t}:{w}"),
                        _ => "active, on CPU".to_owned(),
                    },
                    other => other.to_owned(),
                };
                *states.entry(key).or_default() += 1;
                if state != "idle" {
                    busy += 1;
                    let q: String = query.split_whitespace().collect::<Vec<_>>().join(" ");
                    let q: String = q.chars().take(90).collect();
                    let q = if state == "active" {
                        q
                    } else {
                        format!("(after) {q}")
                    };
                    *statements.entry(q).or_default() += 1;
                }
            }
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    let share = |m: HashMap<String, usize>, of: usize| {
        let mut v: Vec<(String, f64)> = m
            .into_iter()
            .map(|(k, c)| (k, report::ratio(c as f64, of as f64)))
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    };
    Sessions {
        samples,
        interval_ms: SAMPLE_EVERY.as_millis() as u64,
        mean_open: report::ratio(open as f64, samples as f64),
        mean_busy: report::ratio(busy as f64, samples as f64),
        states: share(states, open),
        busy_statements: share(statements, busy),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_interpolated_on_the_timeline() {
        let t = [[0.0, 0.0], [1.0, 100.0], [2.0, 300.0]];
        assert_eq!(count_at(&t, 0.5), 50.0);
        assert_eq!(count_at(&t, 1.5), 200.0);
        assert_eq!(count_at(&t, 5.0), 300.0);
    }

    #[test]
    fn a_batch_body_has_unique_valid_candidates() {
        let body = batch_body("job-1", "r1-e0001", 100);
        let c = body["candidates"].as_array().map(Vec::len);
        assert_eq!(c, Some(100));
        assert_eq!(body["candidates"][7]["email"], "r1-e0001.c007@example.com");
        assert!(
            invite_worker::domain::email::CandidateEmail::parse("r1-e0001.c007@example.com")
                .is_ok()
        );
    }
}
