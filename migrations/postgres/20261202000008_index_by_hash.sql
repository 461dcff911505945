-- A leak report identifies keys by hash on an instance whose in-memory index is not loaded
-- (the commands role alone): the persisted index, looked up by hash.
CREATE INDEX IF NOT EXISTS verification_index_by_hash ON verification_index (key_hash);
