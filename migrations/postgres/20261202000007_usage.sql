-- Key usage: what the verify path counts in memory, flushed every few seconds by each
-- instance (adding to what is there). Not events: the log records a key's life, not its
-- traffic. Times are Unix seconds, days are days since 1970-01-01 (UTC).
CREATE TABLE key_usage (
    key_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    last_used_s BIGINT NOT NULL
);
CREATE INDEX key_usage_account ON key_usage (account_id);
CREATE TABLE key_usage_days (
    key_id TEXT NOT NULL,
    day BIGINT NOT NULL,
    verifications BIGINT NOT NULL,
    PRIMARY KEY (key_id, day)
);
-- Since when usage is recorded: a key older than this with no usage row may have been
-- used before; only a younger one is "never used".
CREATE TABLE usage_tracking (started_s BIGINT NOT NULL);
INSERT INTO usage_tracking (started_s) VALUES (CAST(EXTRACT(EPOCH FROM now()) AS BIGINT));
