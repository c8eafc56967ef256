//! The figures of one run: what is printed as a table and written as JSON.

use std::fmt::Write as _;

use serde::Serialize;

/// Everything one run measured. Serialized as the `--json` file.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub tool: String,
    pub version: String,
    pub started_at: String,
    pub quick: bool,
    /// Wall time of the whole run, setup and cleanup included.
    pub wall_secs: f64,
    pub machine: Machine,
    pub service: ServiceSetup,
    pub enqueue: Enqueue,
    pub full_batch: FullBatch,
    pub sustained: Sustained,
    /// The sustained run again, against a third-party SMTP server.
    pub third_party: ThirdParty,
    pub floor: Floor,
    pub ratios: Ratios,
    /// Every check of the run passed (exact tallies, no lost or repeated message).
    pub ok: bool,
    pub problems: Vec<String>,
}

/// Measurement 3 against an SMTP server we did not write, next to what that server
/// accepts alone (a minimal client, the same run).
#[derive(Debug, Clone, Serialize)]
pub struct ThirdParty {
    /// Which server, and its version.
    pub server: String,
    /// Messages per second the server accepted from a minimal client alone.
    pub alone_per_sec: f64,
    pub alone_messages: usize,
    pub alone_connections: usize,
    pub sustained: Sustained,
    /// invites/s through the service ÷ the server alone.
    pub ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub postgres: String,
    /// `synchronous_commit` of the server: every commit waits for a WAL flush when `on`.
    pub synchronous_commit: String,
    pub load_average_at_start: String,
}

/// How the service under test was configured (what the child process loaded).
#[derive(Debug, Clone, Serialize)]
pub struct ServiceSetup {
    pub binary: String,
    /// Environment variables the child got (the API key redacted).
    pub env: Vec<String>,
    pub rate_per_second: u32,
    pub worker_concurrency: usize,
    pub pool_max_connections: u32,
    pub poll_interval_ms: u64,
    pub heartbeat_secs: u64,
    /// Lines at WARN / ERROR in the service's log over the run.
    pub log_warnings: usize,
    pub log_errors: usize,
}

/// Measurement 1: sequential `POST /v1/batches`.
#[derive(Debug, Clone, Serialize)]
pub struct Enqueue {
    pub posts: usize,
    pub candidates_per_post: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// From the first POST until every one of these batches was completed.
    pub drain_secs: f64,
}

/// Measurement 2: one batch on an idle service, 202 → `completed`.
#[derive(Debug, Clone, Serialize)]
pub struct FullBatch {
    pub samples: usize,
    pub candidates: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub samples_ms: Vec<f64>,
    /// From the 202 until the first of the batch's messages reached the SMTP server.
    pub first_message_median_ms: f64,
}

/// Measurement 3: many batches from concurrent clients.
#[derive(Debug, Clone, Serialize)]
pub struct Sustained {
    pub invites: usize,
    pub batches: usize,
    pub clients: usize,
    /// First POST → the last invite accepted by the SMTP server.
    pub secs: f64,
    pub invites_per_sec: f64,
    /// First POST → the last 202.
    pub posting_secs: f64,
    /// The service process's VmHWM after this phase (its peak over the whole run).
    pub peak_rss_mb: f64,
    pub verified: bool,
    /// Invites accepted per second in the first and in the second half of the phase.
    pub first_half_per_sec: f64,
    pub second_half_per_sec: f64,
    /// (seconds since the first POST, invites accepted so far), about once a second.
    pub timeline: Vec<[f64; 2]>,
    pub cpu: Cpu,
    pub db_sessions: Sessions,
    /// Per-table scan counters (`pg_stat_user_tables`) moved during this phase, the
    /// tables read most first.
    pub tables: Vec<TableScans>,
    /// Where an invite's time went, from the service's own metrics.
    pub phases: Vec<Phase>,
}

/// The mean of one of the service's summaries over the sustained phase (deltas of its
/// `_sum` and `_count` on `/metrics`).
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    /// `invite_phase_seconds{phase="send"}`, …
    pub metric: String,
    pub count: f64,
    pub mean: f64,
}

/// The summaries the phase breakdown reads: per invite, the three phases (waiting for
/// a group included); per group write, its size and how long its transaction took.
const PHASE_METRICS: [&str; 3] = [
    "invite_phase_seconds",
    "group_write_seconds",
    "group_write_size",
];

/// The mean of each [`PHASE_METRICS`] series between two `/metrics` scrapes.
pub fn phases(before: &str, after: &str) -> Vec<Phase> {
    let read = |text: &str| {
        let mut series: std::collections::BTreeMap<String, (f64, f64)> = Default::default();
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            for metric in PHASE_METRICS {
                let labels = |suffix: &str| {
                    name.strip_prefix(metric)
                        .and_then(|rest| rest.strip_prefix(suffix))
                        .map(|labels| format!("{metric}{labels}"))
                };
                if let Some(key) = labels("_sum") {
                    series.entry(key).or_default().0 = value;
                } else if let Some(key) = labels("_count") {
                    series.entry(key).or_default().1 = value;
                }
            }
        }
        series
    };
    let before = read(before);
    read(after)
        .into_iter()
        .filter_map(|(metric, (sum, count))| {
            let (sum0, count0) = before.get(&metric).copied().unwrap_or_default();
            let count = count - count0;
            (count > 0.0).then(|| Phase {
                metric,
                count,
                mean: (sum - sum0) / count,
            })
        })
        .collect()
}

/// Where an invite's time went during phase `label` (`3`, or `3b` against the
/// third-party server).
pub fn phase_table(label: &str, phases: &[Phase]) -> String {
    let mut out =
        format!("where the time went during {label} (means, from the service's /metrics):\n");
    for p in phases {
        let (value, unit) = if p.metric.starts_with("group_write_size") {
            (p.mean, "requests")
        } else {
            (p.mean * 1000.0, "ms")
        };
        let _ = writeln!(
            out,
            "  {:<50} {value:>8.2} {unit:<8} × {:.0}",
            p.metric, p.count
        );
    }
    out
}

/// How a table was read during the sustained phase (deltas of `pg_stat_user_tables`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct TableScans {
    pub table: String,
    pub seq_scans: i64,
    pub seq_rows_read: i64,
    pub index_scans: i64,
    pub index_rows_fetched: i64,
    pub rows_inserted: i64,
    pub rows_updated: i64,
    pub hot_updates: i64,
    /// At the end of the phase.
    pub live_rows: i64,
    pub dead_rows: i64,
}

/// CPU seconds spent during the sustained phase, split by process.
#[derive(Debug, Clone, Serialize)]
pub struct Cpu {
    pub wall_secs: f64,
    /// `wall_secs × cpus`.
    pub available_secs: f64,
    pub service_secs: f64,
    /// The PostgreSQL backends serving the bench's database (nearly all of it the
    /// service's sessions).
    pub postgres_secs: f64,
    /// This process: the HTTP clients, the SMTP sink, the sampler.
    pub bench_secs: f64,
    /// Every other busy process: PostgreSQL's background processes (WAL writer,
    /// checkpointer, autovacuum), the kernel, and anything else running on the machine.
    pub other_secs: f64,
    pub idle_secs: f64,
}

/// What the service's database sessions were doing, sampled from `pg_stat_activity`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sessions {
    pub samples: usize,
    pub interval_ms: u64,
    /// Mean number of the service's sessions open / not idle per sample.
    pub mean_open: f64,
    pub mean_busy: f64,
    /// (state or wait event, share of session-samples), largest first.
    pub states: Vec<(String, f64)>,
    /// (statement, share of busy session-samples), largest first.
    pub busy_statements: Vec<(String, f64)>,
}

/// Measurement 4: the same work with less on top, on the same server.
#[derive(Debug, Clone, Serialize)]
pub struct Floor {
    pub apalis_default: QueueFloor,
    pub apalis_service: QueueFloor,
    pub raw_sql: RawFloor,
    pub raw_sql_single: RawFloor,
    pub commit: Commit,
}

/// apalis-postgres with a handler that does nothing.
#[derive(Debug, Clone, Serialize)]
pub struct QueueFloor {
    pub setup: String,
    pub tasks: usize,
    /// The one `push_tasks` INSERT of every task.
    pub push_ms: f64,
    /// From the push until the last row is `Done`.
    pub secs: f64,
    pub tasks_per_sec: f64,
}

/// A claim-and-complete loop in plain SQL.
#[derive(Debug, Clone, Serialize)]
pub struct RawFloor {
    pub setup: String,
    pub rows: usize,
    pub connections: usize,
    pub claim: usize,
    /// The loop only (the rows were inserted before).
    pub secs: f64,
    pub rows_per_sec: f64,
}

/// One connection committing single-row updates of one row, one after another: the
/// cost of a commit on this server, and so the pace of anything serialised on one row.
#[derive(Debug, Clone, Serialize)]
pub struct Commit {
    pub commits: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub per_sec: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    pub service_vs_apalis_default: f64,
    pub service_vs_apalis_service: f64,
    pub service_vs_raw_sql: f64,
    pub service_vs_raw_sql_single: f64,
}

/// Nearest-rank percentile (`p` in 0..=100) of `sorted`; 0 when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The middle value (the mean of the two middle ones for an even count); 0 when empty.
pub fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

pub fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

pub fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

fn n(v: usize) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn rate(v: f64) -> String {
    n(v.round() as usize)
}

/// The table printed at the end of a run.
pub fn table(r: &Results) -> String {
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let mut row = |a: &str, b: String, c: String| rows.push((a.to_owned(), b, c));

    let e = &r.enqueue;
    row(
        "1 enqueue latency",
        format!(
            "p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
            e.p50_ms, e.p99_ms, e.max_ms
        ),
        format!(
            "{} sequential POST /v1/batches × {} candidates (drained in {:.1} s)",
            e.posts, e.candidates_per_post, e.drain_secs
        ),
    );
    let f = &r.full_batch;
    row(
        "2 time to a full batch",
        format!("median {:.0} ms", f.median_ms),
        format!(
            "idle service, 202 → completed, {} × {} (min {:.0}, max {:.0}; first mail {:.0} ms)",
            f.samples, f.candidates, f.min_ms, f.max_ms, f.first_message_median_ms
        ),
    );
    let s = &r.sustained;
    row(
        "3 sustained throughput",
        format!("{} invites/s", rate(s.invites_per_sec)),
        format!(
            "{} invites, {} batches, {} clients, {:.1} s (posting {:.1} s; halves {} → {} /s)",
            n(s.invites),
            s.batches,
            s.clients,
            s.secs,
            s.posting_secs,
            rate(s.first_half_per_sec),
            rate(s.second_half_per_sec)
        ),
    );
    row(
        "  service peak RSS",
        format!("{:.1} MB", s.peak_rss_mb),
        "VmHWM of the serve process".to_owned(),
    );
    row(
        "  tallies",
        if s.verified { "OK" } else { "FAILED" }.to_owned(),
        "every batch completed with exactly 100 sent; SMTP count exact".to_owned(),
    );
    let t = &r.third_party;
    row(
        "3b same, third-party SMTP",
        format!("{} invites/s", rate(t.sustained.invites_per_sec)),
        format!(
            "{}: {} invites, {} batches, {} clients, {:.1} s; tallies {}",
            t.server,
            n(t.sustained.invites),
            t.sustained.batches,
            t.sustained.clients,
            t.sustained.secs,
            if t.sustained.verified { "OK" } else { "FAILED" }
        ),
    );
    row(
        "   that server alone",
        format!("{} messages/s", rate(t.alone_per_sec)),
        format!(
            "{} messages over {} connections from a minimal lettre client (TCP_NODELAY)",
            n(t.alone_messages),
            t.alone_connections
        ),
    );
    row(
        "   ratio (3b ÷ alone)",
        format!("{:.2}", t.ratio),
        "invites/s through the whole service ÷ what the server takes alone".to_owned(),
    );
    let fl = &r.floor;
    for (name, q) in [
        ("4a apalis, defaults", &fl.apalis_default),
        ("4a apalis, service settings", &fl.apalis_service),
    ] {
        row(
            name,
            format!("{} tasks/s", rate(q.tasks_per_sec)),
            format!(
                "{} no-op tasks, push {:.0} ms → last Done {:.2} s; {}",
                n(q.tasks),
                q.push_ms,
                q.secs,
                q.setup
            ),
        );
    }
    for (name, raw) in [
        ("4b raw SQL claim+complete", &fl.raw_sql),
        ("   … one row per claim", &fl.raw_sql_single),
    ] {
        row(
            name,
            format!("{} rows/s", rate(raw.rows_per_sec)),
            format!("{} rows, {:.2} s; {}", n(raw.rows), raw.secs, raw.setup),
        );
    }
    row(
        "   commit on one row",
        format!("p50 {:.2} ms", fl.commit.p50_ms),
        format!(
            "{} serial commits, p99 {:.2} ms: ≤ {} commits/s on any single row",
            fl.commit.commits,
            fl.commit.p99_ms,
            rate(fl.commit.per_sec)
        ),
    );
    let q = &r.ratios;
    row(
        "ratios (3 ÷ floor)",
        format!(
            "{:.2} | {:.2} | {:.2}",
            q.service_vs_apalis_default, q.service_vs_apalis_service, q.service_vs_raw_sql
        ),
        format!(
            "invites/s ÷ (4a defaults | 4a service settings | 4b); ÷ one-row claims {:.2}",
            q.service_vs_raw_sql_single
        ),
    );

    let w0 = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.1.chars().count()).max().unwrap_or(0);
    let mut out = String::new();
    let rule = format!("{}\n", "─".repeat(w0 + w1 + 60));
    out.push_str(&rule);
    for (a, b, c) in &rows {
        let _ = writeln!(out, "{a:<w0$}  {b:<w1$}  {c}");
    }
    out.push_str(&rule);
    out
}

/// What the service's database sessions were doing, as printed under the table.
pub fn sessions(s: &Sessions) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "service DB sessions during 3 ({} samples every {} ms): {:.1} open, {:.1} busy on average",
        s.samples, s.interval_ms, s.mean_open, s.mean_busy
    );
    for (state, share) in s.states.iter().take(8) {
        let _ = writeln!(out, "  {:>5.1}%  {state}", share * 100.0);
    }
    if !s.busy_statements.is_empty() {
        let _ = writeln!(out, "  busy sessions by statement:");
        for (stmt, share) in s.busy_statements.iter().take(8) {
            let _ = writeln!(out, "  {:>5.1}%  {stmt}", share * 100.0);
        }
    }
    out
}

pub fn tables(t: &[TableScans]) -> String {
    let mut out = String::from(
        "tables read during 3 (pg_stat_user_tables deltas): seq scans / rows read by them | index scans / rows fetched | updates (HOT) | live, dead rows\n",
    );
    for t in t.iter().take(8) {
        let _ = writeln!(
            out,
            "  {:<24} {:>7} / {:>12} | {:>8} / {:>9} | {:>7} ({:>6}) | {:>7}, {:>6}",
            t.table,
            n(t.seq_scans.max(0) as usize),
            n(t.seq_rows_read.max(0) as usize),
            n(t.index_scans.max(0) as usize),
            n(t.index_rows_fetched.max(0) as usize),
            n(t.rows_updated.max(0) as usize),
            n(t.hot_updates.max(0) as usize),
            n(t.live_rows.max(0) as usize),
            n(t.dead_rows.max(0) as usize),
        );
    }
    out
}

pub fn cpu(label: &str, c: &Cpu) -> String {
    format!(
        "CPU during {label} ({:.1} s wall, {:.1} CPU-s available): service {:.1} s, its PostgreSQL \
         backends {:.1} s, bench (clients + SMTP sink) {:.1} s, everything else {:.1} s, idle {:.1} s",
        c.wall_secs,
        c.available_secs,
        c.service_secs,
        c.postgres_secs,
        c.bench_secs,
        c.other_secs,
        c.idle_secs
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_means_are_deltas_between_scrapes() {
        let before = "# TYPE invite_phase_seconds summary\n\
            invite_phase_seconds{phase=\"send\",quantile=\"0.5\"} 0.001\n\
            invite_phase_seconds_sum{phase=\"send\"} 1\n\
            invite_phase_seconds_count{phase=\"send\"} 100\n";
        let after = "invite_phase_seconds_sum{phase=\"send\"} 3\n\
            invite_phase_seconds_count{phase=\"send\"} 300\n\
            group_write_size_sum{kind=\"prepare\"} 40\n\
            group_write_size_count{kind=\"prepare\"} 10\n\
            unrelated_total 5\n";
        let phases = phases(before, after);
        assert_eq!(phases.len(), 2, "{phases:?}");
        assert_eq!(phases[0].metric, "group_write_size{kind=\"prepare\"}");
        assert_eq!((phases[0].count, phases[0].mean), (10.0, 4.0));
        assert_eq!(phases[1].metric, "invite_phase_seconds{phase=\"send\"}");
        assert_eq!((phases[1].count, phases[1].mean), (200.0, 0.01));
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 100.0);
        assert_eq!(percentile(&v, 99.0), 198.0);
        assert_eq!(percentile(&v, 100.0), 200.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[1.0, 2.0, 3.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 3.0, 10.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn thousands() {
        assert_eq!(n(0), "0");
        assert_eq!(n(999), "999");
        assert_eq!(n(20_000), "20,000");
        assert_eq!(n(1_234_567), "1,234,567");
    }
}
