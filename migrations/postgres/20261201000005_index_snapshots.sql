-- Snapshots of the in-memory verification index (with each account's applied sequence),
-- so that a restart loads one and replays only the events that follow it instead of the
-- whole log. Only the newest is kept; a missing or unreadable one means a full replay.
CREATE TABLE IF NOT EXISTS index_snapshots
(
    taken_ms bigint NOT NULL,
    events   bigint NOT NULL,
    snapshot bytea  NOT NULL
);
