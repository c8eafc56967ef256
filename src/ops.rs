//! The operator CLI (`status`, `batches`, `tasks`, `operators`): the same database
//! functions the API uses, run against PostgreSQL directly (no API needed), printed as
//! tables for people or JSON (`--json`) for scripts. Every change is written with its
//! audit entry, as `cli:<os user>`, in one transaction.

use std::{io::Read, time::Duration};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;

use crate::{
    cli::{BatchesCommand, Command, OperatorsCommand, TasksCommand},
    config::{self, Settings},
    db::{
        self,
        batches::{BatchView, Cancel, FailureGroup, Retry, RetrySelection},
        tasks::{self, DeadSelection},
    },
    domain::access::{self, Actor},
};

/// Runs an operator command (`Command::is_operator_command`); prints what it did or
/// found on stdout. An error is for the caller to print as one line (exit status 1).
pub async fn run(settings: &Settings, command: Command, json: bool) -> anyhow::Result<()> {
    let pool = db::connect(&settings.database)
        .await
        .context("could not connect to the database")?;
    if !db::migrations_applied(&pool).await {
        bail!("the database is not migrated: run `invite-worker migrate` first");
    }
    let out = Out { json };
    match command {
        Command::Status => status(&pool, settings, out).await,
        Command::Batches(command) => batches(&pool, settings, command, out).await,
        Command::Tasks(command) => tasks(&pool, command, out).await,
        Command::Operators(command) => operators(&pool, command, out).await,
        other => bail!("{other:?} is not an operator command"),
    }
}

/// The operating-system user running the CLI, as the audit log names it.
fn actor() -> Actor {
    Actor::cli(&whoami::username().unwrap_or_else(|_| "unknown".to_owned()))
}

/// Where results go: JSON (one document per command) or text for people.
#[derive(Clone, Copy)]
struct Out {
    json: bool,
}

impl Out {
    /// Prints `value` as JSON, or `human()` as text.
    fn print(self, value: &impl Serialize, human: impl FnOnce() -> String) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value)?);
        } else {
            print!("{}", human());
        }
        Ok(())
    }
}

/// Columns padded to their widest cell, headers first; every line ends in a newline.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let padded: Vec<String> = cells
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut text = line(&mut headers.iter().copied());
    for row in rows {
        text.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    text
}

fn check_limit(limit: i64) -> anyhow::Result<i64> {
    if !(1..=500).contains(&limit) {
        bail!("--limit must be 1 to 500 (got {limit})");
    }
    Ok(limit)
}

async fn status(pool: &PgPool, settings: &Settings, out: Out) -> anyhow::Result<()> {
    let alive = Duration::from_secs(settings.worker.recover_after_secs);
    let queue = tasks::overview(pool, alive).await?;
    let batches = db::batches::count_by_status(pool).await?;
    let mut value = serde_json::to_value(&queue)?;
    value["batches"] = batches
        .iter()
        .map(|(s, n)| (s.as_str().to_owned(), json!(n)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    out.print(&value, || {
        let t = &queue.tasks;
        let mut text = table(
            &["TASKS", "PENDING", "SCHEDULED", "RUNNING", "DONE", "DEAD"],
            &[vec![
                String::new(),
                t.pending.to_string(),
                t.scheduled.to_string(),
                t.running.to_string(),
                t.done.to_string(),
                t.dead.to_string(),
            ]],
        );
        text.push_str(&format!(
            "oldest pending: {} s\nsent last minute: {}\n\n",
            queue.oldest_pending_age_secs, queue.sent_last_minute
        ));
        let workers: Vec<Vec<String>> = queue
            .workers
            .iter()
            .map(|w| {
                vec![
                    w.name.clone(),
                    w.last_seen.to_rfc3339(),
                    w.in_flight.to_string(),
                ]
            })
            .collect();
        text.push_str(&table(&["WORKER", "LAST SEEN", "IN FLIGHT"], &workers));
        text.push('\n');
        let rows: Vec<Vec<String>> = batches
            .iter()
            .map(|(s, n)| vec![s.to_string(), n.to_string()])
            .collect();
        text.push_str(&table(&["BATCHES", "COUNT"], &rows));
        text
    })
}

fn batch_rows(batches: &[BatchView]) -> Vec<Vec<String>> {
    batches
        .iter()
        .map(|b| {
            vec![
                b.id.to_string(),
                b.job_id.clone(),
                b.status.to_string(),
                b.total.to_string(),
                b.summary.clone(),
                b.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            ]
        })
        .collect()
}

const BATCH_HEADERS: &[&str] = &["ID", "JOB", "STATUS", "TOTAL", "SUMMARY", "CREATED"];

fn group_table(groups: &[FailureGroup]) -> String {
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|g| {
            vec![
                g.reason.to_string(),
                g.reply_code.clone().unwrap_or_else(|| "-".into()),
                g.count.to_string(),
                g.candidate_ids.join(","),
            ]
        })
        .collect();
    table(&["REASON", "REPLY", "COUNT", "CANDIDATES"], &rows)
}

async fn batches(
    pool: &PgPool,
    settings: &Settings,
    command: BatchesCommand,
    out: Out,
) -> anyhow::Result<()> {
    let not_found = |id| anyhow::anyhow!("no batch with id {id}");
    match command {
        BatchesCommand::List { job, status, limit } => {
            let limit = check_limit(limit)?;
            let rows = db::batches::list(pool, job.as_deref(), status, limit).await?;
            let batches: Vec<BatchView> = rows.into_iter().map(BatchView::from).collect();
            out.print(&json!({ "batches": batches }), || {
                table(BATCH_HEADERS, &batch_rows(&batches))
            })
        }
        BatchesCommand::Show { id } => {
            let batch: BatchView = db::batches::get(pool, id)
                .await?
                .ok_or_else(|| not_found(id))?
                .into();
            let groups = db::batches::failure_groups(pool, id).await?;
            let value = json!({ "batch": batch, "failure_groups": groups });
            out.print(&value, || {
                let c = &batch.counts;
                let mut text = format!(
                    "batch     {}\njob       {}\nstatus    {}\ncreated   {} by {}\n\
                     total     {}\npending   {}\nsent      {}\nfailed    {}\nskipped   {}\n\
                     summary   {}\n",
                    batch.id,
                    batch.job_id,
                    batch.status,
                    batch.created_at.to_rfc3339(),
                    batch.created_by.as_deref().unwrap_or("-"),
                    batch.total,
                    c.pending,
                    c.sent,
                    c.failed,
                    c.skipped,
                    batch.summary,
                );
                if !groups.is_empty() {
                    text.push('\n');
                    text.push_str(&group_table(&groups));
                }
                text
            })
        }
        BatchesCommand::Retry {
            id,
            reason,
            dry_run,
        } => {
            let selection = match reason {
                None => RetrySelection::All,
                Some(r) => RetrySelection::reason(r).map_err(anyhow::Error::msg)?,
            };
            match tasks::retry_batch(pool, id, &selection, dry_run, &actor()).await? {
                Retry::NotFound => Err(not_found(id)),
                Retry::Cancelled => bail!("batch {id} is cancelled: its items cannot be retried"),
                Retry::NotRetryable(_) => bail!("batch {id} has no failed items to retry"),
                Retry::DryRun(ids) => {
                    let value = json!({ "would_retry": ids.len(), "candidate_ids": ids });
                    out.print(&value, || {
                        format!("would retry {}: {}\n", ids.len(), ids.join(","))
                    })
                }
                Retry::Retried(row, tasks) => {
                    let batch = BatchView::from(row);
                    let value = json!({ "retried": tasks.len(), "batch": batch });
                    out.print(&value, || {
                        format!(
                            "retried {} items of batch {id}: {} pending, {}\n",
                            tasks.len(),
                            batch.counts.pending,
                            batch.summary
                        )
                    })
                }
            }
        }
        BatchesCommand::Cancel { id } => {
            match db::batches::cancel(pool, id, settings.cancel_window(), &actor()).await? {
                Cancel::Cancelled(row) => {
                    let batch = BatchView::from(row);
                    out.print(&batch, || {
                        format!("cancelled batch {id}: {}\n", batch.summary)
                    })
                }
                Cancel::NotFound => Err(not_found(id)),
                Cancel::AlreadyFinished(status) => {
                    bail!("batch {id} is {status}: only a queued or running batch can be cancelled")
                }
                Cancel::SendsInFlight => {
                    bail!("sends of batch {id} are still on their way: try again shortly")
                }
            }
        }
    }
}

async fn tasks(pool: &PgPool, command: TasksCommand, out: Out) -> anyhow::Result<()> {
    match command {
        TasksCommand::Dead { limit } => {
            let dead = tasks::dead_tasks(pool, check_limit(limit)?).await?;
            out.print(&json!({ "tasks": dead }), || {
                let rows: Vec<Vec<String>> = dead
                    .iter()
                    .map(|t| {
                        vec![
                            t.id.clone(),
                            t.item_id.map_or_else(|| "-".into(), |i| i.to_string()),
                            t.status.clone(),
                            t.attempts.to_string(),
                            t.died_at.map_or_else(|| "-".into(), |d| d.to_rfc3339()),
                            t.last_result
                                .as_ref()
                                .map_or_else(|| "-".into(), ToString::to_string),
                        ]
                    })
                    .collect();
                table(
                    &["TASK", "ITEM", "STATUS", "ATTEMPTS", "DIED", "LAST RESULT"],
                    &rows,
                )
            })
        }
        TasksCommand::Retry { all, ids } => {
            let which = if all {
                DeadSelection::All
            } else {
                DeadSelection::ids(ids).map_err(anyhow::Error::msg)?
            };
            let retried = tasks::retry_dead_tasks(pool, &which, &actor()).await?;
            out.print(&json!({ "retried": retried }), || {
                format!("retried {retried} dead tasks\n")
            })
        }
    }
}

/// The shortest password `--password-stdin` accepts.
const MIN_PASSWORD_CHARS: usize = 12;

async fn operators(pool: &PgPool, command: OperatorsCommand, out: Out) -> anyhow::Result<()> {
    match command {
        OperatorsCommand::Add {
            name,
            role,
            password_stdin,
        } => {
            access::check_operator_name(&name).map_err(anyhow::Error::msg)?;
            let (password, generated) = if password_stdin {
                let mut text = String::new();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .context("could not read the password from stdin")?;
                let password = text.trim_end_matches(['\r', '\n']).to_owned();
                if password.chars().count() < MIN_PASSWORD_CHARS {
                    bail!("the password must be at least {MIN_PASSWORD_CHARS} characters");
                }
                (password, false)
            } else {
                (config::generate_secret(), true)
            };
            let hash = access::hash_password(&password).map_err(anyhow::Error::msg)?;
            if !db::operators::add(pool, &name, role, &hash, &actor()).await? {
                bail!("an operator named {name:?} exists already");
            }
            let shown = generated.then_some(password.as_str());
            let value = json!({ "name": name, "role": role, "password": shown });
            out.print(&value, || match shown {
                Some(p) => format!(
                    "added {role} {name}\npassword: {p}\n(shown only now: give it to {name} \
                     over a safe channel)\n"
                ),
                None => format!("added {role} {name}\n"),
            })
        }
        OperatorsCommand::List => {
            let operators = db::operators::list(pool).await?;
            out.print(&json!({ "operators": operators }), || {
                let rows: Vec<Vec<String>> = operators
                    .iter()
                    .map(|o| {
                        vec![
                            o.name.clone(),
                            o.role.to_string(),
                            o.created_at.to_rfc3339(),
                        ]
                    })
                    .collect();
                table(&["NAME", "ROLE", "CREATED"], &rows)
            })
        }
        OperatorsCommand::Remove { name } => {
            if !db::operators::remove(pool, &name, &actor()).await? {
                bail!("no operator named {name:?}");
            }
            out.print(&json!({ "removed": name }), || {
                format!("removed operator {name}\n")
            })
        }
    }
}
