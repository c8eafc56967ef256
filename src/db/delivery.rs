//! Phase 1 of the worker, written for a whole group of items (see `queue::group`), so a
//! group costs one round trip however large it is. (Phase 3, which also finishes the
//! queue tasks, is `db::tasks::record_outcomes`; the same rules hold for it.)
//!
//! The group writers' statements run on their own connections, planned once (`db::writer_connection`), so
//! each is written to leave the planner one sane plan whatever it believes about table
//! sizes: every table is reached through an index condition on keys the statement is
//! given or has computed first (`= ANY($n)`, `= ANY(ARRAY(SELECT …))`, or a LATERAL
//! lookup by the outer row's key), never by a scan that grows with the table.
//!
//! Row locks are `FOR NO KEY UPDATE`: none of these statements changes a key, and a
//! plain `FOR UPDATE` on a batch row would conflict with the `FOR KEY SHARE` that the
//! foreign-key checks of new invitations take on their batch (in no particular order),
//! which deadlocked a prepare group against the recorder.
//!
//! Lock order everywhere: item rows (in id order), then per-(job, candidate) advisory
//! locks (in key order), then batch rows (in id order). Every change to an item's
//! status moves its batch's tally in the same statement.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::states::{BatchStatus, ItemStatus, JobStatus, OnDuplicate, string_enum};

/// An item with what delivering it needs to know, as phase 1 read it under the item's
/// row lock (the database type `prepare_item`). Phases 2 and 3 use this copy.
#[derive(Debug, Clone, sqlx::Type)]
#[sqlx(type_name = "prepare_item")]
pub(crate) struct PreparedItem {
    pub(crate) id: Uuid,
    pub(crate) batch_id: Uuid,
    pub(crate) task_id: String,
    pub(crate) status: ItemStatus,
    pub(crate) attempts: i32,
    pub(crate) candidate_id: String,
    pub(crate) email: String,
    pub(crate) name: Option<String>,
    pub(crate) invitation_id: Option<Uuid>,
    /// Why the address cannot be sent to, decided when it was written.
    pub(crate) email_error: Option<String>,
    pub(crate) job_id: String,
    pub(crate) job_title: String,
    pub(crate) job_status: JobStatus,
    pub(crate) batch_status: BatchStatus,
    pub(crate) on_duplicate: OnDuplicate,
    pub(crate) duration_minutes: i32,
    /// The `x-request-id` of the request that created the batch.
    pub(crate) request_id: Option<String>,
    /// The address is on the suppression list and the item was not retried on request.
    pub(crate) suppressed: bool,
}

/// One request of phase 1: the item, the task acting on it, and the invitation to mint
/// if the item has none yet (its id, from which the link is derived, and the SHA-256
/// of its token).
pub(crate) struct PrepareRequest<'a> {
    pub(crate) item: Uuid,
    pub(crate) task_id: &'a str,
    pub(crate) new_invitation_id: Uuid,
    pub(crate) token_hash: [u8; 32],
}

string_enum! {
    /// What phase 1 decided for one request (`prepare_items`' `decision`).
    PrepareDecision {
        /// The item is terminal, gone, or belongs to another task.
        Nothing = "nothing",
        /// The same task is in this group twice (it ran twice); the other run acts.
        SameTaskTwice = "duplicate",
        JobClosed = "job_closed",
        InvalidEmail = "invalid_email",
        /// The address is on the suppression list: it ends unsent.
        Suppressed = "suppressed",
        AlreadyInvited = "already_invited",
        /// The invitation exists and the attempt is counted: send now.
        Send = "send",
    }
}

/// What phase 1 decided for one request (see `prepare_items` in the migrations).
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct PrepareRow {
    /// 1-based position of the request.
    pub(crate) ord: i32,
    pub(crate) decision: PrepareDecision,
    /// For `invalid_email`: what is wrong with the address.
    pub(crate) detail: Option<String>,
    /// The item as locked (none for `nothing`).
    pub(crate) item: Option<PreparedItem>,
    /// For `send`: the invitation every attempt carries, and the attempt's number.
    pub(crate) invitation_id: Option<Uuid>,
    pub(crate) attempts: Option<i32>,
}

/// Phase 1 for a group in one call, one round trip and one commit: the database
/// function `prepare_items` (in the migrations) locks the items, takes the pair locks,
/// decides, mints and counts. Run it outside a transaction: the commit is its own.
/// One row per request, in request order.
pub(crate) async fn prepare_items(
    conn: &mut PgConnection,
    requests: &[PrepareRequest<'_>],
    ttl_hours: u32,
) -> sqlx::Result<Vec<PrepareRow>> {
    sqlx::query_as("SELECT * FROM prepare_items($1, $2, $3, $4, $5)")
        .bind(requests.iter().map(|r| r.item).collect::<Vec<_>>())
        .bind(requests.iter().map(|r| r.task_id).collect::<Vec<_>>())
        .bind(
            requests
                .iter()
                .map(|r| r.new_invitation_id)
                .collect::<Vec<_>>(),
        )
        .bind(
            requests
                .iter()
                .map(|r| r.token_hash.to_vec())
                .collect::<Vec<_>>(),
        )
        .bind(i32::try_from(ttl_hours).unwrap_or(i32::MAX))
        .fetch_all(&mut *conn)
        .await
}
