-- The reminder saga's schedule and the notifier's outbox.

-- One row per key that still has a reminder or its expiry ahead. `schedule` is the key's
-- schedule as JSON (the saga's pure fold decides it); `next_due_ms` (Unix milliseconds) is
-- when its next stage falls due, indexed for the saga's "what is due now" query.
CREATE TABLE reminder_schedule
(
    key_id      text   PRIMARY KEY,
    account_id  text   NOT NULL,
    next_due_ms bigint NOT NULL,
    schedule    text   NOT NULL
);
CREATE INDEX reminder_schedule_due ON reminder_schedule (next_due_ms);
CREATE INDEX reminder_schedule_account ON reminder_schedule (account_id);

-- The saga's and the notifier's per-account checkpoints live in projection_checkpoints,
-- under their consumer names (keyledger-saga, keyledger-notifier).

-- One row per (event, recipient). Published to the notifications topic once
-- (`published_ms`), delivered by SMTP once (`delivered_ms`); `next_attempt_ms` is NULL when
-- no delivery by SMTP is wanted. Times are Unix milliseconds of the machine's clock.
CREATE TABLE notifications
(
    notification_id text   PRIMARY KEY,
    event_id        text   NOT NULL,
    account_id      text   NOT NULL,
    key_id          text   NOT NULL,
    recipient       text   NOT NULL,
    subject         text   NOT NULL,
    body            text   NOT NULL,
    kind            text   NOT NULL,
    stage           bigint,
    created_ms      bigint NOT NULL,
    published_ms    bigint,
    delivered_ms    bigint,
    attempts        bigint NOT NULL DEFAULT 0,
    next_attempt_ms bigint,
    last_error      text
);
CREATE INDEX notifications_unpublished ON notifications (created_ms) WHERE published_ms IS NULL;
CREATE INDEX notifications_undelivered ON notifications (next_attempt_ms)
    WHERE delivered_ms IS NULL AND next_attempt_ms IS NOT NULL;
