-- The bus: a transactional outbox for the events topic, the hash chain, consumer offsets,
-- and the persisted verification index.

-- Every stored event is also queued here by the trigger below, in the same transaction.
-- The relay publishes rows whose transaction every current snapshot already sees as
-- finished (xact_id below pg_snapshot_xmin), then deletes them.
CREATE TABLE IF NOT EXISTS outbox
(
    position     bigserial   PRIMARY KEY,
    xact_id      xid8        NOT NULL DEFAULT pg_current_xact_id(),
    aggregate_id text        NOT NULL,
    sequence     bigint      NOT NULL,
    payload      json        NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION keyledger_outbox_event() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    INSERT INTO outbox (aggregate_id, sequence, payload) VALUES (NEW.aggregate_id, NEW.sequence, NEW.payload);
    PERFORM pg_notify('keyledger_outbox', '');
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS keyledger_events_outbox ON events;
CREATE TRIGGER keyledger_events_outbox
    AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION keyledger_outbox_event();

-- The chain value of every published event (hex BLAKE3; see src/bus/chain.rs).
CREATE TABLE IF NOT EXISTS event_chain
(
    account_id text   NOT NULL,
    sequence   bigint NOT NULL,
    chain      text   NOT NULL,
    PRIMARY KEY (account_id, sequence)
);

-- Where each consumer has got to: the next offset to read, per partition. Written in the
-- same transaction as the effect of the records before it.
CREATE TABLE IF NOT EXISTS consumer_offsets
(
    consumer    text    NOT NULL,
    topic       text    NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint  NOT NULL,
    PRIMARY KEY (consumer, topic, partition)
);

-- The verification index, persisted by the projector so that an instance starts from it
-- and the events topic's offsets instead of replaying everything.
CREATE TABLE IF NOT EXISTS verification_index
(
    account_id  text        NOT NULL,
    key_id      uuid        NOT NULL,
    key_hash    text,                 -- hex keyed BLAKE3; NULL for legacy keys
    legacy_hash text,                 -- Postman's bcrypt form, legacy keys only
    label       text        NOT NULL,
    expires_at  timestamptz NOT NULL,
    status      text        NOT NULL CHECK (status IN ('active', 'revoked', 'expired')),
    PRIMARY KEY (account_id, key_id)
);

CREATE TABLE IF NOT EXISTS index_accounts
(
    account_id  text   PRIMARY KEY,
    login_email text   NOT NULL
);
