-- Tell every keyledger instance which account changed, at commit, so each can bring its
-- in-memory verification index up to date (LISTEN keyledger_events). Notifications of one
-- transaction with the same payload are delivered once.
CREATE OR REPLACE FUNCTION keyledger_notify_event() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    PERFORM pg_notify('keyledger_events', NEW.aggregate_id);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS keyledger_events_notify ON events;
CREATE TRIGGER keyledger_events_notify
    AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION keyledger_notify_event();
