-- Webhooks (operations.md §4): endpoints, the events written in the transaction of the
-- change that causes them, and one delivery per (event, subscribed endpoint), which is
-- also the delivery queue (see queue::webhooks).

-- An endpoint the web app registered. The secret is stored as given out (`whsec_` and
-- base64 of 24 random bytes): signing needs the key itself, so it cannot be hashed like
-- an API key (SECURITY.md). An endpoint answering 410 Gone is disabled, not deleted.
CREATE TABLE webhook_endpoints (
    id               uuid        PRIMARY KEY,
    url              text        NOT NULL CHECK (length(url) <= 2048),
    events           text[]      NOT NULL CHECK (cardinality(events) > 0),
    description      text        NOT NULL DEFAULT '' CHECK (length(description) <= 1000),
    secret           text        NOT NULL CHECK (secret LIKE 'whsec\_%'),
    created_at       timestamptz NOT NULL DEFAULT now(),
    created_by       text        NOT NULL,
    secret_rotated_at timestamptz,
    disabled_at      timestamptz,
    disabled_reason  text,
    CONSTRAINT webhook_endpoint_disabled CHECK ((disabled_at IS NULL) = (disabled_reason IS NULL))
);

-- One event. `id` is the `webhook-id` header: the same on every attempt and replay.
-- `payload` is the whole body ({"type", "timestamp", "data"}); it holds ids and states,
-- no email address or name.
CREATE TABLE webhook_events (
    id          text        PRIMARY KEY CHECK (id LIKE 'msg\_%'),
    type        text        NOT NULL CHECK (type IN ('batch.completed', 'batch.cancelled',
                                 'item.failed', 'invitation.redeemed',
                                 'invitation.completed', 'invitation.expired')),
    payload     jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_events_created ON webhook_events (created_at);

-- One event to one endpoint, with the state of its delivery:
--   pending -> sending (claimed, `locked_until` bounds the claim) -> succeeded
--                                                            \-> pending (retry at next_attempt_at)
--                                                            \-> failed (schedule used up, 410, endpoint disabled)
-- A claim whose process died is taken again once `locked_until` has passed.
CREATE TABLE webhook_deliveries (
    id               uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    event_id         text        NOT NULL REFERENCES webhook_events (id) ON DELETE CASCADE,
    endpoint_id      uuid        NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    status           text        NOT NULL DEFAULT 'pending'
                                 CHECK (status IN ('pending', 'sending', 'succeeded', 'failed')),
    attempts         integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at  timestamptz,
    locked_until     timestamptz,
    last_status_code integer,
    last_error       text,
    last_duration_ms integer,
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    CONSTRAINT webhook_delivery_due CHECK ((status = 'pending') = (next_attempt_at IS NOT NULL)),
    CONSTRAINT webhook_delivery_claimed CHECK ((status = 'sending') = (locked_until IS NOT NULL)),
    CONSTRAINT webhook_delivery_finished CHECK ((status IN ('succeeded', 'failed')) = (finished_at IS NOT NULL))
);
-- What the delivery loop claims: due pending rows, and claims that ran out.
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_claimed ON webhook_deliveries (locked_until) WHERE status = 'sending';
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, created_at DESC);
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_id);

-- Every attempt of a delivery: the answer's status code (none for a timeout or a
-- connection error), how long it took, and what went wrong.
CREATE TABLE webhook_attempts (
    delivery_id  uuid        NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    number       integer     NOT NULL CHECK (number >= 1),
    started_at   timestamptz NOT NULL,
    status_code  integer,
    duration_ms  integer     NOT NULL CHECK (duration_ms >= 0),
    error        text,
    PRIMARY KEY (delivery_id, number)
);

-- The link sweep (queue::maintenance) stores EXPIRED, so `invitation.expired` is sent
-- once: PENDING -> EXPIRED when expires_at has passed after the link was sent. (A link
-- not sent yet belongs to an item still being retried: its expiry restarts when it is
-- sent, so the sweep leaves it alone. Its index says so too, which also keeps the
-- revoke of record_outcomes, `status = 'PENDING'` by id, off this index.)
ALTER TABLE invitations DROP CONSTRAINT invitations_status_check;
ALTER TABLE invitations ADD CONSTRAINT invitations_status_check
    CHECK (status IN ('PENDING', 'IN_PROGRESS', 'COMPLETED', 'REVOKED', 'EXPIRED'));
CREATE INDEX invitations_sent_expiry ON invitations (expires_at)
    WHERE status = 'PENDING' AND sent_at IS NOT NULL;

-- A `webhook-id`: `msg_` and a ULID (48-bit milliseconds, 80 random bits, Crockford
-- base32), so ids sort by creation time.
CREATE FUNCTION webhook_message_id() RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    alphabet constant text := '0123456789ABCDEFGHJKMNPQRSTVWXYZ';
    ms bigint := floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint;
    id text := 'msg_';
BEGIN
    FOR i IN REVERSE 9..0 LOOP
        id := id || substr(alphabet, ((ms >> (i * 5)) & 31)::int + 1, 1);
    END LOOP;
    FOR i IN 1..16 LOOP
        id := id || substr(alphabet, floor(random() * 32)::int + 1, 1);
    END LOOP;
    RETURN id;
END
$$;

-- RFC 3339 in UTC with microseconds, as the API's JSON writes timestamps.
CREATE FUNCTION webhook_time(t timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;

-- Whether any enabled endpoint subscribes to events of `kind`: events nobody would
-- receive are not written.
CREATE FUNCTION webhook_subscribed(kind text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM webhook_endpoints
                    WHERE disabled_at IS NULL AND kind = ANY(events))
$$;

-- The event body: {"type", "timestamp", "data"}.
CREATE FUNCTION webhook_body(kind text, data jsonb) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('type', kind, 'timestamp', webhook_time(now()), 'data', data)
$$;

-- The batch resource as `GET /v1/batches/{id}` gives it, except in the warnings: an
-- `invalid_email` warning quotes the address as it was given (perhaps a name typed into
-- the email field), so its message becomes a fixed text, and anything else that looks
-- like an address becomes `[erased]`: an event holds no address.
CREATE FUNCTION webhook_batch(b batches) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'id', b.id, 'job_id', b.job_id, 'duration_minutes', b.duration_minutes,
        'on_duplicate', b.on_duplicate, 'status', b.status, 'total', b.total,
        'counts', jsonb_build_object('pending', b.pending, 'sent', b.sent,
                                     'failed', b.failed, 'skipped', b.skipped),
        'summary', b.sent || ' sent, ' || b.failed || ' failed'
                   || CASE WHEN b.skipped > 0 THEN ', ' || b.skipped || ' skipped' ELSE '' END,
        'warnings', coalesce((SELECT jsonb_agg(
                                  CASE WHEN w ->> 'code' = 'invalid_email'
                                       THEN jsonb_set(w, '{message}',
                                                      to_jsonb('the address cannot be emailed'::text))
                                       WHEN w ? 'message'
                                       THEN jsonb_set(w, '{message}',
                                                      to_jsonb(erase_addresses(w ->> 'message')))
                                       ELSE w END ORDER BY n)
                                FROM jsonb_array_elements(b.warnings) WITH ORDINALITY AS e(w, n)),
                             '[]'::jsonb),
        'created_by', b.created_by,
        'created_at', webhook_time(b.created_at),
        'completed_at', webhook_time(b.completed_at),
        'cancelled_at', webhook_time(b.cancelled_at))
$$;

-- An item as `GET /v1/batches/{id}/items` gives it, without email and name (the web app
-- knows its candidates by id), with its batch's id, and addresses in the last error
-- replaced by `[erased]`.
CREATE FUNCTION webhook_item(i batch_items) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'batch_id', i.batch_id, 'candidate_id', i.candidate_id, 'status', i.status,
        'reason', i.reason, 'attempts', i.attempts,
        'last_error', erase_addresses(i.last_error), 'invitation_id', i.invitation_id,
        'updated_at', webhook_time(i.updated_at))
$$;

-- The invitation resource as `GET /v1/invitations/{id}` gives it.
CREATE FUNCTION webhook_invitation(v invitations) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'id', v.id, 'job_id', v.job_id, 'candidate_id', v.candidate_id,
        'batch_id', v.batch_id, 'status', invitation_status_now(v.status, v.expires_at),
        'duration_minutes', v.duration_minutes, 'sent_at', webhook_time(v.sent_at),
        'expires_at', webhook_time(v.expires_at), 'redeemed_at', webhook_time(v.redeemed_at))
$$;

-- Fan-out: every new event gets one delivery per enabled endpoint subscribed to its
-- type, in the inserting statement (and so in its transaction), and the delivery loops
-- are woken when it commits (notifications repeated in one transaction are sent once).
-- A row trigger, so that a statement writing no event (most outcome groups) fires
-- nothing.
CREATE FUNCTION webhook_fan_out() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_deliveries (event_id, endpoint_id, next_attempt_at)
    SELECT NEW.id, w.id, now()
      FROM webhook_endpoints w
     WHERE w.disabled_at IS NULL AND NEW.type = ANY(w.events);
    IF FOUND THEN
        PERFORM pg_notify('webhook_deliveries', '');
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER webhook_events_fan_out AFTER INSERT ON webhook_events
    FOR EACH ROW EXECUTE FUNCTION webhook_fan_out();

-- Writes one event of `kind` about `data` if anyone subscribes to it; its id, or null.
CREATE FUNCTION webhook_emit(kind text, data jsonb) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    msg text;
BEGIN
    IF data IS NULL OR NOT webhook_subscribed(kind) THEN
        RETURN NULL;
    END IF;
    INSERT INTO webhook_events (id, type, payload)
    VALUES (webhook_message_id(), kind, webhook_body(kind, data))
    RETURNING id INTO msg;
    RETURN msg;
END
$$;

-- A worker process acting on its own is an actor too: `worker:<name>` disables an
-- endpoint that answered 410 Gone.
ALTER TABLE audit_log DROP CONSTRAINT audit_log_actor_check;
ALTER TABLE audit_log ADD CONSTRAINT audit_log_actor_check
    CHECK (actor ~ '^(key|operator|cli|worker):.+');
