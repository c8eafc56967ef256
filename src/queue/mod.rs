//! The durable queue: apalis-postgres tasks that carry only an item id (the task table's
//! statements are in `db::tasks`).
//!
//! apalis' own retries are not durable (its backoff sleeps in memory and a failed row
//! is re-fetched at once), so a transient failure is handled here instead: the
//! handler records it and, in the same transaction, pushes a fresh task whose
//! `run_at` is the backoff delay away, then reports success for the current task.
//! A scheduled retry is therefore an ordinary row in `apalis.jobs` and survives any
//! restart.

pub mod deliver;
pub mod gauges;
pub mod group;
pub mod maintenance;
pub mod prepare;
mod process;
pub mod recorder;
mod throttle;
mod webhook_client;
pub mod webhooks;
pub mod worker;
