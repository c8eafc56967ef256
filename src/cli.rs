//! The command line: one binary, one subcommand per way of running it.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

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
    /// Print a strong random value for an API key or invite.token_secret.
    Secret,
}
