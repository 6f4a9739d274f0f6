-- The receipt ledger (mirrors sqlite/0003): an append-only Merkle tree over
-- exact envelope bytes. Appends take an advisory transaction lock, so leaf
-- indexes are assigned one writer at a time across every replica.

-- One row per leaf; leaf_index is the RFC 6962 leaf position (0-based).
CREATE TABLE ledger_leaves (
    leaf_index      BIGINT  PRIMARY KEY,
    node_id         TEXT    NOT NULL,
    seq             BIGINT  NOT NULL,
    task_id         TEXT    NOT NULL,
    envelope        BYTEA   NOT NULL,  -- DSSE JSON bytes exactly as the node signed them
    leaf_hash       BYTEA   NOT NULL,  -- SHA-256(0x00 || envelope)
    digest          TEXT    NOT NULL,  -- hex SHA-256(envelope), the next receipt's prev
    stored_unix_ms  BIGINT  NOT NULL,
    UNIQUE (node_id, seq)
);
CREATE INDEX ledger_leaves_task ON ledger_leaves (task_id);
CREATE INDEX ledger_leaves_stored ON ledger_leaves (stored_unix_ms);

-- Signed tree heads (C2SP signed-note checkpoints).
CREATE TABLE ledger_checkpoints (
    tree_size         BIGINT  PRIMARY KEY,
    root_hash         BYTEA   NOT NULL,
    timestamp_unix_ms BIGINT  NOT NULL,
    note              TEXT    NOT NULL
);
