-- A leak report of a migrated legacy key that the in-memory index cannot answer (the
-- commands role alone, or a key revoked before the instance started) compares the
-- username's legacy keys in the persisted index: found by username, legacy rows only.
CREATE INDEX IF NOT EXISTS verification_index_legacy_by_username
    ON verification_index (split_part(legacy_hash, '_v1_', 1))
    WHERE legacy_hash IS NOT NULL;
