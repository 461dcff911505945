-- The relay publishes each event with what its commit recorded beside it: the signature of
-- its chain value and who issued the command. The outbox keeps the event's metadata too.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS metadata json;

CREATE OR REPLACE FUNCTION keyledger_outbox_event() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    INSERT INTO outbox (aggregate_id, sequence, payload, metadata)
    VALUES (NEW.aggregate_id, NEW.sequence, NEW.payload, NEW.metadata);
    PERFORM pg_notify('keyledger_outbox', '');
    RETURN NULL;
END;
$$;
