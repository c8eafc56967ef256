-- The queue's figures for /metrics (operations.md §3, "Metrics"), computed by one
-- process at a time and read by all: one row, replaced at each refresh.
CREATE TABLE queue_gauges (
    only_row   boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    taken_at   timestamptz NOT NULL,
    -- {"tasks": {"pending": N, …}, "oldest_pending_age_secs": S, "workers_alive": N,
    --  "batches": {"queued": N, …}}
    figures    jsonb       NOT NULL,
    -- How many times the figures were computed, over the database's life.
    refreshes  bigint      NOT NULL DEFAULT 1
);
