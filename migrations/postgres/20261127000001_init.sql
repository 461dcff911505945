-- keyledger's PostgreSQL schema, version 1.
-- The events table is the one postgres-es writes (it names every column it uses, so the
-- extra columns below are safe); the rest are keyledger's own.

CREATE TABLE IF NOT EXISTS events
(
    aggregate_type text                          NOT NULL,
    aggregate_id   text                          NOT NULL,
    sequence       bigint CHECK (sequence >= 1)  NOT NULL,
    event_type     text                          NOT NULL,
    event_version  text                          NOT NULL,
    payload        json                          NOT NULL,
    metadata       json                          NOT NULL,
    recorded_at    timestamptz                   NOT NULL DEFAULT now(),
    -- The writing transaction, for an outbox reader that must not skip rows of
    -- transactions still in flight (read below pg_snapshot_xmin).
    xact_id        xid8                          NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

-- postgres-es can also keep snapshots; keyledger does not use them (cqrs-es 0.5.0
-- double-applies events when it does), but the repository expects the table name.
CREATE TABLE IF NOT EXISTS snapshots
(
    aggregate_type   text    NOT NULL,
    aggregate_id     text    NOT NULL,
    last_sequence    integer NOT NULL,
    current_snapshot integer NOT NULL,
    payload          json    NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);

-- The Settings listing: one row per non-revoked key. Other services may read it.
CREATE TABLE IF NOT EXISTS key_listing
(
    account_id text        NOT NULL,
    key_id     uuid        NOT NULL,
    label      text        NOT NULL,
    last_five  text        NOT NULL,
    contacts   text[]      NOT NULL,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    -- 'active' or 'expired' as recorded; a reader should also treat an active row whose
    -- expires_at has passed as expired.
    status     text        NOT NULL CHECK (status IN ('active', 'expired')),
    PRIMARY KEY (account_id, key_id)
);

-- How far each projection has applied each account's stream.
CREATE TABLE IF NOT EXISTS projection_checkpoints
(
    projection text   NOT NULL,
    account_id text   NOT NULL,
    sequence   bigint NOT NULL,
    PRIMARY KEY (projection, account_id)
);
