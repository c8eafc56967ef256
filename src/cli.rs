//! The command line: one binary, one subcommand per way of running it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "invite-worker",
    version,
    about = "Bulk interview invitations over a durable Postgres queue"
)]
pub struct Cli {
    /// Configuration file (default ./worker.toml; the shipped values apply when it is absent).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// HTTP API and queue workers in one process (the default deployment).
    Serve,
    /// HTTP API only (stateless; run many behind a load balancer).
    Api,
    /// Queue workers only; serves /healthz, /readyz and /metrics on http.bind.
    Work,
    /// Create the database if missing, apply all migrations, exit.
    Migrate,
    /// A self-contained run of the main job: one batch of 100, tally printed.
    Demo,
    /// Benchmark the whole pipeline (HTTP → queue → SMTP) against apalis' and raw SQL's
    /// floor, in a fresh database that is dropped afterwards.
    Bench(BenchArgs),
}

/// `invite-worker bench`: flags. The service under test runs as a child process with the
/// shipped defaults; only the database, bind address, SMTP port, API key and
/// `mail.rate_per_second` are set (plus any `--service-env`).
#[derive(Debug, Clone, Args)]
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

    /// Deadline for each wait (service start, a phase draining, a floor run).
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub phase_timeout_secs: u64,
}
