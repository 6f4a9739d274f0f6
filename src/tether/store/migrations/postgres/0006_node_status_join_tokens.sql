-- Node identity moves to mTLS client certificates (mirrors sqlite/0006): nodes
-- lose their bearer token and gain a status; enrolment uses per-node,
-- single-use join tokens. nodes.token_sha256 stays, no longer read; writes put ''.
DROP INDEX IF EXISTS nodes_token;
ALTER TABLE nodes ADD COLUMN status TEXT NOT NULL DEFAULT 'active';  -- active, revoked
ALTER TABLE nodes ADD COLUMN status_reason TEXT NOT NULL DEFAULT '';
ALTER TABLE nodes ADD COLUMN updated_unix_ms BIGINT NOT NULL DEFAULT 0;

-- Join tokens: only their SHA-256 is stored, never the token. A token is
-- consumed by ONE conditional UPDATE (unused, unexpired, this node), so two
-- replicas never both consume it.
CREATE TABLE join_tokens (
    token_sha256    TEXT    PRIMARY KEY,
    node_id         TEXT    NOT NULL,
    purpose         TEXT    NOT NULL,  -- enroll, rekey
    created_unix_ms BIGINT  NOT NULL,
    expires_unix_ms BIGINT  NOT NULL,
    used_unix_ms    BIGINT             -- NULL until consumed
);
CREATE INDEX join_tokens_node ON join_tokens (node_id);
