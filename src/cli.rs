//! The command line: one binary, one subcommand per way of running it.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use uuid::Uuid;

use crate::domain::{
    access::OperatorRole,
    states::{BatchStatus, ItemReason},
};

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

    /// Operator commands: print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,

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
    /// The queue's figures (as GET /v1/queue) and batches by status.
    Status,
    /// List, show, retry and cancel batches.
    #[command(subcommand)]
    Batches(BatchesCommand),
    /// Tasks apalis gave up on, and running them again.
    #[command(subcommand)]
    Tasks(TasksCommand),
    /// The people who sign in to the web console.
    #[command(subcommand)]
    Operators(OperatorsCommand),
}

impl Command {
    /// The operator commands: they read and change the database directly.
    pub fn is_operator_command(&self) -> bool {
        matches!(
            self,
            Command::Status | Command::Batches(_) | Command::Tasks(_) | Command::Operators(_)
        )
    }
}

#[derive(Debug, Subcommand)]
pub enum BatchesCommand {
    /// Batches, newest first.
    List {
        /// Only this job's.
        #[arg(long, value_name = "JOB")]
        job: Option<String>,
        /// Only batches in this status (queued, running, completed, cancelled).
        #[arg(long, value_name = "STATUS")]
        status: Option<BatchStatus>,
        /// At most this many (1 to 500).
        #[arg(long, value_name = "N", default_value_t = 20)]
        limit: i64,
    },
    /// One batch: counts, summary and failure groups.
    Show { id: Uuid },
    /// Put failed items back through the queue (all, or one reason's).
    Retry {
        id: Uuid,
        /// Only items that failed for this reason (e.g. retries_exhausted).
        #[arg(long, value_name = "REASON")]
        reason: Option<ItemReason>,
        /// Say which candidates would be retried; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Skip every pending item and revoke their links.
    Cancel { id: Uuid },
}

#[derive(Debug, Subcommand)]
pub enum TasksCommand {
    /// Tasks apalis gave up on (killed, or out of attempts), most recent first.
    Dead {
        /// At most this many (1 to 500).
        #[arg(long, value_name = "N", default_value_t = 50)]
        limit: i64,
    },
    /// Make dead tasks runnable again.
    Retry {
        /// Every dead task.
        #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
        all: bool,
        /// This dead task (repeat for more).
        #[arg(long = "id", value_name = "TASK_ID")]
        ids: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum OperatorsCommand {
    /// Add an operator; prints a one-time password unless --password-stdin.
    Add {
        name: String,
        /// viewer (sees, addresses masked) or operator (also acts).
        #[arg(long)]
        role: OperatorRole,
        /// Read the password from standard input instead of generating one.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Every operator.
    List,
    /// Remove an operator.
    Remove { name: String },
}
