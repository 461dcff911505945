-- keyledger's embedded (SQLite) schema, version 1: the same tables as on PostgreSQL.

CREATE TABLE IF NOT EXISTS events
(
    aggregate_type text    NOT NULL,
    aggregate_id   text    NOT NULL,
    sequence       integer NOT NULL CHECK (sequence >= 1),
    event_type     text    NOT NULL,
    event_version  text    NOT NULL,
    payload        text    NOT NULL,
    metadata       text    NOT NULL,
    recorded_at    text    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
) STRICT;

CREATE TABLE IF NOT EXISTS snapshots
(
    aggregate_type   text    NOT NULL,
    aggregate_id     text    NOT NULL,
    last_sequence    integer NOT NULL,
    current_snapshot integer NOT NULL,
    payload          text    NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
) STRICT;

CREATE TABLE IF NOT EXISTS key_listing
(
    account_id text NOT NULL,
    key_id     text NOT NULL,
    label      text NOT NULL,
    last_five  text NOT NULL,
    contacts   text NOT NULL, -- a JSON array of strings
    created_at text NOT NULL,
    expires_at text NOT NULL,
    status     text NOT NULL CHECK (status IN ('active', 'expired')),
    PRIMARY KEY (account_id, key_id)
) STRICT;

CREATE TABLE IF NOT EXISTS projection_checkpoints
(
    projection text    NOT NULL,
    account_id text    NOT NULL,
    sequence   integer NOT NULL,
    PRIMARY KEY (projection, account_id)
) STRICT;
