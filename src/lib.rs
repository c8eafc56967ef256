//! invite-worker: bulk interview invitations over a durable Postgres queue.
//!
//! A web app posts a batch of candidates; one transaction writes the batch, one item
//! per candidate and one apalis task per item. Workers send each candidate one email
//! with a unique, single-use link, retry transient failures durably with backoff, and
//! keep the batch tally exact by moving it in the same transaction as each item.
//!
//! Dependencies point one way: `http` and `queue` use `db`, `domain` and `mail`;
//! `domain` depends on nothing of ours.

pub mod app;
pub mod cli;
pub mod config;
pub mod db;
pub mod demo;
pub mod domain;
pub mod http;
pub mod mail;
pub mod queue;
pub mod telemetry;
