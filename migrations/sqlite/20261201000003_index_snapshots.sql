-- Snapshots of the in-memory verification index (as on PostgreSQL).
CREATE TABLE IF NOT EXISTS index_snapshots
(
    taken_ms integer NOT NULL,
    events   integer NOT NULL,
    snapshot blob    NOT NULL
) STRICT;
