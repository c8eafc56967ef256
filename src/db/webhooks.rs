//! Webhooks: endpoints, events, and deliveries, which are also the delivery queue.
//!
//! An event is written by the statement (or in the transaction) that makes the change
//! it reports: `webhook_emit` and the `webhook_*` resource functions of the migration,
//! called from the SQL of the change. Its deliveries, one per enabled endpoint
//! subscribed to its type, are inserted by a trigger on `webhook_events` in that same
//! statement, which also wakes the delivery loops (`NOTIFY webhook_deliveries`) on
//! commit. So an event exists exactly when its change does, and reaches every endpoint
//! subscribed at that moment.
//!
//! The delivery loop (`queue::webhooks`) claims due deliveries with `FOR UPDATE SKIP
//! LOCKED` under a lease (`locked_until`): a claim whose process died is claimed again
//! once its lease has passed, so delivery is at least once.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgExecutor, PgPool};
use uuid::Uuid;

use crate::domain::{
    access::{Actor, AuditAction},
    webhook::{DeliveryStatus, EventType, new_secret},
};

/// The name of the `NOTIFY` channel new deliveries are announced on.
pub const CHANNEL: &str = "webhook_deliveries";

/// The advisory lock the link sweep holds (`pg_try_advisory_xact_lock`).
pub const SWEEP_LOCK_KEY: i64 = 0x696e_7669_7465_7203;

/// An endpoint, as the API shows it (never its secret).
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub(crate) struct Endpoint {
    pub(crate) id: Uuid,
    pub(crate) url: String,
    pub(crate) events: Vec<EventType>,
    pub(crate) description: String,
    /// False once the endpoint answered 410 Gone: no event goes to it any more.
    pub(crate) enabled: bool,
    pub(crate) disabled_at: Option<DateTime<Utc>>,
    pub(crate) disabled_reason: Option<String>,
    /// The name of the API key that created it.
    pub(crate) created_by: String,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) secret_rotated_at: Option<DateTime<Utc>>,
}

/// The columns of an [`Endpoint`], for `concat!`.
macro_rules! endpoint_columns {
    () => {
        "id, url, events, description, disabled_at IS NULL AS enabled, disabled_at, \
         disabled_reason, created_by, created_at, secret_rotated_at"
    };
}

/// A new endpoint.
pub(crate) struct NewEndpoint<'a> {
    pub(crate) url: &'a str,
    pub(crate) events: &'a [EventType],
    pub(crate) description: &'a str,
}

/// Creates an endpoint with a new secret, as `actor`, unless `max` endpoints exist
/// already (`None`); answers it and its secret (shown only this once). Every event is
/// fanned out to every subscribed endpoint in the transaction that writes it, so their
/// number is bounded.
pub(crate) async fn create(
    pool: &PgPool,
    new: &NewEndpoint<'_>,
    max: usize,
    actor: &Actor,
    created_by: &str,
) -> sqlx::Result<Option<(Endpoint, String)>> {
    let secret = new_secret();
    let mut tx = pool.begin().await?;
    // Two creations at once must not both see room for one more; readers go on.
    sqlx::query("LOCK TABLE webhook_endpoints IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_endpoints")
        .fetch_one(&mut *tx)
        .await?;
    if usize::try_from(count).unwrap_or(usize::MAX) >= max {
        return Ok(None);
    }
    let endpoint: Endpoint = sqlx::query_as(concat!(
        "INSERT INTO webhook_endpoints (id, url, events, description, secret, created_by)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING ",
        endpoint_columns!(),
        ""
    ))
    .bind(Uuid::now_v7())
    .bind(new.url)
    .bind(new.events.iter().map(|e| e.as_str()).collect::<Vec<_>>())
    .bind(new.description)
    .bind(&secret)
    .bind(created_by)
    .fetch_one(&mut *tx)
    .await?;
    let detail = serde_json::json!({ "host": host_of(&endpoint.url), "events": endpoint.events });
    super::audit::record(
        &mut tx,
        actor,
        AuditAction::WebhookCreated,
        &endpoint.id.to_string(),
        detail,
    )
    .await?;
    tx.commit().await?;
    Ok(Some((endpoint, secret)))
}

/// Every endpoint, oldest first.
pub(crate) async fn list(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<Endpoint>> {
    sqlx::query_as(concat!(
        "SELECT ",
        endpoint_columns!(),
        " FROM webhook_endpoints ORDER BY created_at, id"
    ))
    .fetch_all(db)
    .await
}

pub(crate) async fn get(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<Endpoint>> {
    sqlx::query_as(concat!(
        "SELECT ",
        endpoint_columns!(),
        " FROM webhook_endpoints WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(db)
    .await
}

/// Deletes an endpoint with its delivery log, as `actor`; false if there is none.
pub(crate) async fn delete(pool: &PgPool, id: Uuid, actor: &Actor) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let url: Option<String> =
        sqlx::query_scalar("DELETE FROM webhook_endpoints WHERE id = $1 RETURNING url")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(url) = url else {
        return Ok(false);
    };
    let detail = serde_json::json!({ "host": host_of(&url) });
    super::audit::record(
        &mut tx,
        actor,
        AuditAction::WebhookDeleted,
        &id.to_string(),
        detail,
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Gives the endpoint a new secret, as `actor`: every attempt from now on, retries of
/// earlier events included, is signed with it. `None` if there is no such endpoint.
pub(crate) async fn rotate_secret(
    pool: &PgPool,
    id: Uuid,
    actor: &Actor,
) -> sqlx::Result<Option<(Endpoint, String)>> {
    let secret = new_secret();
    let mut tx = pool.begin().await?;
    let endpoint: Option<Endpoint> = sqlx::query_as(concat!(
        "UPDATE webhook_endpoints SET secret = $2, secret_rotated_at = now()
          WHERE id = $1 RETURNING ",
        endpoint_columns!(),
        ""
    ))
    .bind(id)
    .bind(&secret)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(endpoint) = endpoint else {
        return Ok(None);
    };
    let target = id.to_string();
    let action = AuditAction::WebhookSecretRotated;
    super::audit::record(&mut tx, actor, action, &target, serde_json::json!({})).await?;
    tx.commit().await?;
    Ok(Some((endpoint, secret)))
}

/// One attempt of a delivery.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub(crate) struct AttemptView {
    pub(crate) number: i32,
    pub(crate) started_at: DateTime<Utc>,
    /// The answer's status; null for a timeout, a connection error or a refused target.
    pub(crate) status_code: Option<i32>,
    pub(crate) duration_ms: i32,
    pub(crate) error: Option<String>,
}

/// One event's delivery to one endpoint, with its attempts (oldest first).
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub(crate) struct DeliveryView {
    pub(crate) id: Uuid,
    /// The event's id: the `webhook-id` header of every attempt.
    pub(crate) event_id: String,
    pub(crate) event_type: EventType,
    pub(crate) status: DeliveryStatus,
    /// Attempts made so far.
    pub(crate) attempts: i32,
    /// When the next attempt is due (pending deliveries only).
    pub(crate) next_attempt_at: Option<DateTime<Utc>>,
    pub(crate) last_status_code: Option<i32>,
    pub(crate) last_duration_ms: Option<i32>,
    pub(crate) last_error: Option<String>,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) finished_at: Option<DateTime<Utc>>,
    #[sqlx(json)]
    #[serde(rename = "attempts_made")]
    pub(crate) attempt_log: Vec<AttemptView>,
}

/// The endpoint's deliveries, newest first, at most `limit`, optionally of one status;
/// `None` if there is no such endpoint.
pub(crate) async fn deliveries(
    conn: &mut PgConnection,
    endpoint: Uuid,
    status: Option<DeliveryStatus>,
    limit: i64,
) -> sqlx::Result<Option<Vec<DeliveryView>>> {
    deliveries_where(conn, endpoint, status, None, limit).await
}

/// Its deliveries, or the one delivery `only`, as [`deliveries`] shows them.
async fn deliveries_where(
    conn: &mut PgConnection,
    endpoint: Uuid,
    status: Option<DeliveryStatus>,
    only: Option<Uuid>,
    limit: i64,
) -> sqlx::Result<Option<Vec<DeliveryView>>> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM webhook_endpoints WHERE id = $1)")
            .bind(endpoint)
            .fetch_one(&mut *conn)
            .await?;
    if !exists {
        return Ok(None);
    }
    let rows = sqlx::query_as(
        "SELECT d.id, d.event_id, e.type AS event_type, d.status, d.attempts,
                d.next_attempt_at, d.last_status_code, d.last_duration_ms, d.last_error,
                d.created_at, d.finished_at,
                coalesce((SELECT jsonb_agg(jsonb_build_object(
                                    'number', a.number,
                                    'started_at', webhook_time(a.started_at),
                                    'status_code', a.status_code,
                                    'duration_ms', a.duration_ms,
                                    'error', a.error) ORDER BY a.number)
                            FROM webhook_attempts a WHERE a.delivery_id = d.id),
                         '[]'::jsonb) AS attempt_log
           FROM webhook_deliveries d
           JOIN webhook_events e ON e.id = d.event_id
          WHERE d.endpoint_id = $1 AND ($2::text IS NULL OR d.status = $2)
            AND ($4::uuid IS NULL OR d.id = $4)
          ORDER BY d.created_at DESC, d.id DESC
          LIMIT $3",
    )
    .bind(endpoint)
    .bind(status)
    .bind(limit)
    .bind(only)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some(rows))
}

/// What a replay found.
pub(crate) enum Replay {
    /// A new delivery of the same event (same `webhook-id`), due now.
    Queued(DeliveryView),
    /// No such endpoint, or no such delivery of it.
    NotFound,
    /// The endpoint is disabled: nothing is sent to it.
    Disabled,
}

/// Queues the event of delivery `delivery` to endpoint `endpoint` once more, as a new
/// delivery due now, as `actor`.
pub(crate) async fn replay(
    pool: &PgPool,
    endpoint: Uuid,
    delivery: Uuid,
    actor: &Actor,
) -> sqlx::Result<Replay> {
    let mut tx = pool.begin().await?;
    let found: Option<(String, bool)> = sqlx::query_as(
        "SELECT d.event_id, w.disabled_at IS NULL
           FROM webhook_deliveries d
           JOIN webhook_endpoints w ON w.id = d.endpoint_id
          WHERE d.id = $2 AND d.endpoint_id = $1
            FOR SHARE OF w",
    )
    .bind(endpoint)
    .bind(delivery)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((event_id, enabled)) = found else {
        return Ok(Replay::NotFound);
    };
    if !enabled {
        return Ok(Replay::Disabled);
    }
    let id: Uuid = sqlx::query_scalar(
        "INSERT INTO webhook_deliveries (event_id, endpoint_id, next_attempt_at)
         VALUES ($1, $2, now()) RETURNING id",
    )
    .bind(&event_id)
    .bind(endpoint)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(CHANNEL)
        .execute(&mut *tx)
        .await?;
    let detail =
        serde_json::json!({ "endpoint_id": endpoint, "event_id": event_id, "replay_of": delivery });
    let action = AuditAction::WebhookDeliveryReplayed;
    super::audit::record(&mut tx, actor, action, &id.to_string(), detail).await?;
    tx.commit().await?;
    let view = deliveries_where(&mut *pool.acquire().await?, endpoint, None, Some(id), 1)
        .await?
        .and_then(|one| one.into_iter().next());
    Ok(view.map_or(Replay::NotFound, Replay::Queued))
}

/// Writes an event about batch `batch` (its resource as it is now) in the open
/// transaction `conn`, if anyone subscribes to `kind`.
pub(crate) async fn emit_batch(
    conn: &mut PgConnection,
    kind: EventType,
    batch: Uuid,
) -> sqlx::Result<()> {
    sqlx::query("SELECT webhook_emit($1, webhook_batch(b)) FROM batches b WHERE b.id = $2")
        .bind(kind)
        .bind(batch)
        .execute(conn)
        .await?;
    Ok(())
}

/// Writes an event about invitation `invitation` (its resource as it is now) in the
/// open transaction `conn`, if anyone subscribes to `kind`.
pub(crate) async fn emit_invitation(
    conn: &mut PgConnection,
    kind: EventType,
    invitation: Uuid,
) -> sqlx::Result<()> {
    sqlx::query(
        "SELECT webhook_emit($1, webhook_invitation(v)) FROM invitations v WHERE v.id = $2",
    )
    .bind(kind)
    .bind(invitation)
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks up to `limit` sent PENDING links past their `expires_at` as EXPIRED (a link
/// not sent yet expires from when it is sent), each with its
/// `invitation.expired` event, in one transaction; `None` when another process is
/// sweeping (the advisory lock [`SWEEP_LOCK_KEY`]).
pub async fn expire_invitations(pool: &PgPool, limit: i64) -> sqlx::Result<Option<u64>> {
    let mut tx = pool.begin().await?;
    let ours: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(SWEEP_LOCK_KEY)
        .fetch_one(&mut *tx)
        .await?;
    if !ours {
        return Ok(None);
    }
    let (expired, _events): (i64, i64) = sqlx::query_as(
        "WITH due AS (
            SELECT id FROM invitations
             WHERE status = 'PENDING' AND sent_at IS NOT NULL AND expires_at <= now()
             ORDER BY expires_at
             LIMIT $1
               FOR NO KEY UPDATE SKIP LOCKED),
         expired AS (
            UPDATE invitations v SET status = 'EXPIRED'
              FROM due WHERE v.id = due.id
            RETURNING webhook_invitation(v) AS data)
         SELECT count(*), count(webhook_emit('invitation.expired', data)) FROM expired",
    )
    .bind(limit)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(u64::try_from(expired).unwrap_or(0)))
}

/// Deletes up to `limit` events written more than `days` ago none of whose deliveries
/// is still pending or on its way (their delivery log goes with them).
pub async fn delete_old_events(pool: &PgPool, days: u32, limit: i64) -> sqlx::Result<u64> {
    let deleted = sqlx::query(
        "DELETE FROM webhook_events
          WHERE id IN (SELECT e.id FROM webhook_events e
                        WHERE e.created_at < now() - make_interval(days => $1)
                          AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d
                                           WHERE d.event_id = e.id
                                             AND d.status IN ('pending', 'sending'))
                        ORDER BY e.created_at
                        LIMIT $2)",
    )
    .bind(i32::try_from(days).unwrap_or(i32::MAX))
    .bind(limit)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(deleted)
}

/// A delivery claimed for one attempt: what to send, where, and how to sign it. Its
/// `Debug` leaves out the secret and the URL's path (a receiver may put a token there).
#[derive(Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: Uuid,
    pub event_id: String,
    pub endpoint_id: Uuid,
    /// This attempt's number (1 for the first).
    pub attempt: i32,
    pub body: String,
    pub url: String,
    pub secret: String,
    /// The endpoint was disabled since the delivery was queued: record it as failed,
    /// do not send it.
    pub disabled: bool,
}

impl std::fmt::Debug for Claimed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claimed")
            .field("id", &self.id)
            .field("event_id", &self.event_id)
            .field("endpoint_id", &self.endpoint_id)
            .field("attempt", &self.attempt)
            .field("host", &host_of(&self.url))
            .field("disabled", &self.disabled)
            .finish_non_exhaustive()
    }
}

/// Claims up to `limit` due deliveries for one attempt each, for `lease`: pending ones
/// whose time has come and claims whose lease ran out (their process died), taking
/// at most `per_endpoint` in flight to any one endpoint (across processes, counting
/// live claims), endpoints in turn.
pub async fn claim(
    pool: &PgPool,
    limit: usize,
    per_endpoint: usize,
    lease: Duration,
) -> sqlx::Result<Vec<Claimed>> {
    sqlx::query_as(include_str!("sql/claim_webhook_deliveries.sql"))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(i64::try_from(per_endpoint).unwrap_or(i64::MAX))
        .bind(lease.as_secs_f64())
        .fetch_all(pool)
        .await
}

/// What one attempt ended in.
#[derive(Debug, Clone)]
pub struct AttemptResult {
    pub started_at: DateTime<Utc>,
    pub duration: Duration,
    /// The answer's status code, if there was an answer.
    pub status_code: Option<u16>,
    /// What went wrong (a non-2xx answer, a timeout, a connection error, a refused
    /// target); none on success.
    pub error: Option<String>,
}

/// What recording an attempt did with its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Succeeded,
    /// Another attempt is due after this wait.
    RetryAfter(Duration),
    /// The retry schedule is used up.
    Failed,
    /// 410 Gone: the delivery failed and the endpoint is disabled.
    EndpointDisabled,
    /// The endpoint had been disabled (another delivery got 410): failed, not retried.
    EndpointWasDisabled,
    /// The claim was no longer ours (its lease ran out and another process took it):
    /// nothing was written.
    Stale,
}

/// Records `result` of the attempt `claimed`, in one transaction: the attempt's row,
/// the delivery's new state (succeeded; pending again after `retry_schedule[n - 1]` for
/// attempt n; failed when the schedule is used up), and on 410 Gone the endpoint
/// disabled (as `worker`, in the audit log) with its other deliveries failed.
pub async fn record_attempt(
    pool: &PgPool,
    claimed: &Claimed,
    result: &AttemptResult,
    retry_schedule: &[Duration],
    worker: &Actor,
) -> sqlx::Result<Recorded> {
    let gone = result.status_code == Some(410);
    let ok = result.status_code.is_some_and(|c| (200..300).contains(&c));
    let wait = usize::try_from(claimed.attempt - 1)
        .ok()
        .and_then(|i| retry_schedule.get(i))
        .copied();
    let outcome = match (ok, gone, wait) {
        (true, _, _) => Recorded::Succeeded,
        (false, true, _) => Recorded::EndpointDisabled,
        (false, false, Some(wait)) => Recorded::RetryAfter(wait),
        (false, false, None) => Recorded::Failed,
    };
    let status = match outcome {
        Recorded::Succeeded => DeliveryStatus::Succeeded,
        Recorded::RetryAfter(_) => DeliveryStatus::Pending,
        _ => DeliveryStatus::Failed,
    };
    let retry_in = match outcome {
        Recorded::RetryAfter(wait) => Some(wait.as_secs_f64()),
        _ => None,
    };
    let duration_ms = i32::try_from(result.duration.as_millis()).unwrap_or(i32::MAX);
    let status_code = result.status_code.map(i32::from);
    let mut tx = pool.begin().await?;
    // No retry for an endpoint disabled meanwhile (another delivery to it got 410
    // while this one was in flight): the delivery fails here.
    let updated: Option<DeliveryStatus> = sqlx::query_scalar(
        "WITH settled AS (
            SELECT CASE WHEN $3 = 'pending' AND w.disabled_at IS NOT NULL THEN 'failed'
                        ELSE $3 END AS status
              FROM webhook_endpoints w WHERE w.id = $8)
         UPDATE webhook_deliveries d
            SET status = s.status, locked_until = NULL,
                next_attempt_at = CASE WHEN s.status = 'pending'
                                       THEN now() + make_interval(secs => $4) END,
                finished_at = CASE WHEN s.status IN ('succeeded', 'failed') THEN now() END,
                last_status_code = $5, last_error = $6, last_duration_ms = $7
           FROM settled s
          WHERE d.id = $1 AND d.status = 'sending' AND d.attempts = $2
         RETURNING d.status",
    )
    .bind(claimed.id)
    .bind(claimed.attempt)
    .bind(status)
    .bind(retry_in)
    .bind(status_code)
    .bind(result.error.as_deref())
    .bind(duration_ms)
    .bind(claimed.endpoint_id)
    .fetch_optional(&mut *tx)
    .await?;
    let outcome = match updated {
        None => return Ok(Recorded::Stale),
        Some(DeliveryStatus::Failed)
            if claimed.disabled || matches!(outcome, Recorded::RetryAfter(_)) =>
        {
            Recorded::EndpointWasDisabled
        }
        Some(_) => outcome,
    };
    sqlx::query(
        "INSERT INTO webhook_attempts (delivery_id, number, started_at, status_code,
                                       duration_ms, error)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
    )
    .bind(claimed.id)
    .bind(claimed.attempt)
    .bind(result.started_at)
    .bind(status_code)
    .bind(duration_ms)
    .bind(result.error.as_deref())
    .execute(&mut *tx)
    .await?;
    if outcome == Recorded::EndpointDisabled {
        let disabled = sqlx::query(
            "UPDATE webhook_endpoints
                SET disabled_at = now(), disabled_reason = 'the endpoint answered 410 Gone'
              WHERE id = $1 AND disabled_at IS NULL",
        )
        .bind(claimed.endpoint_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query(
            "UPDATE webhook_deliveries
                SET status = 'failed', next_attempt_at = NULL, locked_until = NULL,
                    finished_at = now(),
                    last_error = 'not sent: the endpoint is disabled (410 Gone)'
              WHERE endpoint_id = $1
                AND (status = 'pending' OR (status = 'sending' AND locked_until <= now()))",
        )
        .bind(claimed.endpoint_id)
        .execute(&mut *tx)
        .await?;
        if disabled > 0 {
            let detail = serde_json::json!({ "reason": "410 Gone", "event_id": claimed.event_id });
            let target = claimed.endpoint_id.to_string();
            super::audit::record(
                &mut tx,
                worker,
                AuditAction::WebhookDisabled,
                &target,
                detail,
            )
            .await?;
        }
    }
    tx.commit().await?;
    Ok(outcome)
}

/// The host of an endpoint URL, for logs and the audit log: the rest of a URL may carry
/// a token of the receiver's.
pub fn host_of(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Per endpoint: (endpoint id, pending deliveries, failed deliveries).
pub(crate) async fn delivery_counts(
    db: impl PgExecutor<'_>,
) -> sqlx::Result<Vec<(Uuid, i64, i64)>> {
    sqlx::query_as(
        "SELECT endpoint_id,
                count(*) FILTER (WHERE status = 'pending'),
                count(*) FILTER (WHERE status = 'failed')
           FROM webhook_deliveries
          WHERE status IN ('pending', 'failed')
          GROUP BY endpoint_id",
    )
    .fetch_all(db)
    .await
}
