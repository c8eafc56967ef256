//! Candidate erasure: a candidate's email and name leave every table that held them.

use std::time::Duration;

use sqlx::PgConnection;
use uuid::Uuid;

/// What an erasure did.
#[derive(Debug)]
pub(crate) enum Erasure {
    /// The candidate's items are erased; this many held data until now (0 when they
    /// were all erased before).
    Erased(i64),
    /// No item ever had this candidate id.
    NotFound,
    /// A send to one of the candidate's items is on its way: try again shortly, so the
    /// item ends as what really happened to it (as a cancel does).
    SendsInFlight,
}

/// Erases candidate `candidate_id` in the open transaction `tx` (the caller commits,
/// with the audit record): every item of theirs loses its email and name (and replies
/// the addresses they quote), a pending one is skipped as `cancelled` and never sent,
/// every PENDING link of theirs is revoked, tallies move exactly as the items do, the
/// batches' warnings and the suppression list forget their addresses
/// (`sql/erase_candidate.sql`). Sends on their way (`sending_at` within `in_flight`)
/// are waited for by the caller.
///
/// Locks the candidate's items first (in id order, `FOR NO KEY UPDATE` as the worker
/// does), then their invitations and batches.
pub(crate) async fn erase(
    tx: &mut PgConnection,
    candidate_id: &str,
    in_flight: Duration,
) -> sqlx::Result<Erasure> {
    let items: Vec<(Uuid, bool)> = sqlx::query_as(
        "SELECT id, coalesce(status = 'pending'
                             AND sending_at > now() - make_interval(secs => $2), false)
           FROM batch_items WHERE candidate_id = $1
          ORDER BY id FOR NO KEY UPDATE",
    )
    .bind(candidate_id)
    .bind(in_flight.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    if items.is_empty() {
        return Ok(Erasure::NotFound);
    }
    if items.iter().any(|(_, sending)| *sending) {
        return Ok(Erasure::SendsInFlight);
    }
    let ids: Vec<Uuid> = items.into_iter().map(|(id, _)| id).collect();
    let held_data: i64 = sqlx::query_scalar(include_str!("sql/erase_candidate.sql"))
        .bind(candidate_id)
        .bind(&ids)
        .fetch_one(&mut *tx)
        .await?;
    Ok(Erasure::Erased(held_data))
}
