//! invite-worker: bulk interview invitations over a durable Postgres queue.
//!
//! A web app posts a batch of candidates; one transaction writes the batch, one item
//! per candidate and one apalis task per item. Workers send each candidate one email
//! with a unique, single-use link, retry transient failures durably with backoff, and
//! keep the batch tally exact by moving it in the same transaction as each item.
//!
//! Dependencies point one way, in layers (docs/architecture.md; `tests/layers.rs`
//! checks them): `domain` ← `config` ← `db` and `mail` ← `queue` and `http` ← `app` ←
//! `demo`; the operator CLI (`ops`) uses `db` directly. `http` does not use `queue` or
//! `mail`; `domain` uses nothing of ours.

pub mod app;
pub mod cli;
pub mod config;
pub mod db;
pub mod demo;
pub mod domain;
pub mod http;
pub mod mail;
pub mod ops;
pub mod queue;
pub mod telemetry;
