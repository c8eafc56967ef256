//! Phase 1 of a delivery, in groups (see [`super::group`]): everything that must be
//! committed before a message may leave.
//!
//! For each item of a group, in one transaction:
//! - lock it; nothing to do if it is terminal or belongs to another task now;
//! - mark its batch `running` if this is the batch's first item picked up;
//! - decide whether it ends without a send: the job is closed, the address is invalid,
//!   or (`on_duplicate: skip`) the candidate already holds a live invitation for the
//!   job. Those endings are recorded with the send outcomes, by the recorder;
//! - otherwise mint its invitation (once: later attempts reuse it, so every attempt
//!   carries the same link) and count the attempt.
//!
//! The duplicate check holds a lock per (job, candidate) until the commit, so two
//! batches racing for one candidate cannot both invite them; within a group, the
//! first item of a pair wins the same way. All of it is one call of the database
//! function `prepare_items` (see the migrations and `db::delivery`): one round trip
//! and one commit per group, whatever its size.

use std::sync::Arc;

use sqlx::{PgPool, Postgres, pool::PoolConnection};
use uuid::Uuid;

use crate::{
    config::Settings,
    db::{
        self,
        delivery::{self as sql, PrepareDecision, PrepareRequest, PrepareRow, PreparedItem},
    },
    domain::{states::ItemReason, token::LinkToken},
    queue::group::GroupWrite,
};

/// Phase 1 for one item, on behalf of one queue task.
#[derive(Debug, Clone)]
pub(crate) struct Prepare {
    pub(crate) item_id: Uuid,
    pub(crate) task_id: String,
}

/// What phase 1 decided for an item.
#[derive(Debug)]
pub(crate) enum Prepared {
    /// Terminal already, handed to another task, or gone: the task is over.
    NothingToDo,
    /// The same task is in this group twice (it ran twice); the other run acts, and
    /// finishes the task.
    SameTaskTwice,
    /// The item ends without a send; the recorder writes the ending.
    NotSent {
        item: Box<PreparedItem>,
        reason: ItemReason,
        detail: Option<String>,
    },
    /// Send it now: the invitation exists and the attempt is counted.
    Send {
        item: Box<PreparedItem>,
        invitation_id: Uuid,
        attempt: i32,
    },
}

/// Writes groups of phase 1.
pub(crate) struct Preparer {
    pub(crate) pool: PgPool,
    pub(crate) settings: Arc<Settings>,
}

impl GroupWrite for Preparer {
    type Request = Prepare;
    type Response = Prepared;
    type Conn = PoolConnection<Postgres>;
    const NAME: &'static str = "prepare";

    /// A task that ran twice must meet its other run in one transaction to act once.
    fn key(request: &Prepare) -> Option<u128> {
        Some(request.item_id.as_u128())
    }

    async fn connect(&self) -> anyhow::Result<Self::Conn> {
        Ok(db::writer_connection(&self.pool).await?)
    }

    /// One call of [`sql::prepare_items`]. Every request brings the invitation it
    /// would mint (an id and its token's hash, derived here where the secret is); the
    /// database uses it only for an item that has none yet.
    async fn write(
        &self,
        conn: &mut PoolConnection<Postgres>,
        group: &[Prepare],
    ) -> anyhow::Result<Vec<Prepared>> {
        let secret = self.settings.invite.token_secret.expose().as_bytes();
        let requests: Vec<PrepareRequest<'_>> = group
            .iter()
            .map(|p| {
                let new_invitation_id = Uuid::now_v7();
                PrepareRequest {
                    item: p.item_id,
                    task_id: &p.task_id,
                    new_invitation_id,
                    token_hash: LinkToken::derive(secret, new_invitation_id).hash(),
                }
            })
            .collect();
        // The call commits by itself. A failure after it (a row that does not decode or
        // map) makes the group writer write the group again, which counts the attempts
        // again: only a mismatch between this code and the function can cause one.
        let rows = sql::prepare_items(conn, &requests, self.settings.invite.ttl_hours).await?;
        anyhow::ensure!(
            rows.len() == group.len()
                && rows
                    .iter()
                    .enumerate()
                    .all(|(n, row)| usize::try_from(row.ord).ok() == Some(n + 1)),
            "prepare_items answered {} rows for {} requests, or out of order",
            rows.len(),
            group.len()
        );
        rows.into_iter().map(prepared).collect()
    }
}

/// One row of `prepare_items` as what the task does next.
fn prepared(row: PrepareRow) -> anyhow::Result<Prepared> {
    let not_sent = |item: Option<PreparedItem>, reason, detail| -> anyhow::Result<Prepared> {
        Ok(Prepared::NotSent {
            item: Box::new(item.ok_or_else(|| anyhow::anyhow!("prepare_items: no item"))?),
            reason,
            detail,
        })
    };
    match row.decision {
        PrepareDecision::Nothing => Ok(Prepared::NothingToDo),
        PrepareDecision::SameTaskTwice => Ok(Prepared::SameTaskTwice),
        PrepareDecision::JobClosed => not_sent(row.item, ItemReason::JobClosed, None),
        PrepareDecision::InvalidEmail => not_sent(row.item, ItemReason::InvalidEmail, row.detail),
        PrepareDecision::AlreadyInvited => not_sent(row.item, ItemReason::AlreadyInvited, None),
        PrepareDecision::Suppressed => not_sent(
            row.item,
            ItemReason::Suppressed,
            Some(
                "the address is on the suppression list: a mail server refused it as a bad mailbox"
                    .into(),
            ),
        ),
        PrepareDecision::Send => match (row.item, row.invitation_id, row.attempts) {
            (Some(item), Some(invitation_id), Some(attempt)) => Ok(Prepared::Send {
                item: Box::new(item),
                invitation_id,
                attempt,
            }),
            _ => anyhow::bail!("prepare_items: a send without its invitation"),
        },
    }
}
