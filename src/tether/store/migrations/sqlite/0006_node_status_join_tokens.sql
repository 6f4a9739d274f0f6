-- Node identity moves to mTLS client certificates: nodes lose their bearer
-- token and gain a status; enrolment uses per-node, single-use join tokens.
-- nodes.token_sha256 stays in the table, no longer read; writes put '' in it.
DROP INDEX IF EXISTS nodes_token;
ALTER TABLE nodes ADD COLUMN status TEXT NOT NULL DEFAULT 'active';  -- active, revoked
ALTER TABLE nodes ADD COLUMN status_reason TEXT NOT NULL DEFAULT '';
ALTER TABLE nodes ADD COLUMN updated_unix_ms INTEGER NOT NULL DEFAULT 0;

-- Join tokens: only their SHA-256 is stored, never the token. A token is
-- consumed by ONE conditional UPDATE (unused, unexpired, this node).
CREATE TABLE join_tokens (
    token_sha256    TEXT    PRIMARY KEY,
    node_id         TEXT    NOT NULL,
    purpose         TEXT    NOT NULL,  -- enroll, rekey
    created_unix_ms INTEGER NOT NULL,
    expires_unix_ms INTEGER NOT NULL,
    used_unix_ms    INTEGER            -- NULL until consumed
);
CREATE INDEX join_tokens_node ON join_tokens (node_id);
